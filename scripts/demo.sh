#!/usr/bin/env bash
# Install (first run only) and run the whole pipeline on the embedded default: tiny Llama, built-in tasks, CPU.
#   bash scripts/demo.sh [key=value ...]        e.g.  bash scripts/demo.sh distill.temperature=4
# Report: runs/demo/eval/report.md (+ report.json, report.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dume_ray run --config configs/demo.yaml "$@"
