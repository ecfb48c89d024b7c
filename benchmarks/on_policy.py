"""On-policy against off-policy distillation at the same steps (issue 14 item 2), the share lambda chosen on
validation and the choice reported on test.

    python benchmarks/on_policy.py                                   # demo runs of select_defaults.py, seeds 0 1 2
    python benchmarks/on_policy.py --config configs/smollm2.yaml --seeds 0 --runs-dir runs/bench-on-policy \
        --set upcycle.enabled=false --out benchmarks/results/on_policy_smollm2.json
    python benchmarks/on_policy.py --tiny                            # smoke setting, temp folder

For each seed S it runs the pipeline once (`python -m dume_ray run --config C seed=S name=select-sS
runs_dir=R eval.split=validation`; with the default R = runs/select the runs of benchmarks/select_defaults.py are
reused), then retrains only the student for each lambda (`distill.on_policy_ratio`): lambda = 0 is the off-policy
student, lambda > 0 turns that share of its steps on-policy (the student answers the prompts, the prompt's expert
scores its tokens, reverse KL). Same steps, batch, T and alpha for all. Each student is scored on validation
(its stage manifest, written by the training job) and on test (here, in-process, greedy decoding); lambda is
chosen on validation only. Also reported: the distill stage's wall time and the experts' scoring throughput.
Cells are cached in the output JSON, so an interrupted run resumes. Writes benchmarks/results/on_policy.json
(or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, fmt_pm, markdown_table, mean_std, result_path, write_result  # noqa: E402
from select_defaults import TINY_OVERRIDES, choose, cli, run_arguments, validation_mean  # noqa: E402

sys.path.insert(0, REPO)


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
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    args = parser.parse_args()
    started = time.time()
    out = result_path("on_policy", args.out, args.tiny)
    previous = json.load(open(out)) if os.path.exists(out) else {}
    cells = {tuple(c["key"]): c["values"] for c in previous.get("cells", [])}  # (seed, lambda) -> measures
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
        if any((seed, ratio) not in cells for ratio in args.ratios):
            cli(["run", "--config", args.config, *run], log)  # skips every stage already done for this config
        for ratio in args.ratios:
            if (seed, ratio) in cells:
                continue
            stage = [args.config, *run, f"distill.on_policy_ratio={ratio}"]
            cli(["distill", "--config", *stage], log)
            done = json.load(open(os.path.join(run_dir, "student", "DONE.json")))
            metrics, seconds = done["metrics"], done.get("seconds") or 0.0  # the training job's own wall time
            cells[(seed, ratio)] = {"validation": validation_mean(f"{run_dir}/student"),
                                    "multitask_validation": validation_mean(f"{run_dir}/multitask"),
                                    "test": test_mean(stage, run_dir), "distill_seconds": round(seconds, 1),
                                    "teachers": metrics.get("on_policy_teachers")}
            save()
    print(save()["table"], flush=True)


def summarise(args, cells: dict) -> dict:
    rows, validation = [], {}
    for ratio in args.ratios:
        measured = [cells[(s, ratio)] for s in args.seeds if (s, ratio) in cells]
        if not measured:
            continue
        validation[(ratio,)] = [m["validation"] for m in measured]
        speeds = [t["tokens_per_s"] for m in measured for t in (m["teachers"] or {}).values() if t.get("tokens_per_s")]
        rows.append([f"{ratio:g}", len(measured), fmt_pm([m["validation"] for m in measured]),
                     fmt_pm([m["test"] for m in measured]), fmt_pm([m["distill_seconds"] for m in measured], digits=0),
                     f"{sorted(speeds)[len(speeds) // 2]:.0f}" if speeds else "–"])
    chosen = None
    if validation:
        best, ties = choose(validation)
        chosen = {"on_policy_ratio": best[0], "tied_with": [t[0] for t in ties if t != best]}
    table = markdown_table(["lambda (on-policy share)", "seeds", "student validation", "student test",
                            "distill stage (s)", "teacher tokens/s (median)"], rows)
    off = {s: cells[(s, 0.0)]["test"] for s in args.seeds if (s, 0.0) in cells}
    diffs = {r: [cells[(s, r)]["test"] - off[s] for s in off if (s, r) in cells] for r in args.ratios if r > 0}
    diff_rows = [[f"{r:g}", len(d), fmt_pm(d)] for r, d in diffs.items() if d]
    if diff_rows:
        table += "\n\n" + markdown_table(["lambda", "seeds", "test: on-policy − off-policy student"], diff_rows)
    return {"config": args.config, "seeds": args.seeds, "ratios": args.ratios, "table": table, "chosen": chosen,
            "test_difference_vs_off_policy": {str(r): mean_std(d) for r, d in diffs.items() if d},
            "cells": [{"key": list(key), "values": values} for key, values in sorted(cells.items())]}


if __name__ == "__main__":
    main()
