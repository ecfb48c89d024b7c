"""Choose a config's distillation defaults (T, alpha) and DUME routing on the VALIDATION split only.

    python benchmarks/select_defaults.py                                   # configs/demo.yaml, seeds 0 1 2
    python benchmarks/select_defaults.py --config configs/dume.yaml --temperatures --alphas   # routing only
    python benchmarks/select_defaults.py --tiny                            # smoke setting (2 seeds x 2 points), temp folder

For each seed S it runs the real pipeline once with `eval.split=validation` (`python -m dume_ray run --config C
seed=S name=select-sS runs_dir=R eval.split=validation`), then retrains only the student for every (T, alpha) of
the grid (`python -m dume_ray distill ... distill.temperature=T distill.alpha=A`: base, experts, soft targets and
the multitask baseline are reused, their stage hashes do not depend on T or alpha). Every score read here is a
validation score: the student's and the baseline's come from their stage manifests (each training job scores its
model on validation when it ends), the DUME routings from the run's eval report on validation. The test split is
never read; the final report (benchmarks/quality.py) reads it with the chosen settings.

Each (seed, T, alpha) cell is kept in the output JSON as soon as it is measured, so an interrupted run resumes.
All CLI calls run in this one process, so Ray starts once. Prints the table, writes
benchmarks/results/select_defaults_<config name>.json (or --out): per cell mean ± sample std over seeds of the
mean validation exact match, student − multitask, and the chosen point (highest mean; a difference smaller than
the spread over seeds is reported as a tie, and the tie is broken towards the smaller T, then alpha).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, cli, command_line, fmt_pm, markdown_table, mean_std, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
TINY_OVERRIDES = ["tasks.builtin=[copy,reverse]", "tasks.num_train=32", "tasks.num_test=8", "tasks.num_validation=4",
                  "base.optim.steps=2", "experts.optim.steps=2", "distill.optim.steps=2", "eval.max_new_tokens=4",
                  "upcycle.stats_examples_per_task=8"]
# --tiny's own defaults (an explicit --seeds/--temperatures/--alphas wins): two seeds, so the ± and the tie rule
# see a spread, and two grid points, so there is a choice (the full defaults: 3 seeds x 8 points, 27 CLI calls).
TINY_SEEDS, TINY_TEMPERATURES, TINY_ALPHAS = [0, 1], [1.0, 2.0], [0.5]


def validation_mean(stage_dir: str) -> float:
    """Mean over tasks of the validation exact match the training job recorded in its manifest."""
    with open(os.path.join(stage_dir, "DONE.json")) as f:
        scores = json.load(f)["metrics"]["validation"]
    return sum(scores.values()) / len(scores)


def routing_scores(run_dir: str) -> dict[str, float]:
    """{DUME variant label: mean validation exact match} from the run's eval report (written on validation)."""
    with open(os.path.join(run_dir, "eval", "report.json")) as f:
        report = json.load(f)
    assert report["split"] == "validation", f"{run_dir}: eval report is on {report['split']!r}, not validation"
    variants = (report.get("upcycle") or {}).get("variants") or {}
    return {label: sum(per_task.values()) / len(per_task) for label, per_task in variants.items()}


def choose(cells: dict[tuple, list[float]]) -> tuple[tuple, list[tuple]]:
    """The cell with the highest mean, and every cell tied with it (mean within the larger of the two spreads)."""
    stats = {key: mean_std(values) for key, values in cells.items()}
    best = max(stats, key=lambda key: stats[key][0])
    ties = [key for key, (m, s) in stats.items()
            if stats[best][0] - m <= max(s, stats[best][1])]
    return min(ties), ties  # among ties: the smallest T, then alpha


def run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a benchmark that runs the pipeline once per seed, then varies the student (also
    `on_policy.py`): config, seeds, where the runs go, extra overrides, --tiny, --out."""
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--tiny: fewer)")
    parser.add_argument("--runs-dir", default="runs/select")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    return parser


def tiny_or(value, tiny: bool, tiny_default: list, default: list) -> list:
    """An option left unset (None) takes --tiny's default or the full one; a value given (even empty) is kept."""
    return value if value is not None else list(tiny_default if tiny else default)


def main() -> None:
    parser = run_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--temperatures", type=float, nargs="*", default=None, help="default 1 2 4 8 (--tiny: 1 2)")
    parser.add_argument("--alphas", type=float, nargs="*", default=None, help="default 0.5 0.9 (--tiny: 0.5)")
    args = parser.parse_args()
    args.seeds = tiny_or(args.seeds, args.tiny, TINY_SEEDS, [0, 1, 2])
    args.temperatures = tiny_or(args.temperatures, args.tiny, TINY_TEMPERATURES, [1.0, 2.0, 4.0, 8.0])
    args.alphas = tiny_or(args.alphas, args.tiny, TINY_ALPHAS, [0.5, 0.9])
    started = time.time()
    name = os.path.splitext(os.path.basename(args.config))[0]
    out = result_path(f"select_defaults_{name}", args.out, args.tiny)
    previous = json.load(open(out)) if os.path.exists(out) else {}
    cells = {tuple(c["key"]): c["values"] for c in previous.get("cells", [])}  # (seed, T, alpha) -> [student, multitask]
    routings = {int(s): r for s, r in previous.get("routings", {}).items()}
    overrides = [*(TINY_OVERRIDES if args.tiny else []), *args.set, "eval.split=validation"]
    runs_dir = os.path.join(os.path.dirname(out), "runs") if args.tiny else args.runs_dir
    os.makedirs(runs_dir, exist_ok=True)
    grid = list(itertools.product(args.temperatures, args.alphas))

    def save() -> dict:
        payload = summarise(args, grid, cells, routings)
        write_result(out, f"select_defaults_{name}", command_line(), started, payload, payload["table"])
        return payload

    for seed in args.seeds:
        run = [f"seed={seed}", f"name=select-s{seed}", f"runs_dir={runs_dir}", *overrides]
        run_dir = os.path.join(runs_dir, f"select-s{seed}")
        log = os.path.join(runs_dir, f"select-s{seed}.log")
        if seed not in routings:
            cli(["run", "--config", args.config, *run], log)
            routings[seed] = routing_scores(run_dir)
            save()
        for temperature, alpha in grid:
            if (seed, temperature, alpha) in cells:
                continue
            cli(["distill", "--config", args.config, *run, f"distill.temperature={temperature}",
                 f"distill.alpha={alpha}"], log)
            cells[(seed, temperature, alpha)] = [validation_mean(f"{run_dir}/student"),
                                                 validation_mean(f"{run_dir}/multitask")]
            save()
    payload = save()
    print(payload["table"], flush=True)


def summarise(args, grid: list[tuple], cells: dict, routings: dict) -> dict:
    """Per (T, alpha): student and student − multitask over seeds; per routing: DUME over seeds; the choices."""
    rows, per_point = [], {}
    for temperature, alpha in grid:
        measured = [cells[(s, temperature, alpha)] for s in args.seeds if (s, temperature, alpha) in cells]
        if not measured:
            continue
        per_point[(temperature, alpha)] = [student for student, _ in measured]
        rows.append([f"{temperature:g}", f"{alpha:g}", len(measured), fmt_pm([s for s, _ in measured]),
                     fmt_pm([m for _, m in measured]), fmt_pm([s - m for s, m in measured])])
    chosen = None
    if per_point:
        best, ties = choose(per_point)
        chosen = {"temperature": best[0], "alpha": best[1], "tied_with": [list(t) for t in ties if t != best],
                  "mean": mean_std(per_point[best])[0]}
    table = markdown_table(["T", "alpha", "seeds", "student (val)", "multitask (val)", "student − multitask"], rows)
    labels = sorted({label for r in routings.values() for label in r})
    routing_cells = {(label,): [routings[s][label] for s in routings if label in routings[s]] for label in labels}
    chosen_routing = None
    if routing_cells:
        table += "\n\n" + markdown_table(["DUME routing (val)", "seeds", "mean exact match"],
                                         [[label, len(v), fmt_pm(v)] for (label,), v in routing_cells.items()])
        best, ties = choose(routing_cells)
        chosen_routing = {"variant": best[0], "tied_with": [t[0] for t in ties if t != best]}
    return {"config": args.config, "split": "validation", "seeds": args.seeds, "table": table,
            "chosen": chosen, "chosen_routing": chosen_routing,
            "cells": [{"key": list(key), "values": values} for key, values in sorted(cells.items())],
            "routings": {str(s): r for s, r in sorted(routings.items())}}


if __name__ == "__main__":
    main()
