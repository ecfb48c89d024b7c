"""Eval's share of the SmolLM2 pipeline's wall time: the README's pipeline run from scratch, a few rounds.

    python benchmarks/eval_share.py                  # configs/smollm2.yaml, 3 rounds (seeds 0 1 2), ~15 min a round quiet
    python benchmarks/eval_share.py --rounds 2
    python benchmarks/eval_share.py --tiny           # the tiny embedded model, 2 steps a stage, temp folder

Each round is a fresh `python -m dume_ray run --config C name=bench-eval-share-sS runs_dir=R seed=S` in a
subprocess (`end_to_end.ray_pipeline`: its own Ray, started and stopped by the command), seed S = the round's
index, so rounds differ in model init and data order, not in the task data. Read from the run:
- each CLI stage's wall time (its '=== [i/n] stage (N s elapsed) ===' banners), which add up to the stages'
  total; the pipeline's wall = the subprocess's, Ray start included ("Ray start" = wall - stages' total);
- each stage's own seconds from its `DONE.json` (the experts summed over their jobs, which overlap), the eval
  report's "timings" (the same manifests, as `eval/launch.py` writes them) and the eval stage's manifest seconds;
- how much eval scored: the test rows per task (the split eval reads, `eval.split`) and the models scored
  (each on its tasks: base, student, multitask, weight average on all, each expert on its group, the DUME MoE);
- the faults it survived (`end_to_end.log_faults`: out-of-memory task kills, restarts), which lengthen the
  training stages and so shrink eval's share.
Eval's share = eval stage wall / pipeline wall; also given against the stages' total (Ray start left out).
Ray's workers run at `RAY_worker_niceness=0` (set unless the environment sets it or --tiny; Ray's default is nice 15),
the priority of the `run` process that starts Ray, as docs/cluster.md advises on a shared machine: at nice 15 the
stages in Ray workers (training, eval) and those in the driver (Ray start) would run at different priorities.
Medians over rounds; load averages before and after each round. The run folder is deleted after each round
(~1 GB for SmolLM2). Goal (issue 16): eval <= 20% of the pipeline's wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, ray_workers_at_own_priority, result_path, write_result  # noqa: E402
from end_to_end import TINY_OVERRIDES, log_faults, ray_pipeline  # noqa: E402

sys.path.insert(0, REPO)
TARGET = 0.20  # issue 16: eval's share of the SmolLM2 pipeline's wall time


def eval_workload(config: str, overrides: list[str], run_dir: str) -> dict:
    """What the eval stage scored in this run: test rows per task (after the tasks' own row checks, with the
    run's tokenizer) and the models (labels) with the number of rows each generated for."""
    import json
    from dume_ray import manifest
    from dume_ray.config import load_config
    from dume_ray.model import load_tokenizer
    from dume_ray.tasks import load_tasks
    cfg = load_config(os.path.join(REPO, config), overrides)
    tokenizer = load_tokenizer(manifest.read_manifest(os.path.join(run_dir, "base"))["outputs"]["model"])
    rows = {name: len(task.examples(cfg.eval.split)) for name, task in load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len).items()}
    report = json.load(open(os.path.join(run_dir, "eval", "report.json")))
    group_of = {label: cfg.groups[label.split(":", 1)[1]] for label in report["scored_models"] if label.startswith("expert:")}
    models = {label: sum(rows[t] for t in group_of.get(label, cfg.tasks.names)) for label in report["scored_models"]}
    models.update({label: sum(rows.values()) for label in report.get("upcycle", {}).get("variants", {})})
    return {"split": cfg.eval.split, "rows_per_task": rows, "rows": sum(rows.values()), "models_scored": models,
            "rows_generated": sum(models.values()), "max_new_tokens": cfg.eval.max_new_tokens,
            "batch_size": cfg.eval.batch_size, "report_timings": report.get("timings", {})}


def run_round(config: str, overrides: list[str], runs_dir: str, seed: int) -> dict:
    """One fresh pipeline run with `seed`; its wall, per-stage seconds, eval's workload and share."""
    name = f"bench-eval-share-s{seed}"
    total, manifests, walls, _ = ray_pipeline(config, [*overrides, f"seed={seed}"], runs_dir, name)
    run_dir = os.path.join(runs_dir, name)
    workload = eval_workload(config, [*overrides, f"seed={seed}"], run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    stages_total = sum(walls.values())
    return {"seed": seed, "wall_seconds": total, "ray_start_seconds": total - stages_total,
            "stage_walls": walls, "stage_manifest_seconds": manifests, "eval": workload,
            "faults": log_faults(os.path.join(runs_dir, f"{name}.log")),
            "eval_share": walls["eval"] / total, "eval_share_of_stages": walls["eval"] / stages_total}


def summarize(rounds: list[dict]) -> tuple[str, dict]:
    """The per-stage table (medians over rounds; share of the pipeline's wall) and the median figures."""
    def med(get) -> float:
        return statistics.median(get(r) for r in rounds)

    wall = med(lambda r: r["wall_seconds"])
    rows = [["Ray start (process start to first stage)", f"{med(lambda r: r['ray_start_seconds']):.1f}",
             f"{med(lambda r: r['ray_start_seconds'] / r['wall_seconds']):.1%}"]]
    rows += [[stage, f"{med(lambda r: r['stage_walls'][stage]):.1f}", f"{med(lambda r: r['stage_walls'][stage] / r['wall_seconds']):.1%}"]
             for stage in rounds[0]["stage_walls"]]
    rows.append(["**pipeline wall**", f"{wall:.1f}", "100%"])
    per_round = ", ".join(f"{r['eval_share']:.1%}" for r in rounds)
    median = {"wall_seconds": wall, "eval_seconds": med(lambda r: r["stage_walls"]["eval"]),
              "eval_share": med(lambda r: r["eval_share"]), "eval_share_of_stages": med(lambda r: r["eval_share_of_stages"])}
    work = rounds[0]["eval"]
    table = markdown_table([f"stage wall (median of {len(rounds)} rounds)", "seconds", "share of the pipeline's wall"], rows)
    verdict = (f"eval = {median['eval_share']:.1%} of the pipeline's wall (rounds: {per_round}; "
               f"{median['eval_share_of_stages']:.1%} of the stages' total, Ray start left out); target <= {TARGET:.0%}: "
               f"{'met' if median['eval_share'] <= TARGET else 'NOT met'}. Eval scored {work['rows']} {work['split']} rows "
               f"({len(work['models_scored'])} models, {work['rows_generated']} generations of <= {work['max_new_tokens']} tokens)")
    return f"{table}\n\n{verdict}", median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="fresh pipeline runs (seeds 0..rounds-1); medians are reported")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every round")
    args = parser.parse_args(argv)
    started = time.time()
    overrides = list(args.overrides)
    if args.tiny:
        args.config, args.rounds = "configs/smoke/tiny.yaml", 1
        overrides = [*TINY_OVERRIDES, "upcycle.stats_examples_per_task=8", *overrides]
        args.out = args.out or result_path("eval_share", None, True)
        args.runs_dir = os.path.join(os.path.dirname(args.out), "runs")
    path = result_path("eval_share", args.out, args.tiny)
    niceness = ray_workers_at_own_priority(args.tiny)
    runs_dir = os.path.abspath(args.runs_dir)
    rounds, load = [], []
    for seed in range(args.rounds):  # one after another, each from scratch
        before = list(os.getloadavg())
        rounds.append(run_round(args.config, overrides, runs_dir, seed))
        load.append({"before": before, "after": list(os.getloadavg())})
        print(f"[eval_share] round {seed + 1}/{args.rounds}: wall {rounds[-1]['wall_seconds']:.0f} s, eval "
              f"{rounds[-1]['stage_walls']['eval']:.0f} s ({rounds[-1]['eval_share']:.1%}); load average (1, 5, 15 min) "
              f"{load[-1]}", flush=True)
        table, median = summarize(rounds)  # written after every round (partial until the last)
        write_result(path, "eval_share", command_line(), started,
                     {"config": args.config, "overrides": overrides, "ray_worker_niceness": niceness,
                      "rounds": rounds, "partial": len(rounds) < args.rounds,
                      "median": median, "eval_share": median["eval_share"], "target": TARGET,
                      "target_met": median["eval_share"] <= TARGET, "eval_test_rows": rounds[0]["eval"]["rows"],
                      "loadavg": load}, table)
    print(f"\n{table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
