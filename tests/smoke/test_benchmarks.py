"""Every benchmark script runs end to end with `--tiny` and writes its JSON (never into benchmarks/results/).

Run: .venv/bin/python -m pytest tests/smoke/test_benchmarks.py -q -m smoke

The benchmarks themselves are not run by CI (minutes to tens of minutes); this keeps them working.
`quality`, `end_to_end` and `smollm2_stages` start the real pipeline (Ray) on a 2-task, 2-step setting
(`smollm2_stages --tiny` on the tiny embedded model, not SmolLM2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def _results_snapshot() -> dict:
    if not os.path.isdir(RESULTS):
        return {}
    return {f: os.path.getmtime(os.path.join(RESULTS, f)) for f in os.listdir(RESULTS)}


@pytest.mark.smoke
@pytest.mark.parametrize("script", ["storage", "stream_cost", "scaling", "quality", "end_to_end", "select_defaults",
                                    "on_policy", "add_task", "search_predicts", "curves", "regime", "soft_rows",
                                    "smollm2_stages"])
def test_benchmark_runs_tiny_and_writes_json(script, tmp_path):
    before = _results_snapshot()
    out = tmp_path / f"{script}.json"
    args = [sys.executable, os.path.join(REPO, "benchmarks", f"{script}.py"), "--tiny", "--out", str(out)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)  # minutes on a loaded 2-core machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"].startswith(script) and record["table"] and record["machine"]["cpu_count"]
    assert "|" in proc.stdout or "skipped" in proc.stdout  # the table (or the skip line) is printed
    assert _results_snapshot() == before  # tiny runs never touch the committed results


def test_tiny_runs_without_out_go_to_a_temp_folder():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from common import result_path
    assert not result_path("quality", None, tiny=True).startswith(RESULTS)
    assert result_path("quality", None, tiny=False) == os.path.join(RESULTS, "quality.json")


def test_regime_lists_every_planned_cell_short_of_its_seeds():
    """regime.json's `not_measured`: a planned (model, tasks, budget) with 0 < seeds < planned is listed too, with
    the seeds it lacks; a complete one is not; cells outside the plan change nothing (pure function, no training)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from regime import PLANNED_SEEDS, SMOLLM2_BUDGETS, cell_key, not_measured
    assert 0.5 in SMOLLM2_BUDGETS and 0.125 in SMOLLM2_BUDGETS  # the SmolLM2 plan holds budget 1/2
    cells = {cell_key(m, 4, b, s): {} for m, b, seeds in [("smollm2", 0.125, [0, 1, 2]), ("smollm2-L15", 0.125, [0]),
                                                          ("smollm2", 0.5, [1]), ("smollm2", 1.0, [0])] for s in seeds}
    plan = [(m, [4], SMOLLM2_BUDGETS) for m in ("smollm2", "smollm2-L15")]
    missing = {(g["model"], g["tasks"], g["budget"]): g for g in not_measured(cells, plan, [0, 1, 2])}
    assert set(missing) == {("smollm2", 4, 0.5), ("smollm2-L15", 4, 0.125), ("smollm2-L15", 4, 0.5)}
    assert missing[("smollm2-L15", 4, 0.125)] == {"model": "smollm2-L15", "tasks": 4, "budget": 0.125,
                                                "seeds_measured": 1, "seeds_planned": 3, "missing_seeds": [1, 2]}
    assert missing[("smollm2", 4, 0.5)]["missing_seeds"] == [0, 2]
    assert missing[("smollm2-L15", 4, 0.5)]["seeds_measured"] == 0
    assert [g["budget"] for g in not_measured(cells, plan[:1], PLANNED_SEEDS)] == [0.5]  # the map's own plan of seeds
