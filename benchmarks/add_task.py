"""What adding one task to a finished run costs against a full run with that task (issue 15's goal: <= 1/N of
the experts and soft-target stages of a full N-task run, N = 4 on the built-in suite).

    python benchmarks/add_task.py                 # 3 rounds, tasks copy reverse sort + add, 200 steps per expert
    python benchmarks/add_task.py --expert-steps 3000 --resources both --no-student --out benchmarks/results/add_task_long.json
    python benchmarks/add_task.py --tiny          # smoke setting, temp folder

Per round, in one process (Ray starts once, every stage runs through the real CLI, `cli.main`):
  full:  `experts` and `soft-targets` of a fresh run with all 4 tasks (after its `base`);
  added: a run with the first 3 tasks finished (`base`, `experts`, `soft-targets`, `distill`), then the same two stages
         with the 4th task added and the base pinned (`base.tasks`), which is what `add-task` runs.
Reports, full vs added (medians over rounds, and the ratio added / full): the wall time of the two stages, the
expert steps trained, and their compute in CPU-seconds: the expert jobs' own process CPU time summed over the
jobs (`cpu_seconds` in each expert's manifest; soft targets are scored inside them), plus the driver's (this
process, which runs the stages' driver code). Then where a job's wall time goes (`worker_utils.Phases`, per job).
`--resources`: `shared` (the config's: one core and one torch thread per expert, so 2 experts run at once on 2
cores; a lone added expert takes every free core, `resources.idle_core_share`), `whole-node` (each expert asks for
every CPU of the node and as many torch threads, so the full run's experts queue one after another, as one GPU
per expert does on a GPU cluster), or `both`, side by side in each round.
Then (unless --no-student) the student of the added run (the 3-task run's student finished first, untimed),
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
from common import REPO, cli, command_line, fmt_pm, markdown_table, result_path, start_ray, write_result  # noqa: E402

sys.path.insert(0, REPO)
TASKS = ["copy", "reverse", "sort", "add"]
SETTINGS = ["upcycle.enabled=false", "multitask.enabled=false", "base.optim.steps=100", "tasks.num_train=1000",
            "distill.optim.steps=400"]
TINY = ["tasks.num_train=32", "tasks.num_test=8", "tasks.num_validation=4", "base.optim.steps=2",
        "distill.optim.steps=4", "eval.max_new_tokens=4"]
PHASES = ["worker start", "model build", "data load", "steps", "checkpoint", "save", "validation", "soft targets",
          "teardown", "job wall"]


def resource_overrides(kind: str, node_cpus: int, threads: int = 0) -> list[str]:
    """`shared`: the config's resources (one core, one torch thread per expert); `whole-node`: each expert (and the
    base) asks for every CPU of the node, so a full run's experts queue one after another, with `threads` torch
    threads (0: as many as the node's CPUs)."""
    if kind == "shared":
        return []
    return [f"{stage}.resources.{key}={value}" for stage in ("experts", "base")
            for key, value in (("cpus_per_worker", node_cpus), ("torch_threads", threads or node_cpus))]


def expert_jobs(run_dir: str, tasks: list[str], finished_after: float) -> list[dict]:
    """The metrics of the expert jobs that finished after `finished_after` (the stage just timed)."""
    jobs = []
    for task in tasks:
        path = os.path.join(run_dir, "experts", task, "DONE.json")
        if os.path.getmtime(path) >= finished_after:
            jobs.append(json.load(open(path))["metrics"])
    return jobs


def one_round(runs_dir: str, round_index: int, overrides: list[str], log: str, label_prefix: str, student: bool) -> dict:
    common = ["--config", "configs/demo.yaml", f"runs_dir={runs_dir}", f"seed={round_index}", *overrides]
    full = [*common, f"name={label_prefix}full-{round_index}", f"tasks.builtin=[{','.join(TASKS)}]"]
    old = [*common, f"name={label_prefix}added-{round_index}", f"tasks.builtin=[{','.join(TASKS[:-1])}]"]
    new = [*common, f"name={label_prefix}added-{round_index}", f"tasks.builtin=[{','.join(TASKS)}]",
           f"base.tasks=[{','.join(TASKS[:-1])}]"]
    out = {}
    for label, before, timed in (("full", full, full), ("added", old, new)):
        setup = ("base", "experts", "soft-targets", *(("distill",) if student else ())) if label == "added" else ("base",)
        for stage in setup:
            cli([stage, *before], log)
        began, seconds, driver_cpu = time.time(), {}, time.process_time()
        for stage in ("experts", "soft-targets"):
            seconds[stage] = cli([stage, *timed], log)
        driver_cpu = time.process_time() - driver_cpu
        run_dir = os.path.join(runs_dir, f"{label_prefix}{label}-{round_index}")
        soft = json.load(open(os.path.join(run_dir, "soft_targets", "DONE.json")))["metrics"]
        jobs = expert_jobs(run_dir, TASKS, began)
        out[label] = {"experts_s": seconds["experts"], "soft_targets_s": seconds["soft-targets"],
                      "expert_steps": sum(j["steps"] for j in jobs), "groups_scored": soft.get("scored"),
                      "expert_jobs_cpu_s": sum(j["cpu_seconds"] for j in jobs), "driver_cpu_s": driver_cpu,
                      "process_start_cpu_s": sum(j["process_start_cpu_seconds"] for j in jobs),
                      "job_profiles": [j["profile"] for j in jobs]}
        out[label]["cpu_s"] = out[label]["expert_jobs_cpu_s"] + out[label]["process_start_cpu_s"] + driver_cpu
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out[label].items() if k != "job_profiles"}
        print(f"[add_task] {label_prefix}round {round_index} {label}: {shown}", flush=True)
    out["added_argv"] = new
    return out


def student_continue_vs_retrain(runs_dir: str, round_index: int, new: list[str], log: str, label_prefix: str) -> dict:
    """The added run's student: continued from the 3-task run's student (finished in the setup), then retrained
    from the base (each `distill` timed; both write the same stage folder, one after the other)."""
    student_dir = os.path.join(runs_dir, f"{label_prefix}added-{round_index}", "student")
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


def cost_table(rounds: list[dict]) -> tuple[str, dict]:
    """Full vs added, medians over rounds, and the ratio added / full with its range."""
    rows, medians = [], {}
    for key in ("experts_s", "soft_targets_s", "expert_steps", "expert_jobs_cpu_s", "driver_cpu_s", "process_start_cpu_s"):
        full = statistics.median(r["full"][key] for r in rounds)
        added = statistics.median(r["added"][key] for r in rounds)
        ratios = [r["added"][key] / r["full"][key] for r in rounds if r["full"][key]]  # a warm Ray starts no process
        medians[key] = {"full": full, "added": added, "ratio_median": statistics.median(ratios) if ratios else None,
                        "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None)}
        rows.append([key, f"{full:.1f}", f"{added:.1f}", f"{statistics.median(ratios):.2f}" if ratios else "–",
                     f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "–"])
    for name, keys in (("wall", ("experts_s", "soft_targets_s")), ("cpu", ("cpu_s",))):
        ratios = [sum(r["added"][k] for k in keys) / sum(r["full"][k] for k in keys) for r in rounds]
        medians[f"{name}_ratio"] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                                    "ratio_max": max(ratios)}
        rows.append([f"experts + soft targets ({'wall' if name == 'wall' else 'CPU-seconds: jobs, their process starts, driver'})", "", "",
                     f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}–{max(ratios):.2f}"])
    return markdown_table(["measure (median over rounds)", f"full ({len(TASKS)} tasks)", "add 1 task", "added / full",
                           "range over rounds"], rows), medians


def profile_table(rounds: list[dict]) -> str:
    """Where one expert job's wall time goes (`worker_utils.Phases`): seconds per job, the median over rounds of
    each round's mean over its jobs."""
    def per_job(label: str, phase: str) -> str:
        means = [statistics.mean(p.get(phase, 0.0) for p in r[label]["job_profiles"]) for r in rounds]
        return f"{statistics.median(means):.2f}"
    rows = [[label, *(per_job(label, phase) for phase in PHASES)] for label in ("full", "added")]
    speedups = [statistics.mean(p["steps"] for p in r["full"]["job_profiles"])
                / statistics.mean(p["steps"] for p in r["added"]["job_profiles"]) for r in rounds]
    return (markdown_table(["seconds per expert job", *PHASES], rows)
            + "\n\n(worker start counts from the driver's submit, so a job queued for a free CPU waits in it)"
            + f"\n\nsteps phase, full job / added job: {statistics.median(speedups):.2f} "
              f"({min(speedups):.2f}–{max(speedups):.2f}): how much faster the added run's lone expert trains")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--expert-steps", type=int, default=200, help="experts.optim.steps")
    parser.add_argument("--resources", choices=["shared", "whole-node", "both"], default="shared")
    parser.add_argument("--whole-node-threads", type=int, default=0,
                        help="torch threads of a whole-node expert (0 = the node's CPUs; 1 where other processes load "
                             "the machine: two threads that must meet at every op crawl when cores are oversubscribed)")
    parser.add_argument("--no-student", action="store_true", help="skip the continued-vs-retrained student comparison")
    parser.add_argument("--runs-dir", default="runs/bench-add-task")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.time()
    out = result_path("add_task", args.out, args.tiny)
    runs_dir = os.path.join(os.path.dirname(out), "runs") if args.tiny else args.runs_dir
    os.makedirs(runs_dir, exist_ok=True)
    log = os.path.join(runs_dir, "add_task.log")
    overrides = SETTINGS + [f"experts.optim.steps={2 if args.tiny else args.expert_steps}"] + (TINY if args.tiny else [])
    start_ray()
    import ray
    node_cpus = int(ray.cluster_resources().get("CPU", 1))
    kinds = ["shared", "whole-node"] if args.resources == "both" else [args.resources]
    rounds: dict[str, list[dict]] = {kind: [] for kind in kinds}
    students: list[dict] = []
    steps = 2 if args.tiny else args.expert_steps
    for i in range(1 if args.tiny else args.rounds):
        for kind in kinds:  # the settings side by side in each round: the same load for both
            prefix = "" if kind == "shared" else f"{kind}-"
            rounds[kind].append(one_round(runs_dir, i, overrides + resource_overrides(kind, node_cpus, args.whole_node_threads), log, prefix,
                                          student=not args.no_student and kind == kinds[0]))
        if not args.no_student:  # the first setting's added run: its 3-task student finished in the setup
            students.append(student_continue_vs_retrain(runs_dir, i, rounds[kinds[0]][-1]["added_argv"], log,
                                                        "" if kinds[0] == "shared" else f"{kinds[0]}-"))
        for kind in kinds:
            rounds[kind][-1].pop("added_argv", None)
        report(out, started, rounds, students, overrides, node_cpus, steps, args.whole_node_threads)  # after every round: a cut run keeps its rounds


def report(out: str, started: float, rounds: dict[str, list[dict]], students: list[dict], overrides: list[str],
           node_cpus: int, steps: int, threads: int = 0) -> None:
    """The tables of the rounds so far, printed and written with them to `out`."""
    tables, medians = [], {}
    for kind, found in rounds.items():
        table, medians[kind] = cost_table(found)
        tables.append(f"experts.resources {kind} ({' '.join(resource_overrides(kind, node_cpus, threads)) or 'the config'}, "
                      f"{node_cpus} CPUs, {steps} steps per expert, "
                      f"{len(found)} round(s)):\n\n{table}\n\n{profile_table(found)}")
    table = "\n\n".join(tables) + f"\n\ngoal: added / full <= 1/{len(TASKS)} = {1 / len(TASKS):.2f} (issue 15)"
    payload = {"tasks": TASKS, "overrides": overrides, "node_cpus": node_cpus,
               "resource_overrides": {kind: resource_overrides(kind, node_cpus, threads) for kind in rounds},
               "rounds": rounds, "medians": medians, "goal_ratio": 1 / len(TASKS),
               "wall_ratio_median": {kind: medians[kind]["wall_ratio"]["ratio_median"] for kind in rounds}}
    if students:
        table += "\n\n" + student_table(students)
        payload["students"] = students
    print(table, flush=True)
    write_result(out, "add_task", command_line(), started, payload, table)


def student_table(students: list[dict]) -> str:
    student_rows = []
    for key in ("distill_s", "steps", "validation_mean"):
        cont = statistics.median(r["student_continue"][key] for r in students)
        retrain = statistics.median(r["student_retrain"][key] for r in students)
        ratios = [r["student_continue"][key] / r["student_retrain"][key] if r["student_retrain"][key] else float("nan")
                  for r in students]
        student_rows.append([key, f"{cont:.3f}" if key == "validation_mean" else f"{cont:.1f}",
                             f"{retrain:.3f}" if key == "validation_mean" else f"{retrain:.1f}",
                             f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}–{max(ratios):.2f}"])
    diffs = [r["student_continue"]["validation_mean"] - r["student_retrain"]["validation_mean"] for r in students]
    return (markdown_table(["student of the added run (median over rounds)", "continued", "retrained",
                            "continued / retrained", "range over rounds"], student_rows)
            + f"\n\nvalidation exact match, continued − retrained: {fmt_pm(diffs)} over {len(students)} "
              f"round(s) (a difference within its spread is no difference)")


if __name__ == "__main__":
    main()
