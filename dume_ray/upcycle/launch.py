"""Driver of the `upcycle` stage: DUME, a training-free mixture-of-experts from the trained experts.

    python -m dume_ray upcycle --config configs/demo.yaml upcycle.ridge_lambda=0.01

`run_upcycle(cfg)` builds the MoE (averaged non-MLP weights, each layer's MLP an MoE of the experts' MLPs, see
`moe.py`) and the weight-averaging baseline, gathers the router statistics of each group in its own Ray task
(that group's expert forced at every layer over its training examples; the sums are added on the driver),
solves the ridge router (`router.py`) and saves everything to `runs/<name>/upcycle/`:

    moe/             the MoE: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    moe_plus/        DUME+ (only with upcycle.dume_plus_steps > 0): the MoE with the router refined for a few
                     steps of logistic regression on the routing targets, from the closed-form solution
    weight_average/  the dense weight average of all experts (plain Llama)
    router.pt        the summed statistics and both router solutions (raw, unit-length columns)

Skipped on rerun when its manifest matches (upcycle config + the experts' manifest hashes).
"""

from __future__ import annotations

import os
import time

import ray
import torch
from transformers import AutoModelForCausalLM

from dume_ray import manifest, storage
from dume_ray.config import PipelineConfig, TasksConfig
from dume_ray.experts.launch import finished_experts
from dume_ray.stage_hashes import pipeline_hashes, router_stats_hash
from dume_ray.model import check_same_vocab, load_model, load_tokenizer
from dume_ray.tasks import load_tasks
from dume_ray.upcycle.moe import average_weights, build_moe, count_active_parameters
from dume_ray.upcycle.router import finetune_router, solve_router, stats_from_groups, task_router_stats

DUME_PLUS_TOKENS_PER_GROUP = 8192  # MLP inputs per group kept as DUME+ training features


def run_upcycle(cfg: PipelineConfig) -> dict:
    stage_dir = f"{cfg.run_dir}/upcycle"
    if len(cfg.groups) < 2:
        raise manifest.StageInputError(f"upcycle needs at least 2 experts, but experts.groups gives 1 group "
                                       f"({list(cfg.groups)}): add groups, or set upcycle.enabled=false")
    experts = finished_experts(cfg)
    stage_hash = pipeline_hashes(cfg)["upcycle"]
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[upcycle] done already ({stage_dir}), skipping", flush=True)
        return manifest.read_manifest(stage_dir)
    manifest.clear(stage_dir)
    start = time.time()
    expert_dirs = {g: m["outputs"]["model"] for g, m in experts.items()}
    outputs = {"moe": f"{stage_dir}/moe", "weight_average": f"{stage_dir}/weight_average", "router": f"{stage_dir}/router.pt"}
    moe = build_and_save(expert_dirs, outputs, cfg)

    # ---- router statistics: one Ray task per group not already gathered, grown expert by expert -------------
    keep = DUME_PLUS_TOKENS_PER_GROUP if cfg.upcycle.dume_plus_steps > 0 else 0  # DUME+ also needs the inputs
    parts, inputs = router_statistics(cfg, outputs["moe"], f"{stage_dir}/router_stats", keep)
    stats = stats_from_groups([parts[g][:3] for g in cfg.groups])

    # ---- closed-form solve (both column modes, for the report), install the configured one, save ---------
    routers = {"raw": solve_router(stats, cfg.upcycle.ridge_lambda, normalize_columns=False),
               "normalized": solve_router(stats, cfg.upcycle.ridge_lambda, normalize_columns=True)}
    configured = routers["normalized" if cfg.upcycle.normalize_columns else "raw"]
    moe.set_router(configured)
    moe.save_pretrained(outputs["moe"])
    losses = []
    if keep:  # DUME+: a few steps of the routing objective from the closed-form solution
        routers["plus"], losses = finetune_router(configured, [inputs[g] for g in cfg.groups], cfg.upcycle.dume_plus_steps,
                                                  cfg.upcycle.dume_plus_lr)
        outputs["moe_plus"] = f"{stage_dir}/moe_plus"
        moe.set_router(routers["plus"])
        moe.save_pretrained(outputs["moe_plus"])
        load_tokenizer(expert_dirs[next(iter(expert_dirs))]).save_pretrained(outputs["moe_plus"])
        print(f"[upcycle] DUME+: {len(losses)} router steps, routing loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    torch.save({"gram": stats.gram, "cross": stats.cross, "tokens": stats.tokens, "routers": routers,
                "expert_names": list(cfg.groups), "ridge_lambda": cfg.upcycle.ridge_lambda}, outputs["router"])
    total, active = count_active_parameters(moe)
    metrics = {"parameters": total, "active_parameters_per_token": active, "router_tokens": dict(zip(cfg.groups, stats.tokens)),
               "experts_trained_mlp_only": cfg.experts.train_mlp_only, "dume_plus_losses": losses[:1] + losses[-1:],
               "router_stats_gathered": sorted(inputs) if keep else [g for g in cfg.groups if parts[g][3]],
               "router_stats_reused": [g for g in cfg.groups if not parts[g][3]]}
    print(f"[upcycle] MoE of {len(expert_dirs)} experts: {total:,} parameters, {active:,} active per token; "
          f"router from {sum(stats.tokens):,} tokens ({time.time() - start:.0f} s)", flush=True)
    return manifest.mark_done(stage_dir, stage_hash, outputs, metrics=metrics, inputs={"experts": expert_dirs},
                              seconds=time.time() - start)


def router_statistics(cfg: PipelineConfig, moe_dir: str, stats_dir: str, keep: int) -> tuple[dict, dict]:
    """{group: (gram, its column of B, tokens, gathered now?)} and, with keep > 0 (DUME+), {group: kept inputs}.
    A group's statistics stored under the same `router_stats_hash` are reused (not with DUME+, which needs the
    inputs themselves); the others are gathered, each in its own Ray task, and stored."""
    hashes = pipeline_hashes(cfg)
    expert_hashes = {g: hashes[f"experts/{g}"] for g in cfg.groups}
    keys = {g: router_stats_hash(cfg, expert_hashes, g) for g in cfg.groups}
    parts = {}
    for group in cfg.groups if not keep else []:
        path = f"{stats_dir}/{group}.pt"
        if os.path.exists(path) and (stored := torch.load(path))["key"] == keys[group]:
            parts[group] = (stored["gram"], stored["column"], stored["tokens"], False)
    todo = [(i, g) for i, g in enumerate(cfg.groups) if g not in parts]
    if parts:
        print(f"[upcycle] router statistics reused for {list(parts)}; gathering {[g for _, g in todo]}", flush=True)
    storage.push_path(moe_dir)  # with a storage URI: the tasks below may run on other nodes
    gather = ray.remote(num_cpus=1)(group_router_stats)
    refs = [gather.remote(moe_dir, cfg.tasks, cfg.groups[g], i, len(cfg.groups), cfg.upcycle.stats_examples_per_task,
                          cfg.upcycle.batch_size, cfg.model.max_seq_len, keep) for i, g in todo]
    inputs = {}
    os.makedirs(stats_dir, exist_ok=True)
    for (i, group), result in zip(todo, ray.get(refs)):
        stats, inputs[group] = result if keep else (result, None)
        parts[group] = (stats.gram, stats.cross[..., i], stats.tokens[i], True)
        path, tmp = f"{stats_dir}/{group}.pt", f"{stats_dir}/.{group}.pt.tmp-{os.getpid()}"
        torch.save({"key": keys[group], "gram": stats.gram, "column": stats.cross[..., i], "tokens": stats.tokens[i]}, tmp)
        os.replace(tmp, path)  # a crash never leaves a half-written file under the final name
    return parts, inputs


def build_and_save(expert_dirs: dict[str, str], outputs: dict, cfg: PipelineConfig) -> torch.nn.Module:
    """Load the experts, check they fit together, save the unrouted MoE and the weight average (+ tokenizer)."""
    names = list(expert_dirs)
    for name in names[1:]:
        try:
            check_same_vocab(expert_dirs[names[0]], expert_dirs[name])
        except ValueError as exc:
            raise ValueError(f"upcycle: experts {names[0]} and {name} have different vocabularies ({exc})") from exc
    experts = {g: load_model(d) for g, d in expert_dirs.items()}
    moe = build_moe(experts, top_k=cfg.upcycle.top_k, routing=cfg.upcycle.routing)
    tokenizer = load_tokenizer(expert_dirs[names[0]])
    for key, model in (("moe", moe), ("weight_average", average_weights(experts))):
        model.save_pretrained(outputs[key])
        tokenizer.save_pretrained(outputs[key])
    return moe


def group_router_stats(moe_dir: str, tasks_cfg: TasksConfig, names: list[str], group: int, num_groups: int,
                       per_task: int, batch_size: int, max_seq_len: int, keep_inputs: int = 0, threads: int = 1):
    """Router statistics of one group's training examples (its expert forced at every layer); with
    keep_inputs > 0 also up to that many tokens' MLP inputs per layer (for DUME+). A Ray task in `run_upcycle`:
    loads the saved MoE and the tasks, then `router.task_router_stats` (which works on a model in memory)."""
    torch.set_num_threads(threads)
    moe_dir = storage.ensure_local(moe_dir)
    tokenizer = load_tokenizer(moe_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, trust_remote_code=True)  # Llama- or Qwen2-based MoE
    return task_router_stats(model, tokenizer, load_tasks(tasks_cfg), names, group, num_groups, per_task, batch_size,
                             max_seq_len, keep_inputs)
