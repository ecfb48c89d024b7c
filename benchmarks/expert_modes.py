"""Expert modes on a real model: all weights, MLP only, LoRA (all linear layers), LoRA (MLP only), side by side.

    python benchmarks/expert_modes.py                           # configs/smollm2.yaml: SmolLM2-135M, 4 word tasks
    python benchmarks/expert_modes.py --modes all_weights mlp_only --threads 2
    python benchmarks/expert_modes.py --tiny                    # smoke setting (2 layers, 2 tasks, 3 steps)

For each mode, in its own process (so its peak memory is its own), one expert per task is fine-tuned from the
imported base with the config's `experts.optim` (the same steps, batch and learning rate for every mode, except
LoRA's learning rate, `--lora-lr`), one after another on `--threads` threads. Then, from those experts, the DUME
MoE (`upcycle`: averaged trunk, per-layer MoE of the experts' MLPs, ridge router fitted on training examples
only) and the weight average. Every model is scored on the validation and the test split (exact match, and the
response-token loss where the forward pass is causal).

The table answers the real-model issue's question: which expert mode lets the MoE keep >= 95% of the mean exact
match of the all-weights dense experts (the strongest experts at the same steps). Choices (which mode the config
uses) are read off the validation columns; the test columns are the report. Time per step and peak memory (max
RSS of the mode's process, model loading included) come with each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
MODES = {  # name -> make_trainable keywords (lora_alpha = 2 x rank)
    "all_weights": {},
    "mlp_only": {"train_mlp_only": True},
    "lora": {"lora_rank": 16, "lora_alpha": 32.0},
    "lora_mlp": {"lora_rank": 16, "lora_alpha": 32.0, "train_mlp_only": True},
}
SPLITS = ("validation", "test")


def load_cfg(args):
    from dume_ray.config import load_config
    overrides = list(args.override)
    if args.tiny:
        overrides += ["model.keep_layers=2", "tasks.builtin=[reverse_words,upper_words]", "tasks.num_train=24",
                      "tasks.num_validation=8", "tasks.num_test=8", "experts.optim.steps=3", "experts.optim.warmup_steps=1",
                      "upcycle.stats_examples_per_task=8"]
    return load_config(args.config, overrides)


def run_mode(args) -> dict:
    """One mode in this process: train every task's expert, build the MoE and the weight average, score all."""
    import dataclasses

    import torch

    from dume_ray.model import load_model, load_tokenizer, make_trainable
    from dume_ray.search.proxy import train_expert
    from dume_ray.tasks import encode_rows, load_tasks
    from dume_ray.upcycle.launch import group_router_stats
    from dume_ray.upcycle.moe import average_weights, build_moe
    from dume_ray.upcycle.router import merge_stats, solve_router

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args)
    out = os.path.join(args.work, args.mode)
    base_dir = os.path.join(args.work, "base")
    tokenizer = load_tokenizer(base_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    optim = cfg.experts.optim
    if MODES[args.mode].get("lora_rank"):
        optim = dataclasses.replace(optim, lr=args.lora_lr)
    results: dict = {"mode": args.mode, "trainable": MODES[args.mode], "lr": optim.lr, "steps": optim.steps,
                     "batch_size": optim.batch_size, "scores": {}}

    # ---- experts, one after another; time per step over all of them ------------------------------------------
    experts, train_seconds = {}, 0.0
    for name in cfg.tasks.names:
        rows = encode_rows({name: tasks[name]}, tokenizer, "train", cfg.model.max_seq_len, {name: name})
        model = make_trainable(load_model(base_dir), **MODES[args.mode])
        start = time.time()
        train_expert(model, tokenizer, rows, optim, cfg.seed, os.path.join(out, name), cfg.model.dtype)
        train_seconds += time.time() - start
        experts[name] = load_model(os.path.join(out, name))
    results["seconds_per_step"] = train_seconds / (optim.steps * len(experts))
    results["trainable_parameters"] = sum(p.numel() for p in make_trainable(load_model(base_dir), **MODES[args.mode]).parameters()
                                          if p.requires_grad)
    for name, model in experts.items():
        _score(results, "experts", model, tokenizer, {name: tasks[name]}, cfg)

    # ---- DUME MoE (router from training examples only) and the weight average --------------------------------
    moe = build_moe(experts, top_k=cfg.upcycle.top_k, routing=cfg.upcycle.routing)
    moe_dir = os.path.join(out, "moe")
    moe.save_pretrained(moe_dir)
    tokenizer.save_pretrained(moe_dir)
    stats = merge_stats([group_router_stats(moe_dir, cfg.tasks, [name], i, len(experts), cfg.upcycle.stats_examples_per_task,
                                            cfg.upcycle.batch_size, cfg.model.max_seq_len, threads=args.threads)
                         for i, name in enumerate(experts)])
    moe.set_router(solve_router(stats, cfg.upcycle.ridge_lambda, normalize_columns=cfg.upcycle.normalize_columns))
    for i, name in enumerate(experts):
        moe.set_routing("forced", expert=i)
        _score(results, "oracle", moe, tokenizer, {name: tasks[name]}, cfg)
    for routing in args.routings:
        moe.set_routing(routing)
        _score(results, f"dume[{routing}]", moe, tokenizer, tasks, cfg, with_loss=routing != "whole_sequence")
    _score(results, "weight_average", average_weights(experts), tokenizer, tasks, cfg)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return results


def _score(results: dict, label: str, model, tokenizer, tasks: dict, cfg, with_loss: bool = True) -> None:
    from dume_ray.training import score_tasks
    for split in SPLITS:
        found = score_tasks(model, tokenizer, tasks, split, cfg.eval.max_new_tokens, cfg.eval.batch_size, with_loss=with_loss)
        entry = results["scores"].setdefault(label, {}).setdefault(split, {"exact_match": {}, "loss": {}})
        for metric in entry:
            entry[metric].update(found[metric])


def _mean(d: dict) -> float:
    return sum(d.values()) / len(d) if d else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs/smollm2.yaml"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per mode's process")
    parser.add_argument("--jobs", type=int, default=2, help="modes trained at once (one process each)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's learning rate (adapters need ~10x the full rate)")
    parser.add_argument("--override", nargs="*", default=[], help="key=value overrides of the config")
    parser.add_argument("--routings", nargs="+", default=["whole_sequence", "prompt"], help="DUME routings to score")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--work", default=None, help="folder for the imported base and the experts (default: a temp folder)")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = parser.parse_args()
    if args.mode:
        print("MODE_RESULT " + json.dumps(run_mode(args)), flush=True)
        return

    started = time.time()
    args.work = args.work or tempfile.mkdtemp(prefix="bench-expert-modes-")
    cfg = load_cfg(args)
    from dume_ray.model import create_initial_model
    if not os.path.isdir(os.path.join(args.work, "base")):
        create_initial_model(cfg.model, cfg.seed, os.path.join(args.work, "base"), cfg.data)
    per_mode, queue, running = {}, list(args.modes), {}
    while queue or running:  # up to --jobs modes at once, each in its own process
        while queue and len(running) < args.jobs:
            mode = queue.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--work", args.work, "--config", args.config,
                   "--threads", str(args.threads), "--lora-lr", str(args.lora_lr), "--routings", *args.routings] + (["--tiny"] if args.tiny else [])
            cmd += ["--override", *args.override] if args.override else []
            print(f"[expert_modes] {mode} ...", flush=True)
            log = open(os.path.join(args.work, f"{mode}.log"), "w")
            running[mode] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        mode = next((m for m, p in running.items() if p.poll() is not None), None)
        if mode is None:  # none finished yet (output goes to <work>/<mode>.log, so no pipe can fill up)
            time.sleep(2)
            continue
        proc = running.pop(mode)
        with open(os.path.join(args.work, f"{mode}.log")) as f:
            stdout = f.read()
        line = [l for l in stdout.splitlines() if l.startswith("MODE_RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"[expert_modes] {mode} failed (log {args.work}/{mode}.log):\n{stdout[-3000:]}")
        per_mode[mode] = json.loads(line[0][len("MODE_RESULT "):])
        print(f"[expert_modes] {mode} done ({time.time() - started:.0f} s)", flush=True)
    per_mode = {mode: per_mode[mode] for mode in args.modes}

    reference = per_mode.get("all_weights")
    ref_mean = {split: _mean(reference["scores"]["experts"][split]["exact_match"]) for split in SPLITS} if reference else {}
    rows, summary = [], {}
    for mode, r in per_mode.items():
        s = r["scores"]
        row = {"mode": mode, "s_per_step": r["seconds_per_step"], "peak_rss_gb": r["peak_rss_gb"],
               "trainable_parameters": r["trainable_parameters"]}
        for split in SPLITS:
            for label in ("experts", "oracle", "weight_average", *(f"dume[{g}]" for g in args.routings)):
                row[f"{label} {split}"] = _mean(s[label][split]["exact_match"])
                if label.startswith("dume") and ref_mean.get(split):
                    row[f"{label} % of all-weights experts {split}"] = 100 * row[f"{label} {split}"] / ref_mean[split]
        summary[mode] = row
        rows.append([mode, r["seconds_per_step"], r["peak_rss_gb"], f"{r['trainable_parameters']:,}", row["experts validation"],
                     row["experts test"], row["oracle test"], row["weight_average test"]]
                    + [x for g in args.routings for x in (row[f"dume[{g}] validation"], row[f"dume[{g}] test"],
                                                          row.get(f"dume[{g}] % of all-weights experts test"))])
    header = ["mode", "s/step", "peak GB", "trainable", "experts val", "experts test", "oracle test", "weight avg test"]
    header += [x for g in args.routings for x in (f"DUME {g} val", f"DUME {g} test", f"DUME {g} test, % of all-weights experts")]
    table = markdown_table(header, rows)
    print(table)
    write_result(result_path("expert_modes", args.out, args.tiny), "expert_modes", command_line(), started,
                 {"config": os.path.relpath(args.config, REPO), "threads": args.threads, "jobs": args.jobs, "summary": summary,
                  "per_mode": per_mode, "goal": "DUME >= 95% of the all-weights experts' mean exact match"}, table)


if __name__ == "__main__":
    main()
