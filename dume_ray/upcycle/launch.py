"""Driver of the `upcycle` stage: DUME, a training-free mixture-of-experts from the trained experts.

    python -m dume_ray upcycle --config configs/demo.yaml upcycle.ridge_lambda=0.01

`run_upcycle(cfg)` builds the MoE (averaged non-MLP weights, each layer's MLP an MoE of the experts' MLPs, see
`moe.py`) and the weight-averaging baseline, gathers the router statistics of each group in its own Ray task
(that group's expert forced at every layer over its training examples; the sums are added on the driver),
solves the ridge router (`router.py`) and saves everything to `runs/<name>/upcycle/`:

    moe/             the MoE: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    moe_plus/        DUME+ (only with upcycle.dume_plus_steps > 0): the MoE after router-only fine-tuning
    weight_average/  the dense weight average of all experts (plain Llama)
    router.pt        the summed statistics and both router solutions (raw, unit-length columns)

Skipped on rerun when its manifest matches (upcycle config + the experts' manifest hashes).
"""

from __future__ import annotations

import os
import time

import ray
import torch

from dume_ray import manifest
from dume_ray.config import PipelineConfig, TasksConfig, config_hash
from dume_ray.data.encode import collate
from dume_ray.experts.launch import _require
from dume_ray.model import check_same_vocab, load_model, load_tokenizer
from dume_ray.tasks import encode_rows, load_tasks
from dume_ray.upcycle.moe import DumeMoEForCausalLM, average_weights, build_moe, count_active_parameters
from dume_ray.upcycle.router import collect_group_stats, finetune_router, merge_stats, solve_router


def run_upcycle(cfg: PipelineConfig) -> dict:
    stage_dir = f"{cfg.run_dir}/upcycle"
    experts = {g: _require(f"{cfg.run_dir}/experts/{g}", "experts") for g in cfg.groups}
    stage_hash = upcycle_hash(cfg, {g: m["config_hash"] for g, m in experts.items()})
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[upcycle] done already ({stage_dir}), skipping", flush=True)
        return manifest.read_manifest(stage_dir)
    manifest.clear(stage_dir)
    start = time.time()
    expert_dirs = {g: m["outputs"]["model"] for g, m in experts.items()}
    outputs = {"moe": f"{stage_dir}/moe", "weight_average": f"{stage_dir}/weight_average", "router": f"{stage_dir}/router.pt"}
    moe = build_and_save(expert_dirs, outputs, cfg)

    # ---- router statistics: one Ray task per group, summed here ------------------------------------------
    gather = ray.remote(num_cpus=1)(_group_stats)
    refs = [gather.remote(outputs["moe"], cfg.tasks, names, i, len(cfg.groups), cfg.upcycle.stats_examples_per_task,
                          cfg.upcycle.batch_size, cfg.model.max_seq_len) for i, names in enumerate(cfg.groups.values())]
    stats = merge_stats(ray.get(refs))

    # ---- closed-form solve (both column modes, for the report), install the configured one, save ---------
    routers = {"raw": solve_router(stats, cfg.upcycle.ridge_lambda, normalize_columns=False),
               "normalized": solve_router(stats, cfg.upcycle.ridge_lambda, normalize_columns=True)}
    moe.set_router(routers["normalized" if cfg.upcycle.normalize_columns else "raw"])
    moe.save_pretrained(outputs["moe"])
    torch.save({"gram": stats.gram, "cross": stats.cross, "tokens": stats.tokens, "routers": routers,
                "expert_names": list(cfg.groups), "ridge_lambda": cfg.upcycle.ridge_lambda}, outputs["router"])
    losses = []
    if cfg.upcycle.dume_plus_steps > 0:  # DUME+: fine-tune the routers only, from the closed-form solution
        outputs["moe_plus"] = f"{stage_dir}/moe_plus"
        losses = ray.get(ray.remote(num_cpus=1)(_dume_plus).remote(outputs["moe"], outputs["moe_plus"], cfg))
        print(f"[upcycle] DUME+: {len(losses)} router steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    total, active = count_active_parameters(moe)
    metrics = {"parameters": total, "active_parameters_per_token": active, "router_tokens": dict(zip(cfg.groups, stats.tokens)),
               "experts_trained_mlp_only": cfg.experts.train_mlp_only, "dume_plus_losses": losses[:1] + losses[-1:]}
    print(f"[upcycle] MoE of {len(expert_dirs)} experts: {total:,} parameters, {active:,} active per token; "
          f"router from {sum(stats.tokens):,} tokens ({time.time() - start:.0f} s)", flush=True)
    return manifest.mark_done(stage_dir, stage_hash, outputs, metrics=metrics, inputs={"experts": expert_dirs},
                              seconds=time.time() - start)


def upcycle_hash(cfg: PipelineConfig, expert_hashes: dict[str, str]) -> str:
    """The MoE depends on the upcycle config (the random-routing seed is eval's business), the experts and data."""
    knobs = (cfg.upcycle.ridge_lambda, cfg.upcycle.top_k, cfg.upcycle.normalize_columns, cfg.upcycle.routing,
             cfg.upcycle.stats_examples_per_task, cfg.upcycle.batch_size, cfg.upcycle.dume_plus_steps,
             cfg.upcycle.dume_plus_lr, cfg.seed)
    return config_hash("upcycle", knobs, cfg.tasks, cfg.model.max_seq_len, expert_hashes)


def build_and_save(expert_dirs: dict[str, str], outputs: dict, cfg: PipelineConfig) -> DumeMoEForCausalLM:
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


def _dume_plus(moe_dir: str, out_dir: str, cfg: PipelineConfig) -> list[float]:
    """Ray task: DUME+ router fine-tuning on the mixed training examples; saves the MoE to `out_dir`."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(moe_dir)
    model = DumeMoEForCausalLM.from_pretrained(moe_dir)
    tasks = load_tasks(cfg.tasks)
    rows = []
    for name in cfg.tasks.names:
        rows += encode_rows({name: tasks[name]}, tokenizer, "train", cfg.model.max_seq_len, {name: "g"})[:cfg.upcycle.stats_examples_per_task]
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            for i in torch.randperm(len(rows), generator=gen).split(cfg.upcycle.batch_size):
                yield collate([rows[j] for j in i.tolist()], tokenizer.pad_token_id)

    losses = finetune_router(model, batches(), cfg.upcycle.dume_plus_steps, cfg.upcycle.dume_plus_lr)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return losses


def _group_stats(moe_dir: str, tasks_cfg: TasksConfig, names: list[str], group: int, num_groups: int,
                 per_task: int, batch_size: int, max_seq_len: int):
    """Ray task: router statistics of one group's training examples (its expert forced at every layer)."""
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(moe_dir)
    model = DumeMoEForCausalLM.from_pretrained(moe_dir)
    tasks = load_tasks(tasks_cfg)
    rows = []
    for name in names:
        rows += encode_rows({name: tasks[name]}, tokenizer, "train", max_seq_len, {name: "g"})[:per_task]
    batches = (collate(rows[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size))
    return collect_group_stats(model, batches, group, num_groups)
