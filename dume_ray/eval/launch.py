"""Driver side of the `eval` stage: every model on every task's held-out split, then the report.

    python -m dume_ray eval --config configs/demo.yaml eval.split=test

Each model is scored in its own Ray task (greedy decoding, exact match), so models are evaluated in
parallel; the report goes to `<run>/eval/report.md`, `report.json` and `report.png`, and the table is printed.
"""

from __future__ import annotations

import os
import time

import ray

from dume_ray import manifest
from dume_ray.config import PipelineConfig, config_hash
from dume_ray.eval.report import build_report, plot_report, render_markdown
from dume_ray.experts.launch import _require
from dume_ray.model import load_model, load_tokenizer
from dume_ray.tasks import load_tasks
from dume_ray.training import evaluate_tasks


def run_eval(cfg: PipelineConfig) -> dict:
    stage_dir = f"{cfg.run_dir}/eval"
    models = models_to_score(cfg)  # {label: (model_dir, [task names], manifest hash)}
    stage_hash = config_hash("eval", cfg.eval, cfg.tasks, {k: v[2] for k, v in models.items()})
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[eval] done already ({stage_dir}), skipping", flush=True)
        found = manifest.read_manifest(stage_dir)
        print(open(found["outputs"]["markdown"]).read(), flush=True)
        return found
    start = time.time()
    score = ray.remote(num_cpus=1, num_gpus=cfg.eval.gpus_per_task)(_score_model)
    refs = {label: score.remote(model_dir, cfg.tasks, names, cfg.eval.split, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                "cuda" if cfg.eval.gpus_per_task > 0 else "cpu")
            for label, (model_dir, names, _) in models.items()}
    per_model = {label: ray.get(ref) for label, ref in refs.items()}

    scores = {"base": per_model.pop("base")}
    scores["experts"] = {t: s for label in list(per_model) if label.startswith("expert:") for t, s in per_model.pop(label).items()}
    scores.update(per_model)
    report = build_report(scores, cfg.tasks.names, cfg.eval.split, settings=_settings(cfg), timings=_timings(cfg))
    os.makedirs(stage_dir, exist_ok=True)
    outputs = {"json": f"{stage_dir}/report.json", "markdown": f"{stage_dir}/report.md", "chart": f"{stage_dir}/report.png"}
    manifest.write_json_atomic(outputs["json"], report)
    with open(outputs["markdown"], "w") as f:
        f.write(render_markdown(report))
    plot_report(report, outputs["chart"])
    print(render_markdown(report), flush=True)
    return manifest.mark_done(stage_dir, stage_hash, outputs, metrics={"means": report["means"]}, seconds=time.time() - start)


def models_to_score(cfg: PipelineConfig) -> dict[str, tuple[str, list[str], str]]:
    """Every finished model of the run: base and student/multitask on all tasks, each expert on its group."""
    base = _require(f"{cfg.run_dir}/base", "base")
    models = {"base": (base["outputs"]["model"], cfg.tasks.names, base["config_hash"])}
    for group, names in cfg.groups.items():
        found = _require(f"{cfg.run_dir}/experts/{group}", "experts")
        models[f"expert:{group}"] = (found["outputs"]["model"], names, found["config_hash"])
    for stage, command in (("student", "distill"), ("multitask", "multitask")):
        if stage == "multitask" and not cfg.multitask.enabled:
            continue
        found = _require(f"{cfg.run_dir}/{stage}", command)
        models[stage] = (found["outputs"]["model"], cfg.tasks.names, found["config_hash"])
    return models


def _score_model(model_dir: str, tasks_cfg, names: list[str], split: str, max_new_tokens: int, batch_size: int,
                 device: str = "cpu") -> dict:
    import torch
    torch.set_num_threads(1)
    tasks = load_tasks(tasks_cfg)
    return evaluate_tasks(load_model(model_dir).to(device), load_tokenizer(model_dir), {n: tasks[n] for n in names},
                          split, max_new_tokens, batch_size)


def _settings(cfg: PipelineConfig) -> dict:
    d = cfg.distill
    return {"groups": " | ".join(cfg.groups), "temperature": d.temperature, "alpha": d.alpha, "divergence": d.divergence,
            "teacher annealing": d.anneal, "top_k": cfg.soft_targets.top_k,
            "steps (base / each expert / student = multitask)": f"{cfg.base.optim.steps} / {cfg.experts.optim.steps} / {d.optim.steps}",
            "batch size (student = multitask)": d.optim.batch_size, "experts trained MLP-only": cfg.experts.train_mlp_only}


def _timings(cfg: PipelineConfig) -> dict:
    out = {}
    for stage in ("base", "soft_targets", "student", "multitask"):
        found = manifest.read_manifest(f"{cfg.run_dir}/{stage}")
        if found and found.get("seconds") is not None:
            out[stage] = found["seconds"]
    experts = [manifest.read_manifest(f"{cfg.run_dir}/experts/{g}") for g in cfg.groups]
    if all(experts):
        out["experts (sum over groups)"] = sum(m.get("seconds") or 0 for m in experts)
    return out


