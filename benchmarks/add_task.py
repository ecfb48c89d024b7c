"""What adding one task to a finished run costs against a full run with that task (issue 15's goal: <= 1/N of
the experts and soft-target stages of a full N-task run, N = 4 on the built-in suite).

    python benchmarks/add_task.py                 # 3 rounds, tasks copy reverse sort + add
    python benchmarks/add_task.py --tiny          # smoke setting, temp folder

Per round, in one process (Ray starts once, every stage runs through the real CLI, `cli.main`):
  full:  `experts` and `soft-targets` of a fresh run with all 4 tasks (after its `base`);
  added: a run with the first 3 tasks finished (`base`, `experts`, `soft-targets`, `distill`), then the same two stages
         with the 4th task added and the base pinned (`base.tasks`), which is what `add-task` runs.
Reports the wall time of the two stages and the expert steps trained, full vs added, medians over rounds, and
the ratio added / full. Then the student of the added run (the 3-task run's student finished first, untimed),
side by side: continued from that student (`distill.continue_from`, `distill.continue_steps` = its default,
steps / 4 groups; what `add-task` does with `distill.after_edit=continue`) and retrained from the base
(`retrain`): `distill` stage wall, steps, and the student's mean validation exact match (from its manifest;
the test split is not read). Writes benchmarks/results/add_task.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, cli, command_line, fmt_pm, markdown_table, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
TASKS = ["copy", "reverse", "sort", "add"]
SETTINGS = ["upcycle.enabled=false", "multitask.enabled=false", "experts.optim.steps=200", "base.optim.steps=100",
            "tasks.num_train=1000", "distill.optim.steps=400"]
TINY = ["tasks.num_train=32", "tasks.num_test=8", "tasks.num_validation=4", "base.optim.steps=2",
        "experts.optim.steps=2", "distill.optim.steps=4", "eval.max_new_tokens=4"]


def expert_steps(run_dir: str, tasks: list[str], finished_after: float) -> int:
    """Expert steps trained by jobs that finished after `finished_after` (the stage just timed)."""
    steps = 0
    for task in tasks:
        path = os.path.join(run_dir, "experts", task, "DONE.json")
        if os.path.getmtime(path) >= finished_after:
            steps += json.load(open(path))["metrics"]["steps"]
    return steps


def one_round(runs_dir: str, round_index: int, overrides: list[str], log: str) -> dict:
    common = ["--config", "configs/demo.yaml", f"runs_dir={runs_dir}", f"seed={round_index}", *overrides]
    full = [*common, f"name=full-{round_index}", f"tasks.builtin=[{','.join(TASKS)}]"]
    old = [*common, f"name=added-{round_index}", f"tasks.builtin=[{','.join(TASKS[:-1])}]"]
    new = [*common, f"name=added-{round_index}", f"tasks.builtin=[{','.join(TASKS)}]",
           f"base.tasks=[{','.join(TASKS[:-1])}]"]
    out = {}
    for label, setup, timed in (("full", full, full), ("added", old, new)):
        for stage in ("base", "experts", "soft-targets", "distill") if label == "added" else ("base",):
            cli([stage, *setup], log)
        began = time.time()
        seconds = {stage: cli([stage, *timed], log) for stage in ("experts", "soft-targets")}
        run_dir = os.path.join(runs_dir, f"{label}-{round_index}")
        soft = json.load(open(os.path.join(run_dir, "soft_targets", "DONE.json")))["metrics"]
        out[label] = {"experts_s": seconds["experts"], "soft_targets_s": seconds["soft-targets"],
                      "expert_steps": expert_steps(run_dir, TASKS, began), "groups_scored": soft.get("scored")}
        print(f"[add_task] round {round_index} {label}: {out[label]}", flush=True)
    out.update(student_continue_vs_retrain(runs_dir, round_index, new, log))
    return out


def student_continue_vs_retrain(runs_dir: str, round_index: int, new: list[str], log: str) -> dict:
    """The added run's student: continued from the 3-task run's student (finished in the setup), then retrained
    from the base (each `distill` timed; both write the same stage folder, one after the other)."""
    student_dir = os.path.join(runs_dir, f"added-{round_index}", "student")
    parent = json.load(open(os.path.join(student_dir, "DONE.json")))["config_hash"]
    out = {}
    for label, extra in (("student_continue", [f"distill.continue_from.student={parent}"]), ("student_retrain", [])):
        seconds = cli(["distill", *new, *extra], log)
        found = json.load(open(os.path.join(student_dir, "DONE.json")))
        assert found["inputs"].get("continues", "") == (parent if extra else ""), found["inputs"]
        validation = found["metrics"]["validation"]
        out[label] = {"distill_s": seconds, "steps": found["metrics"]["steps"],
                      "validation_mean": statistics.mean(validation.values()), "validation": validation}
        print(f"[add_task] round {round_index} {label}: {out[label]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs-dir", default="runs/bench-add-task")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.time()
    out = result_path("add_task", args.out, args.tiny)
    runs_dir = os.path.join(os.path.dirname(out), "runs") if args.tiny else args.runs_dir
    os.makedirs(runs_dir, exist_ok=True)
    overrides = SETTINGS + (TINY if args.tiny else [])
    rounds = [one_round(runs_dir, i, overrides, os.path.join(runs_dir, "add_task.log"))
              for i in range(1 if args.tiny else args.rounds)]
    rows, medians = [], {}
    for key in ("experts_s", "soft_targets_s", "expert_steps"):
        full = statistics.median(r["full"][key] for r in rounds)
        added = statistics.median(r["added"][key] for r in rounds)
        ratios = [r["added"][key] / r["full"][key] for r in rounds]
        medians[key] = {"full": full, "added": added, "ratio_median": statistics.median(ratios),
                        "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows.append([key, f"{full:.1f}", f"{added:.1f}", f"{statistics.median(ratios):.2f}",
                     f"{min(ratios):.2f}–{max(ratios):.2f}"])
    both = [(r["added"]["experts_s"] + r["added"]["soft_targets_s"]) / (r["full"]["experts_s"] + r["full"]["soft_targets_s"])
            for r in rounds]
    rows.append(["experts + soft targets (wall)", "", "", f"{statistics.median(both):.2f}", f"{min(both):.2f}–{max(both):.2f}"])
    table = markdown_table(["measure (median over rounds)", f"full ({len(TASKS)} tasks)", "add 1 task", "added / full",
                            "range over rounds"], rows)
    table += f"\n\ngoal: added / full <= 1/{len(TASKS)} = {1 / len(TASKS):.2f} (issue 15)"
    student_rows = []
    for key in ("distill_s", "steps", "validation_mean"):
        cont = statistics.median(r["student_continue"][key] for r in rounds)
        retrain = statistics.median(r["student_retrain"][key] for r in rounds)
        ratios = [r["student_continue"][key] / r["student_retrain"][key] if r["student_retrain"][key] else float("nan")
                  for r in rounds]
        medians[f"student_{key}"] = {"continue": cont, "retrain": retrain, "ratio_median": statistics.median(ratios),
                                     "ratio_min": min(ratios), "ratio_max": max(ratios)}
        student_rows.append([key, f"{cont:.3f}" if key == "validation_mean" else f"{cont:.1f}",
                             f"{retrain:.3f}" if key == "validation_mean" else f"{retrain:.1f}",
                             f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}–{max(ratios):.2f}"])
    diffs = [r["student_continue"]["validation_mean"] - r["student_retrain"]["validation_mean"] for r in rounds]
    table += "\n\n" + markdown_table(["student of the added run (median over rounds)", "continued", "retrained",
                                       "continued / retrained", "range over rounds"], student_rows)
    table += (f"\n\nvalidation exact match, continued − retrained: {fmt_pm(diffs)} over {len(rounds)} "
              f"round(s) (a difference within its spread is no difference)")
    print(table, flush=True)
    write_result(out, "add_task", command_line(), started,
                 {"tasks": TASKS, "overrides": overrides, "rounds": rounds, "medians": medians,
                  "wall_ratio_median": statistics.median(both), "goal_ratio": 1 / len(TASKS)}, table)


if __name__ == "__main__":
    main()
