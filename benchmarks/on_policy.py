"""On-policy against off-policy distillation at the same steps (issue 14 item 2), the on-policy setting chosen
on validation and the choice reported on test.

    python benchmarks/on_policy.py                                   # demo runs of select_defaults.py, seeds 0 1 2
    python benchmarks/on_policy.py --config configs/smollm2.yaml --seeds 0 --runs-dir runs/bench-on-policy \
        --set upcycle.enabled=false --out benchmarks/results/on_policy_smollm2.json
    python benchmarks/on_policy.py --config configs/smollm2.yaml --seeds 0 --runs-dir runs/bench-on-policy \
        --set upcycle.enabled=false multitask.enabled=false experts.optim.steps=20 distill.optim.steps=60 \
        distill.optim.checkpoint_every=30 --arms 0 0.5:end 0.25:end 0.5:end:generalized_jsd   # where the steps go
    python benchmarks/on_policy.py --tiny                            # smoke setting (seed 0, the 3 default arms), temp folder

For each seed S it runs the pipeline once (`python -m dume_ray run --config C seed=S name=select-sS
runs_dir=R eval.split=validation`; with the default R = runs/select the runs of benchmarks/select_defaults.py are
reused), then retrains only the student for each arm `LAMBDA[:SCHEDULE[:DIVERGENCE]]` (`distill.on_policy_ratio`,
`distill.on_policy_schedule` = interleaved | end, `distill.on_policy_divergence` = reverse_kl | generalized_jsd;
defaults interleaved, reverse_kl): lambda = 0 is the off-policy student, lambda > 0 turns that share of its
steps on-policy (the student answers the prompts, the prompt's expert scores its tokens), spread from step 0
(interleaved) or as the last steps (end). Same steps, batch, T and alpha for all. Each student is scored on
validation (its stage manifest, written by the training job) and on test (here, in-process, greedy decoding);
the arm is chosen on validation only ("chosen" over all arms, "best_on_policy" over the lambda > 0 ones: the
arm to run on more seeds). Also reported: the distill stage's wall time and the experts' scoring throughput.
Cells are cached in the output JSON (key: seed, arm), so an interrupted run resumes and
more seeds or arms can be added later (also from
another JSON of the same settings, --cells-from). Writes benchmarks/results/on_policy.json
(or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, command_line, fmt_pm, markdown_table, mean_std, ray_workers_at_own_priority, result_path,  # noqa: E402
                    write_result)
from select_defaults import TINY_OVERRIDES, choose, cli, run_arguments, tiny_or, validation_mean  # noqa: E402

sys.path.insert(0, REPO)


DIVERGENCES = ("reverse_kl", "generalized_jsd")


def parse_arm(text: str) -> tuple[float, str, str]:
    """"0.5:end:generalized_jsd" -> (0.5, "end", "generalized_jsd"); schedule and divergence may be left out."""
    from dume_ray.config import ON_POLICY_SCHEDULES
    parts = text.split(":")
    try:
        ratio = float(parts[0])
    except ValueError:
        raise argparse.ArgumentTypeError(f"arm {text!r}: lambda {parts[0]!r} is not a number") from None
    schedule = parts[1] if len(parts) > 1 else "interleaved"
    divergence = parts[2] if len(parts) > 2 else "reverse_kl"
    if not 0.0 <= ratio <= 1.0 or schedule not in ON_POLICY_SCHEDULES or divergence not in DIVERGENCES or len(parts) > 3:
        raise argparse.ArgumentTypeError(f"arm {text!r}: want LAMBDA in [0, 1][:SCHEDULE in {ON_POLICY_SCHEDULES}]"
                                         f"[:DIVERGENCE in {DIVERGENCES}]")
    return ratio, schedule, divergence


def arm_label(arm: tuple[float, str, str]) -> str:
    """The arm's name in the table and the cache: "0", "0.5", "0.5:end", "0.5:end:generalized_jsd"."""
    ratio, schedule, divergence = arm
    if ratio == 0:
        return "0"
    tail = [schedule] if schedule != "interleaved" or divergence != "reverse_kl" else []
    return ":".join([f"{ratio:g}", *tail, *([divergence] if divergence != "reverse_kl" else [])])


def test_mean(cfg_args: list[str], run_dir: str) -> float:
    """Mean test exact match of the run's student (the final report's split, read only for the table)."""
    from dume_ray.config import load_config
    from dume_ray.model import load_model, load_tokenizer
    from dume_ray.tasks import load_tasks
    from dume_ray.training import score_tasks
    cfg = load_config(cfg_args[0], cfg_args[1:])
    model_dir = os.path.join(run_dir, "student", "model")
    tokenizer = load_tokenizer(model_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    scores = score_tasks(load_model(model_dir), tokenizer, tasks, "test", cfg.eval.max_new_tokens,
                         cfg.eval.batch_size)["exact_match"]
    return sum(scores.values()) / len(scores)


def main() -> None:
    parser = run_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--arms", type=parse_arm, nargs="+", default=[parse_arm(a) for a in ("0", "0.5", "0.5:end")],
                        help="LAMBDA[:SCHEDULE[:DIVERGENCE]] each, e.g. 0 0.5 0.5:end 0.5:end:generalized_jsd")
    parser.add_argument("--cells-from", nargs="*", default=[],
                        help="other JSONs of this benchmark (same config and --set, e.g. one seed run in parallel "
                             "with --out elsewhere) whose cells count as cached")
    args = parser.parse_args()
    args.arms = list(dict.fromkeys(args.arms))
    args.seeds = tiny_or(args.seeds, args.tiny, [0], [0, 1, 2])  # --tiny: one seed; every arm's code path still runs
    started = time.time()
    # The pipeline's Ray workers at this process's priority (Ray's default is nice 15): on a machine other work
    # loads, the distill stage's seconds and the teachers' tokens/s then count the arms' own work.
    ray_workers_at_own_priority(args.tiny)
    out = result_path("on_policy", args.out, args.tiny)
    previous = json.load(open(out)) if os.path.exists(out) else {}
    cells = {}  # (seed, arm label) -> measures
    for other in [previous, *(json.load(open(path)) for path in args.cells_from)]:
        if other.get("cells") and (other.get("set", []) != args.set or other.get("config") != args.config):
            sys.exit(f"error: cached cells of {other.get('command')!r} were measured with another --config/--set")
        cells.update({(c["key"][0], cell_label(c["key"][1])): c["values"] for c in other.get("cells", [])})
    overrides = [*(TINY_OVERRIDES if args.tiny else []), *args.set, "eval.split=validation"]
    runs_dir = os.path.join(os.path.dirname(out), "runs") if args.tiny else args.runs_dir
    os.makedirs(runs_dir, exist_ok=True)

    def save() -> dict:
        payload = summarise(args, cells)
        write_result(out, "on_policy", command_line(), started, payload, payload["table"])
        return payload

    for seed in args.seeds:
        run = [f"seed={seed}", f"name=select-s{seed}", f"runs_dir={runs_dir}", *overrides]
        run_dir = os.path.join(runs_dir, f"select-s{seed}")
        log = os.path.join(runs_dir, f"on-policy-s{seed}.log")
        if any((seed, arm_label(arm)) not in cells for arm in args.arms):
            cli(["run", "--config", args.config, *run], log)  # skips every stage already done for this config
        for arm in args.arms:
            if (seed, arm_label(arm)) in cells:
                continue
            ratio, schedule, divergence = arm
            stage = [args.config, *run, f"distill.on_policy_ratio={ratio}", f"distill.on_policy_schedule={schedule}",
                     f"distill.on_policy_divergence={divergence}"]
            cli(["distill", "--config", *stage], log)
            done = json.load(open(os.path.join(run_dir, "student", "DONE.json")))
            metrics, seconds = done["metrics"], done.get("seconds") or 0.0  # the training job's own wall time
            multitask = os.path.join(run_dir, "multitask", "DONE.json")
            cells[(seed, arm_label(arm))] = {
                "validation": validation_mean(f"{run_dir}/student"),
                "multitask_validation": validation_mean(f"{run_dir}/multitask") if os.path.exists(multitask) else None,
                "test": test_mean(stage, run_dir), "distill_seconds": round(seconds, 1),
                "teachers": metrics.get("on_policy_teachers")}
            save()
    print(save()["table"], flush=True)


def cell_label(key) -> str:
    """A cached cell's arm label; the JSONs before arms keyed cells by lambda alone (interleaved, reverse KL)."""
    return key if isinstance(key, str) else arm_label((float(key), "interleaved", "reverse_kl"))


def summarise(args, cells: dict) -> dict:
    rows, validation = [], {}
    labels = [arm_label(arm) for arm in args.arms]
    for label in labels:
        measured = [cells[(s, label)] for s in args.seeds if (s, label) in cells]
        if not measured:
            continue
        validation[(label,)] = [m["validation"] for m in measured]
        speeds = [t["tokens_per_s"] for m in measured for t in (m["teachers"] or {}).values() if t.get("tokens_per_s")]
        rows.append([label, len(measured), fmt_pm([m["validation"] for m in measured]),
                     fmt_pm([m["test"] for m in measured]), fmt_pm([m["distill_seconds"] for m in measured], digits=0),
                     f"{sorted(speeds)[len(speeds) // 2]:.0f}" if speeds else "–"])
    chosen = best_on_policy = None
    if validation:
        best, ties = choose(validation)
        chosen = {"arm": best[0], "tied_with": [t[0] for t in ties if t != best]}
        on_policy = {k: v for k, v in validation.items() if k[0] != "0"}
        if on_policy:
            best_on_policy = max(on_policy, key=lambda k: mean_std(on_policy[k])[0])[0]
    table = markdown_table(["arm: lambda[:schedule[:divergence]]", "seeds", "student validation", "student test",
                            "distill stage (s)", "teacher tokens/s (median)"], rows)
    diffs = {}
    for label in [lab for lab in labels if lab != "0"]:
        for kind in ("validation", "test"):
            pairs = [cells[(s, label)][kind] - cells[(s, "0")][kind] for s in args.seeds
                     if (s, label) in cells and (s, "0") in cells]
            if pairs:
                diffs.setdefault(label, {})[kind] = pairs
    diff_rows = [[label, len(d["test"]), fmt_pm(d["validation"]), fmt_pm(d["test"])] for label, d in diffs.items()]
    if diff_rows:
        table += "\n\n" + markdown_table(["arm", "seeds", "validation: on − off-policy", "test: on − off-policy"],
                                          diff_rows)
    return {"config": args.config, "seeds": args.seeds, "arms": labels, "set": args.set, "table": table,
            "chosen": chosen, "best_on_policy_on_validation": best_on_policy,
            "difference_vs_off_policy": {label: {k: mean_std(v) for k, v in d.items()} for label, d in diffs.items()},
            "cells": [{"key": list(key), "values": values} for key, values in sorted(cells.items())]}


if __name__ == "__main__":
    main()
