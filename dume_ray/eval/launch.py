"""Driver side of the `eval` stage: every model on every task's held-out split, then the report.

    python -m dume_ray eval --config configs/demo.yaml eval.split=test

Each model is scored in its own Ray task (greedy decoding, exact match), so models are evaluated in
parallel; with `upcycle` on, so is each routing of the DUME MoE (per-token, sequence-mean, whole-sequence;
raw and unit-length router columns; oracle: each task with its own expert forced; random; DUME+) and the
weight average.
The report goes to `<run>/eval/report.md`, `report.json` and `report.png`, and the table is printed.
"""

from __future__ import annotations

import os
import time

import ray

from dume_ray import manifest, storage
from dume_ray.config import ROUTING_GRANULARITIES, PipelineConfig
from dume_ray.eval.report import build_report, plot_report, provenance, render_markdown
from dume_ray.model import load_model, load_tokenizer
from dume_ray.stage_hashes import eval_hash, parent_hash, pipeline_hashes, student_optim
from dume_ray.tasks import load_tasks
from dume_ray.training import score_tasks


def run_eval(cfg: PipelineConfig) -> dict:
    stage_dir = f"{cfg.run_dir}/eval"
    models = models_to_score(cfg)  # {label: (model_dir, [task names], manifest hash)}
    moe_runs = moe_runs_to_score(cfg)  # {label: (moe_dir, router.pt, routing mode, router variant, seed)}
    upcycle = manifest.read_manifest(f"{cfg.run_dir}/upcycle") if moe_runs else None
    stage_hash = eval_hash(cfg, {label: h for label, (_, _, h) in models.items()})
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[eval] done already ({stage_dir}), skipping", flush=True)
        found = manifest.read_manifest(stage_dir)
        print(open(found["outputs"]["markdown"]).read(), flush=True)
        return found
    start = time.time()
    score = ray.remote(num_cpus=1, num_gpus=cfg.eval.gpus_per_task)(_score_model)
    refs = {label: score.remote(model_dir, cfg.tasks, names, cfg.eval.split, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                cfg.model.max_seq_len, "cuda" if cfg.eval.gpus_per_task > 0 else "cpu", label)
            for label, (model_dir, names, _) in models.items()}
    score_moe = ray.remote(num_cpus=1, num_gpus=cfg.eval.gpus_per_task)(_score_moe_runs)
    expert_of = {t: i for i, names in enumerate(cfg.groups.values()) for t in names}  # task -> its expert column
    # The MoE is loaded once per Ray task, which then scores a share of the routings (one share per CPU).
    chunks = [score_moe.remote(moe_dir, router, runs, cfg.tasks, expert_of, cfg.eval.split, cfg.eval.max_new_tokens,
                               cfg.eval.batch_size, cfg.model.max_seq_len, "cuda" if cfg.eval.gpus_per_task > 0 else "cpu")
              for (moe_dir, router), runs in _moe_chunks(moe_runs, int(ray.cluster_resources().get("CPU", 1)))]
    results = {label: ray.get(ref) for label, ref in refs.items()}
    for chunk in chunks:
        results.update(ray.get(chunk))
    losses = {label: r["loss"] for label, r in results.items() if r["loss"]}
    per_model = {label: r["exact_match"] for label, r in results.items()}
    variants = {label: per_model.pop(label) for label in list(per_model) if label.startswith("dume[")}
    if variants:  # the configured DUME router is one of the variants: its row in the main table
        configured = _variant_label(cfg.upcycle.routing, cfg.upcycle.normalize_columns)
        per_model["dume"] = variants[configured]
        if configured in losses:
            losses["dume"] = losses[configured]
    losses["experts"] = {t: v for label in list(losses) if label.startswith("expert:") for t, v in losses.pop(label).items()}

    scores = {"base": per_model.pop("base")}
    scores["experts"] = {t: s for label in list(per_model) if label.startswith("expert:") for t, s in per_model.pop(label).items()}
    scores.update(per_model)
    tasks = load_tasks(cfg.tasks, load_tokenizer(models["base"][0]), cfg.model.max_seq_len)
    report = build_report(scores, cfg.tasks.names, cfg.eval.split, settings=_settings(cfg), timings=_timings(cfg),
                          upcycle=_upcycle_section(cfg, upcycle, variants) if upcycle else None,
                          num_examples={name: len(task.examples(cfg.eval.split)) for name, task in tasks.items()},
                          losses={label: v for label, v in losses.items() if not label.startswith("dume[") and v})
    report["scored_models"] = {label: {"model": model_dir, "config_hash": h} for label, (model_dir, _, h) in models.items()}
    report["faults"] = _faults(cfg)
    report["provenance"] = provenance({folder: manifest.read_manifest(f"{cfg.run_dir}/{folder}")
                                       for folder in stage_folders(cfg)}, manifest.RUN_ID)
    os.makedirs(stage_dir, exist_ok=True)
    outputs = {"json": f"{stage_dir}/report.json", "markdown": f"{stage_dir}/report.md", "chart": f"{stage_dir}/report.png"}
    manifest.write_json_atomic(outputs["json"], report)
    manifest.write_text_atomic(outputs["markdown"], render_markdown(report))
    plot_report(report, outputs["chart"])
    print(render_markdown(report), flush=True)
    return manifest.mark_done(stage_dir, stage_hash, outputs, metrics={"means": report["means"]}, seconds=time.time() - start)


def models_to_score(cfg: PipelineConfig) -> dict[str, tuple[str, list[str], str]]:
    """Every finished model of the run: base, student/multitask and the experts' weight average on all tasks,
    each expert on its group."""
    hashes = pipeline_hashes(cfg)
    base = manifest.require(f"{cfg.run_dir}/base", "base", hashes["base"])
    models = {"base": (base["outputs"]["model"], cfg.tasks.names, base["config_hash"])}
    for group, names in cfg.groups.items():
        found = manifest.require(f"{cfg.run_dir}/experts/{group}", "experts", hashes[f"experts/{group}"])
        models[f"expert:{group}"] = (found["outputs"]["model"], names, found["config_hash"])
    for stage, command in (("student", "distill"), ("multitask", "multitask")):
        if stage == "multitask" and not cfg.multitask.enabled:
            continue
        found = manifest.require(f"{cfg.run_dir}/{stage}", command, hashes[stage])
        models[stage] = (found["outputs"]["model"], cfg.tasks.names, found["config_hash"])
    if cfg.upcycle_active:
        found = manifest.require(f"{cfg.run_dir}/upcycle", "upcycle", hashes["upcycle"])
        models["weight_average"] = (found["outputs"]["weight_average"], cfg.tasks.names, found["config_hash"])
    return models


def moe_runs_to_score(cfg: PipelineConfig) -> dict[str, tuple]:
    """The upcycled models: DUME in 3 granularities x 2 column modes, oracle and random routing (+ DUME+)."""
    if not cfg.upcycle_active:
        return {}
    outputs = manifest.require(f"{cfg.run_dir}/upcycle", "upcycle", pipeline_hashes(cfg)["upcycle"])["outputs"]
    u = cfg.upcycle
    variants = [(g, n) for g in ROUTING_GRANULARITIES for n in (False, True)] if u.score_all_routings \
        else [(u.routing, u.normalize_columns)]
    runs = {_variant_label(g, n): (outputs["moe"], outputs["router"], g, "normalized" if n else "raw", 0) for g, n in variants}
    runs["oracle"] = (outputs["moe"], outputs["router"], "forced", None, 0)
    runs["random"] = (outputs["moe"], outputs["router"], "random", None, cfg.upcycle.random_seed)
    if "moe_plus" in outputs:  # DUME+: the fine-tuned routers, routed as configured
        runs["dume+"] = (outputs["moe_plus"], outputs["router"], cfg.upcycle.routing, None, 0)
    return runs


def _variant_label(granularity: str, normalized: bool) -> str:
    return f"dume[{granularity}{',normalized' if normalized else ''}]"


def _moe_chunks(moe_runs: dict[str, tuple], num_chunks: int) -> list[tuple[tuple[str, str], dict]]:
    """[((moe_dir, router_path), {label: (mode, variant, seed)})]: the runs of each MoE folder dealt round-robin
    into at most `num_chunks` shares, so each Ray task loads its MoE once."""
    by_model: dict[tuple[str, str], list] = {}
    for label, (moe_dir, router, mode, variant, seed) in moe_runs.items():
        by_model.setdefault((moe_dir, router), []).append((label, (mode, variant, seed)))
    chunks = []
    for key, runs in by_model.items():
        n = max(1, min(num_chunks, len(runs)))
        chunks += [(key, dict(runs[i::n])) for i in range(n)]
    return chunks


def _score_moe_runs(moe_dir: str, router_path: str, runs: dict[str, tuple], tasks_cfg, expert_of: dict, split: str,
                    max_new_tokens: int, batch_size: int, max_seq_len: int, device: str = "cpu") -> dict[str, dict]:
    """Routings of one MoE on every task: {label: {"exact_match": ..., "loss": ...}}; "forced" is the oracle (each
    task with its own group's expert). Whole-sequence and prompt routing look ahead within a full sequence, so
    their response loss is left out."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    moe_dir, router_path = storage.ensure_local(moe_dir), storage.ensure_local(router_path)
    tokenizer = load_tokenizer(moe_dir, trust_remote_code=True)
    tasks = load_tasks(tasks_cfg, tokenizer, max_seq_len)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, trust_remote_code=True).to(device)
    routers = torch.load(router_path)["routers"]
    configured = [layer.mlp.router.detach().clone() for layer in model.model.layers]  # as saved (DUME+ folders)
    results = {}
    for label, (mode, variant, seed) in runs.items():
        model.set_router(routers[variant].to(device) if variant is not None else torch.stack(configured))
        scores: dict = {"exact_match": {}, "loss": {}}
        for name in expert_of:
            model.set_routing(mode, expert=expert_of[name] if mode == "forced" else None, seed=seed)
            found = score_tasks(model, tokenizer, {name: tasks[name]}, split, max_new_tokens, batch_size, label=f"moe {label}",
                                with_loss=mode not in ("whole_sequence", "prompt"))
            for metric in scores:
                scores[metric].update(found[metric])
        results[label] = scores
    return results


def _upcycle_section(cfg: PipelineConfig, upcycle: dict, variants: dict) -> dict:
    student = manifest.read_manifest(f"{cfg.run_dir}/student")
    student_params = None
    if student:
        from dume_ray.model import count_parameters
        student_params = count_parameters(load_model(student["outputs"]["model"]))
    return {"variants": variants, "routing": cfg.upcycle.routing, "normalize_columns": cfg.upcycle.normalize_columns,
            "ridge_lambda": cfg.upcycle.ridge_lambda, "top_k": cfg.upcycle.top_k,
            "experts_trained_mlp_only": upcycle["metrics"].get("experts_trained_mlp_only"),
            "experts_mode": cfg.experts.mode,
            "moe_parameters": upcycle["metrics"].get("parameters"),
            "moe_active_parameters_per_token": upcycle["metrics"].get("active_parameters_per_token"),
            "student_parameters": student_params}


def _score_model(model_dir: str, tasks_cfg, names: list[str], split: str, max_new_tokens: int, batch_size: int,
                 max_seq_len: int, device: str = "cpu", label: str = "") -> dict:
    import torch
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(model_dir)
    tasks = load_tasks(tasks_cfg, tokenizer, max_seq_len)
    return score_tasks(load_model(model_dir).to(device), tokenizer, {n: tasks[n] for n in names}, split,
                       max_new_tokens, batch_size, label=label)


def _settings(cfg: PipelineConfig) -> dict:
    d = cfg.distill
    base_steps = cfg.base.optim.steps if cfg.base.enabled else "off (the model as loaded)"
    model = cfg.model.gguf or cfg.model.name_or_path
    settings = {"model": model + (f" (first {cfg.model.keep_layers} layers)" if cfg.model.keep_layers else ""),
                "chat template": cfg.data.chat_template, "groups": " | ".join(cfg.groups), "temperature": d.temperature,
                "alpha": d.alpha, "divergence": d.divergence, "teacher annealing": d.anneal, "top_k": cfg.soft_targets.top_k,
                "steps (base / each expert / student = multitask)": f"{base_steps} / {cfg.experts.optim.steps} / {d.optim.steps}",
                "batch size (student = multitask)": d.optim.batch_size, "experts train": cfg.experts.mode}
    if d.on_policy_ratio > 0:
        settings["on-policy (student only)"] = (f"{d.on_policy_ratio:.0%} of the steps ({d.on_policy_schedule}), {d.on_policy_divergence}, "
                                                f"{'sampled' if d.on_policy_sample else 'greedy'} answers")
    continued = [s for s in ("student", "multitask") if parent_hash(cfg, s)]
    if continued:  # add-task / remove-task with distill.after_edit=continue
        settings["continued after the task edit"] = (f"{' and '.join(continued)}, {student_optim(cfg, continued[0]).steps} "
                                                     f"more steps from the previous models (distill.after_edit=continue)")
    if cfg.base.tasks and cfg.base.enabled:  # a run that gained or lost tasks keeps its base
        settings["base pretrained on"] = " ".join(cfg.base.tasks)
    soft = (manifest.read_manifest(f"{cfg.run_dir}/soft_targets") or {}).get("metrics", {})
    if soft.get("reused"):  # what `add-task` / `remove-task` (or a rerun) did not redo
        settings["soft targets reused / scored in the last run"] = (f"{' '.join(soft['reused'])} / "
                                                                    f"{' '.join(soft.get('scored', [])) or 'none'}")
    upcycle = (manifest.read_manifest(f"{cfg.run_dir}/upcycle") or {}).get("metrics", {})
    if cfg.upcycle_active and upcycle.get("router_stats_reused"):
        settings["router statistics reused"] = " ".join(upcycle["router_stats_reused"])
    return settings


def stage_folders(cfg: PipelineConfig) -> list[str]:
    """Every stage folder the report is built from, per expert and soft-target group, in pipeline order."""
    return (["base", *(f"experts/{g}" for g in cfg.groups)] + (["upcycle"] if cfg.upcycle_active else [])
            + [f"soft_targets/groups/{g}" for g in cfg.groups] + ["student"] + (["multitask"] if cfg.multitask.enabled else []))


def _faults(cfg: PipelineConfig) -> dict:
    """What the run survived: training restarts (steps redone) per job, and bad rows skipped per task."""
    faults = {}
    for stage in ["base", *(f"experts/{g}" for g in cfg.groups), "student", "multitask"]:
        metrics = (manifest.read_manifest(f"{cfg.run_dir}/{stage}") or {}).get("metrics", {})
        if metrics.get("restarts"):
            faults[stage] = f"{metrics['restarts']} restart(s) from checkpoint, {metrics.get('steps_redone', 0)} steps redone"
    tokenizer = load_tokenizer(manifest.read_manifest(f"{cfg.run_dir}/base")["outputs"]["model"])
    for name, task in load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len).items():
        if any(task.skipped_rows.values()):
            faults[f"task {name}"] = f"rows dropped (tasks.skip_bad_rows / tasks.too_long): {task.skipped_rows}"
        if task.truncated_rows:
            faults[f"task {name} (truncated)"] = f"responses cut to model.max_seq_len (tasks.too_long=truncate): {task.truncated_rows}"
    return faults


def _timings(cfg: PipelineConfig) -> dict:
    out = {}
    for stage in ("base", "upcycle", "soft_targets", "student", "multitask"):
        found = manifest.read_manifest(f"{cfg.run_dir}/{stage}")
        if found and found.get("seconds") is not None:
            out[stage] = found["seconds"]
    experts = [manifest.read_manifest(f"{cfg.run_dir}/experts/{g}") for g in cfg.groups]
    if all(experts):
        out["experts (sum over groups)"] = sum(m.get("seconds") or 0 for m in experts)
    return out


