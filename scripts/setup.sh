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
