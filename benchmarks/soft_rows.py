"""Soft targets for every training row vs only the rows the student reads (`soft_targets.rows=all | read`).

    nice -n 5 python benchmarks/soft_rows.py                     # SmolLM2 at the issue's shape + the demo, 2 rounds
    python benchmarks/soft_rows.py --settings smollm2 --rounds 3
    python benchmarks/soft_rows.py --tiny                        # smoke setting, temp folder

Issue 16: on a real model the soft targets took 222 s because all 6,000 training rows were scored, though the
student read 90 steps x 8 = 720 of them. Settings:
  smollm2: configs/smollm2.yaml with tasks.num_train=1500 (4 tasks: 6,000 rows), distill.optim 90 steps x 8
           (720 rows read), experts 6 steps (their quality is not what is measured);
  demo:    configs/demo.yaml (6 tasks x 2,000 = 12,000 rows; the student reads 600 x 32 = 19,200: every row, so
           `read` must score all of them too), base 50 and experts 20 steps.
Per setting, one run folder: `base` and `experts` once (untimed), with `soft_targets.in_expert_jobs=false` so the
soft-targets stage itself loads each expert and scores on its actor pool. Then per round, each mode in turn (the
order alternating between rounds): the stage's folder removed, `soft-targets` run through the real CLI and timed;
rows scored read from its manifest. Medians over rounds and the ratio read / all per round, side by side.
With --student (always with --tiny) the student then trains on the `read` soft targets (`distill`, multitask
off): it reads exactly the rows scored. Writes benchmarks/results/soft_rows.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, cli, command_line, markdown_table, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
COMMON = ["upcycle.enabled=false", "multitask.enabled=false", "soft_targets.in_expert_jobs=false"]
SETTINGS = {
    "smollm2": ["--config", "configs/smollm2.yaml", "tasks.num_train=1500", "distill.optim.steps=90",
                "distill.optim.batch_size=8", "experts.optim.steps=6", "experts.optim.warmup_steps=1"],
    "demo": ["--config", "configs/demo.yaml", "base.optim.steps=50", "experts.optim.steps=20"],
}
TINY = {  # the demo's tiny model: 2 tasks x 32 rows; the student reads 4 x 4 = 16
    "demo": ["--config", "configs/demo.yaml", "tasks.builtin=[copy,reverse]", "tasks.num_train=32",
             "tasks.num_validation=4", "tasks.num_test=4", "base.optim.steps=2", "experts.optim.steps=2",
             "distill.optim.steps=4", "distill.optim.batch_size=4", "eval.max_new_tokens=4"],
}
MODES = ("all", "read")


def one_setting(name: str, overrides: list[str], runs_dir: str, rounds: int, student: bool, log: str) -> dict:
    args = [*overrides, *COMMON, f"runs_dir={runs_dir}", f"name=soft-rows-{name}"]
    run_dir = os.path.join(runs_dir, f"soft-rows-{name}")
    for stage in ("base", "experts"):
        cli([stage, *args], log, tag=name)
    out = {"overrides": args, "rounds": []}
    mode = None  # the mode of the soft targets last written
    for r in range(rounds):
        found = {}
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            shutil.rmtree(os.path.join(run_dir, "soft_targets"), ignore_errors=True)
            seconds = cli(["soft-targets", *args, f"soft_targets.rows={mode}"], log, tag=f"{name} {mode}")
            done = json.load(open(os.path.join(run_dir, "soft_targets", "DONE.json")))
            found[mode] = {"seconds": round(seconds, 1), "stage_seconds": round(done["seconds"], 1),
                           "rows": done["metrics"]["rows"], "bytes": done["metrics"]["bytes"]}
        out["rounds"].append(found)
    if student:  # on the `read` soft targets: the last ones written after an odd round count, else written again
        if mode != "read":
            shutil.rmtree(os.path.join(run_dir, "soft_targets"), ignore_errors=True)
            cli(["soft-targets", *args, "soft_targets.rows=read"], log, tag=f"{name} read")
        seconds = cli(["distill", *args, "soft_targets.rows=read"], log, tag=f"{name} student")
        done = json.load(open(os.path.join(run_dir, "student", "DONE.json")))
        scored = json.load(open(os.path.join(run_dir, "soft_targets", "DONE.json")))["metrics"]["rows"]
        out["student"] = {"seconds": round(seconds, 1), "steps": done["metrics"]["steps"], "rows_scored": scored,
                          "validation": done["metrics"]["validation"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs-dir", default="runs/bench-soft-rows")
    parser.add_argument("--student", action="store_true", help="then train the student on the read soft targets")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run folders (removed by default)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.time()
    out = result_path("soft_rows", args.out, args.tiny)
    runs_dir = os.path.join(os.path.dirname(out), "runs") if args.tiny else args.runs_dir
    os.makedirs(runs_dir, exist_ok=True)
    settings = TINY if args.tiny else {k: SETTINGS[k] for k in args.settings}
    log = os.path.join(runs_dir, "soft_rows.log")
    results = {name: one_setting(name, overrides, runs_dir, 1 if args.tiny else args.rounds, args.student or args.tiny, log)
               for name, overrides in settings.items()}
    rows = []
    for name, found in results.items():
        per_round = found["rounds"]
        med = {m: {k: statistics.median(r[m][k] for r in per_round) for k in ("seconds", "stage_seconds", "rows")}
               for m in MODES}
        ratios = [r["read"]["seconds"] / r["all"]["seconds"] for r in per_round]
        found["medians"] = {**med, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                            "ratio_max": max(ratios)}
        rows.append([name, f"{med['all']['rows']:.0f}", f"{med['read']['rows']:.0f}", f"{med['all']['seconds']:.1f}",
                     f"{med['read']['seconds']:.1f}", f"{statistics.median(ratios):.2f}",
                     f"{min(ratios):.2f}–{max(ratios):.2f}", len(per_round)])
    table = markdown_table(["setting", "rows scored (all)", "rows scored (read)", "soft-targets s (all)",
                            "soft-targets s (read)", "read / all (s)", "range over rounds", "rounds"], rows)
    for name, found in results.items():
        if "student" in found:
            s = found["student"]
            table += (f"\n\n{name}: the student trained {s['steps']} steps on the {s['rows_scored']} rows scored "
                      f"with `read` in {s['seconds']:.0f} s")
    print(table, flush=True)
    write_result(out, "soft_rows", command_line(), started, {"settings": results}, table)
    if not args.keep_runs:
        for name in settings:
            shutil.rmtree(os.path.join(runs_dir, f"soft-rows-{name}"), ignore_errors=True)


if __name__ == "__main__":
    main()
