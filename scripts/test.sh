#!/usr/bin/env bash
# Install (first run only) and run the test suite: unit, Ray integration, CLI smoke and cluster (~9 min of tests, ~10 min with the install, on 2 cores).
#   bash scripts/test.sh [pytest args]          e.g.  bash scripts/test.sh -m "not integration and not smoke"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two pytest workers (pytest-xdist): most of the suite waits on Ray start-up and subprocesses, not on CPU.
exec .venv/bin/python -m pytest -q -n 2 --dist worksteal "$@"
