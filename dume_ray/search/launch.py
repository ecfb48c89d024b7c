"""Driver of the `search` stage: Ray Tune over task groupings x KD temperature x alpha.

    python -m dume_ray search --config configs/search.yaml [key=value ...]
    tensorboard --logdir runs/search/search/tune          # per-trial curves; the grouping is in the hparams
    python -m dume_ray run --config configs/demo.yaml grouping=from_search    # the full pipeline with the winner

`run_search(cfg)`: checks the space, trains the base (the pipeline's `base` stage), computes the gradient
affinity matrix of the tasks on the base once, then runs a `Tuner` whose trials (`search/worker.py`) each
train or reuse the experts of one grouping and run a short proxy distillation. Search algorithm: Tune's
`BasicVariantGenerator` (random search) seeded through `points_to_evaluate` with the default grouping (one
expert per task) and the groupings the affinity matrix ranks best; scheduler: `ASHAScheduler` on `val_mean`.
With `search.compare_random` the same budget is run a second time without affinity seeds, and the report
compares the best score after N trials. An interrupted experiment is resumed with `Tuner.restore`.
Outputs in `runs/<name>/search/`: `tune/` (Tune's experiment folders: TensorBoard, CSV, JSON),
`best.yaml`, `report.md`, `affinity.png`, `affinity.json`, `expert_cache/`, `DONE.json`.
"""

from __future__ import annotations

import os
import random
import time

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from dume_ray import manifest
from dume_ray.config import ConfigError, PipelineConfig, config_hash, to_dict
from dume_ray.data.encode import collate
from dume_ray.experts.launch import run_base
from dume_ray.model import load_model, load_tokenizer
from dume_ray.search.affinity import affinity_matrix, rank_groupings, save_heatmap, task_gradients
from dume_ray.search.partitions import RGS, count_partitions, decode, encode, iter_rgs, parse_readable, readable
from dume_ray.search.report import summarize_trials, write_report
from dume_ray.search.worker import search_trial
from dume_ray.tasks import encode_rows, load_tasks

# Trials report (and checkpoint) a few times a minute by design; Tune's warning about that is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
MAX_CHOICES = 20000  # groupings Tune picks among; beyond this list search.groupings or lower search.max_groups


def run_search(cfg: PipelineConfig) -> dict:
    stage_dir = f"{cfg.run_dir}/search"
    space = search_space(cfg)  # bad input fails here, before the base or any trial
    base = run_base(cfg)
    stage_hash = config_hash("search", base["config_hash"], cfg.search, cfg.experts, cfg.distill, cfg.soft_targets,
                             cfg.tasks, cfg.eval, cfg.seed)
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[search] done already: {stage_dir}/best.yaml, skipping", flush=True)
        return manifest.read_manifest(stage_dir)
    start, names = time.time(), cfg.tasks.names
    base_dir = os.path.abspath(base["outputs"]["model"])

    # ---- gradient affinity on the base, once; its best groupings seed the search ------------------------------
    matrix = compute_affinity(cfg, base_dir, stage_dir)
    seeds = [rgs for _, rgs in rank_groupings(matrix, cfg.search.num_affinity_seeds + 1, candidates=space)]
    default = {"grouping": readable([[t] for t in names]), "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
    seeds = [r for r in seeds if max(r) + 1 < len(names)][:cfg.search.num_affinity_seeds]  # the default is no seed
    seed_points = [{**default, "grouping": readable(decode(r, names))} for r in seeds]
    points = [default] if cfg.search.include_default else []
    experiments = {}
    if cfg.search.seed_with_affinity:
        experiments["seeded"] = points + seed_points
    if cfg.search.compare_random or not cfg.search.seed_with_affinity:
        experiments["random"] = points

    # ---- one Tune experiment per arm, same budget; trials share the expert cache --------------------------------
    setup = {"pipeline": to_dict(cfg), "base_dir": base_dir, "base_hash": base["config_hash"], "cwd": os.getcwd(),
             "cache_dir": os.path.abspath(cfg.search.cache_dir or f"{stage_dir}/expert_cache")}
    grids, seconds = {}, {}
    for arm, arm_points in experiments.items():
        arm_start = time.time()
        grids[arm] = fit_experiment(cfg, arm, space, arm_points, setup, f"{stage_dir}/tune", stage_hash)
        _check_finished(grids[arm], arm, cfg.search.num_samples)
        seconds[arm] = time.time() - arm_start
        print(f"[search] {arm}: {len(grids[arm])} trials in {seconds[arm]:.0f} s", flush=True)

    # ---- winner, report, manifest ------------------------------------------------------------------------------
    trials = {arm: summarize_trials(grid, max_reports=_max_reports(cfg)) for arm, grid in grids.items()}
    best = write_report(cfg, stage_dir, trials, matrix, seeds, seconds, default)
    print(f"[search] winner: {best['grouping']} T={best['temperature']:.3g} alpha={best['alpha']:.3g} "
          f"val_mean {best['val_mean']:.3f} (default {best['default_val_mean']}; {best['rule']}) -> {stage_dir}/best.yaml",
          flush=True)
    return manifest.mark_done(stage_dir, stage_hash, {"best": f"{stage_dir}/best.yaml", "report": f"{stage_dir}/report.md",
                                                      "tune": os.path.abspath(f"{stage_dir}/tune")},
                              metrics=best, inputs={"base": base_dir}, seconds=time.time() - start)


def search_space(cfg: PipelineConfig) -> list[RGS]:
    """The candidate groupings (restricted-growth strings over cfg.tasks.names) under the group cap.

    Raises:
        ConfigError: on an empty space, a grouping naming an unknown task, or too many groupings to list.
    """
    names, s = cfg.tasks.names, cfg.search
    cap = s.max_groups or len(names)
    if s.groupings:
        try:
            listed = [encode(parse_readable(text), names) for text in s.groupings]
        except ValueError as exc:
            raise ConfigError(f"search.groupings: {exc}") from exc
        space = list(dict.fromkeys(r for r in listed if max(r) + 1 <= cap))
    else:
        total = count_partitions(len(names), cap)
        if total > MAX_CHOICES:
            raise ConfigError(f"search: {total} groupings of {len(names)} tasks into at most {cap} groups is more than "
                              f"{MAX_CHOICES}; lower search.max_groups or list search.groupings")
        space = list(iter_rgs(len(names), cap))
    if not space:
        raise ConfigError(f"search: empty search space (no grouping with at most search.max_groups={cap} groups)")
    return space


def compute_affinity(cfg: PipelineConfig, base_dir: str, stage_dir: str) -> torch.Tensor:
    """Per-task gradients on the base -> cosine matrix; saved as affinity.json and affinity.png."""
    names, s = cfg.tasks.names, cfg.search
    tokenizer, model, tasks = load_tokenizer(base_dir), load_model(base_dir), load_tasks(cfg.tasks)
    torch.manual_seed(cfg.seed)
    batches = {}
    for name in names:
        rows = encode_rows({name: tasks[name]}, tokenizer, "train", cfg.model.max_seq_len, {name: name})
        random.Random(cfg.seed).shuffle(rows)
        size = min(s.affinity_batch_size, len(rows))
        batches[name] = [collate(rows[i * size:(i + 1) * size], tokenizer.pad_token_id)
                         for i in range(min(s.affinity_batches, max(1, len(rows) // size)))]
    gradients = task_gradients(model, batches)
    matrix = affinity_matrix([gradients[t] for t in names])
    os.makedirs(stage_dir, exist_ok=True)
    manifest.write_json_atomic(f"{stage_dir}/affinity.json", {"tasks": names, "matrix": matrix.tolist()})
    save_heatmap(matrix, names, f"{stage_dir}/affinity.png")
    print("[search] gradient affinity on the base (cosine; negative = conflict):\n"
          + "\n".join(f"  {t:>8} " + " ".join(f"{v:+.2f}" for v in row) for t, row in zip(names, matrix.tolist())), flush=True)
    return matrix


def fit_experiment(cfg: PipelineConfig, arm: str, space: list[RGS], points: list[dict], setup: dict,
                   storage: str, stage_hash: str):
    """One Tune experiment; resumed with `Tuner.restore` when an unfinished one with the same config exists."""
    s, names = cfg.search, cfg.tasks.names
    storage = os.path.abspath(storage)
    name = f"{arm}-{stage_hash[:8]}"  # a changed config starts a new experiment instead of resuming a stale one
    trainable = tune.with_resources(tune.with_parameters(search_trial, setup=setup),
                                    {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    if tune.Tuner.can_restore(os.path.join(storage, name)):
        print(f"[search] {arm}: resuming {storage}/{name} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(os.path.join(storage, name), trainable=trainable, resume_errored=True).fit()
    t_low, t_high = s.temperature
    a_low, a_high = s.alpha
    param_space = {"grouping": tune.choice([readable(decode(r, names)) for r in space]),
                   "temperature": tune.loguniform(t_low, t_high) if t_low < t_high else t_low,
                   "alpha": tune.uniform(a_low, a_high) if a_low < a_high else a_low}
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="val_mean", mode="max", num_samples=s.num_samples,
            search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.seed,
                                             max_concurrent=s.max_concurrent_trials),
            scheduler=ASHAScheduler(max_t=_max_reports(cfg), grace_period=min(s.grace_period, _max_reports(cfg)),
                                    reduction_factor=s.reduction_factor),
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    return tuner.fit()


def _check_finished(grid, arm: str, num_samples: int) -> None:
    """Tune returns from `fit()` on Ctrl-C too: stop there (no best.yaml, no manifest) so a rerun restores."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    open_trials = [t for t in trials if getattr(t, "status", "TERMINATED") not in ("TERMINATED", "ERROR")]
    if len(grid) < num_samples or open_trials:
        raise RuntimeError(f"search arm '{arm}' stopped with {len(grid)}/{num_samples} trials created and "
                           f"{len(open_trials)} unfinished; rerun the same command to resume it (Tuner.restore)")


def _max_reports(cfg: PipelineConfig) -> int:
    return -(-cfg.search.proxy_steps // cfg.search.report_every)

