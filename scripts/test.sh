#!/usr/bin/env bash
# Install (first run only) and run the test suite: unit, Ray integration and the CLI smoke run (< 10 min on 2 cores).
#   bash scripts/test.sh [pytest args]          e.g.  bash scripts/test.sh -m "not integration and not smoke"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
