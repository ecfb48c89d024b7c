"""Add tasks to, or remove tasks from, an existing run: its saved config, edited so that rerunning the pipeline
retrains only what the change touches.

    python -m dume_ray add-task --run runs/demo --task shift
    python -m dume_ray add-task --run runs/demo --source '{name: faq, source: jsonl, data_files: {train: faq.jsonl, validation: faq_val.jsonl, test: faq_test.jsonl}}'
    python -m dume_ray remove-task --run runs/demo --task sub
    python -m dume_ray add-task --run s3://bucket/prefix/demo --task shift    # a run on storage (`storage=`)

`--run` is the run's local folder, or its place on storage (`<storage>/<name>`) when it has one: then its
config.yaml is read from there, so any node can edit a run, with or without a working copy of it (the CLI
pulls the stored stages before deciding what to redo).

An expert and its soft targets depend on their own group's tasks only (`stage_hashes.task_data`), so with the
edited config the `run` that follows trains one new expert and scores one new group (adding), or drops one
(removing); the others are reused from their manifests. The base stays as it was: its tasks are pinned in
`base.tasks` (a base pretrained on the old mixture is still every old expert's starting point). The student
and the multitask baseline are trained again, since their data changed: with `distill.after_edit=continue` (the
default) each continues from the run's finished model for `distill.continue_steps` steps on the old + new soft
targets (`distill.continue_from` records the parent's stage hash, `parent_model` finds its weights), with
`retrain` each starts from the init. The report is redone. With `experts.groups` written out, an added task
gets a group of its own and a removed one leaves its group. Pure: no Ray here; the CLI runs the stages.
Tested in tests/unit/test_run_edit.py.
"""

from __future__ import annotations

import os
import tempfile

from omegaconf import OmegaConf

from dume_ray import manifest, storage
from dume_ray.config import BUILTIN_TASK_NAMES, ConfigError, ContinueFromConfig, PipelineConfig, load_config, to_dict


def edited_config(run: str, add_tasks: list[str] = (), add_sources: list[str] = (), remove: list[str] = (),
                  overrides: list[str] = ()) -> PipelineConfig:
    """The config.yaml of the run `run` (a local run folder or a storage URI, `run_config`) with built-in tasks
    `add_tasks`, user task sources `add_sources` (each a YAML mapping as in `tasks.sources`) added and the tasks
    named in `remove` removed; ConfigError naming the task or file at fault, before anything is written."""
    cfg = run_config(run)
    run_dir = cfg.run_dir
    if not (add_tasks or add_sources or remove):
        raise ConfigError("nothing to do: name a task to add (--task / --source) or to remove (--task)")
    names = cfg.tasks.names
    new = to_dict(cfg)
    sources = [_parse_source(text) for text in add_sources]
    for name in list(add_tasks) + [s.get("name") for s in sources]:
        if name in names:
            raise ConfigError(f"{run_dir}: task {name!r} is already in this run (tasks: {names})")
    for name in add_tasks:
        if name not in BUILTIN_TASK_NAMES:
            raise ConfigError(f"--task {name!r}: not a built-in task ({BUILTIN_TASK_NAMES}); a task of your own "
                              f"goes in with --source")
    for name in remove:
        if name not in names:
            raise ConfigError(f"{run_dir}: cannot remove task {name!r}: not in this run (tasks: {names})")
    removed_sources = [s for s in cfg.tasks.sources if s.name in remove]
    if removed_sources and cfg.base.enabled and not cfg.base.tasks:
        raise ConfigError(f"cannot remove user task(s) {[s.name for s in removed_sources]}: the base was pretrained on "
                          f"them and keeping the base needs their data; rerun from scratch with the task left out")
    if cfg.base.enabled and not cfg.base.tasks:
        new["base"]["tasks"] = names  # the base keeps the mixture it was trained on
    new["tasks"]["builtin"] = [t for t in cfg.tasks.builtin if t not in remove] + list(add_tasks)
    new["tasks"]["sources"] = [s for s in new["tasks"]["sources"] if s["name"] not in remove] + sources
    if cfg.experts.groups:
        kept = [[t for t in group if t not in remove] for group in cfg.experts.groups]
        new["experts"]["groups"] = [g for g in kept if g] + [[t] for t in list(add_tasks) + [s["name"] for s in sources]]
    if cfg.search.groupings:
        new["search"]["groupings"] = []  # they partition the old task list
    merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.create(new))
    with tempfile.TemporaryDirectory() as scratch:  # nothing is written into the run folder here
        edited_path = os.path.join(scratch, f"{cfg.name}.edited.yaml")
        OmegaConf.save(merged, edited_path)
        edited = load_config(edited_path, list(overrides))
    edited.distill.continue_from = finished_students(run_dir, edited)
    return edited


def run_config(run: str) -> PipelineConfig:
    """The config a run was made with: `<run>/config.yaml` of a local run folder, or of a run on storage
    (`run` = `<storage>/<name>`, read with pyarrow.fs); ConfigError naming the folder or URI when it holds no run
    or the config there belongs to another run folder."""
    if not storage.is_uri(run):
        path = os.path.join(run, "config.yaml")
        if not os.path.isfile(path):
            raise ConfigError(f"{run}: not a dume_ray run folder (no config.yaml); run the pipeline first")
        cfg = load_config(path)
        if os.path.abspath(cfg.run_dir) != os.path.abspath(run):
            raise ConfigError(f"{path}: this config belongs to the run folder {cfg.run_dir}, not {run}")
        return cfg
    text = storage.read_text(run, "config.yaml")
    if text is None:
        raise ConfigError(f"{run}: no dume_ray run there (no config.yaml); check the URI (<storage>/<name>)")
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "config.yaml")
        with open(path, "w") as f:
            f.write(text)
        cfg = load_config(path)
    stored_at = storage.RunStorage.for_run(cfg.storage, cfg.name, cfg.run_dir).uri if cfg.storage else ""
    if stored_at.split("?")[0].rstrip("/") != run.split("?")[0].rstrip("/"):
        raise ConfigError(f"{run}/config.yaml: this config belongs to the run {stored_at or cfg.run_dir}, not {run}")
    return cfg


STUDENT_STAGES = ("student", "multitask")


def finished_students(run_dir: str, cfg: PipelineConfig) -> ContinueFromConfig:
    """With `distill.after_edit=continue`, the stage hashes of the run's finished student and baseline (those
    with a manifest and a model folder), which the edited run continues; none with `retrain`."""
    found = ContinueFromConfig()
    if cfg.distill.after_edit != "continue":
        return found
    for stage in STUDENT_STAGES:
        done = manifest.read_manifest(os.path.join(run_dir, stage))
        if done and os.path.isdir(done.get("outputs", {}).get("model", "")) and (stage == "student" or cfg.multitask.enabled):
            setattr(found, stage, done["config_hash"])
    return found


def parent_folder(cfg: PipelineConfig, stage: str) -> str:
    """Where a continued stage keeps its parent's weights while it trains (hard links, so no extra disk)."""
    return f"{cfg.run_dir}/{stage}/parent-{getattr(cfg.distill.continue_from, stage)}"


def parent_model(cfg: PipelineConfig, stage: str) -> str:
    """The weights `stage` ("student" or "multitask") continues from: its parent folder when a run already set
    it aside, else the stage's finished model while its manifest still has the parent's hash; "" when the
    stage is not continued. StageInputError when the parent is gone (e.g. replaced by a later training)."""
    parent = getattr(cfg.distill.continue_from, stage)
    if not parent:
        return ""
    if os.path.isdir(parent_folder(cfg, stage)):
        return parent_folder(cfg, stage)
    done = manifest.read_manifest(f"{cfg.run_dir}/{stage}")
    if done and done.get("config_hash") == parent and os.path.isdir(done.get("outputs", {}).get("model", "")):
        return done["outputs"]["model"]
    raise manifest.StageInputError(
        f"distill.continue_from.{stage}={parent}: that {stage} is no longer in {cfg.run_dir}/{stage} (found hash "
        f"{(done or {}).get('config_hash')}); set distill.continue_from.{stage}='' to train it from the init")


def _parse_source(text: str) -> dict:
    try:
        source = OmegaConf.to_container(OmegaConf.create(text))
    except Exception as exc:  # noqa: BLE001 - any YAML error names the argument
        raise ConfigError(f"--source {text!r}: not a YAML mapping: {exc}") from exc
    if not isinstance(source, dict) or "name" not in source:
        raise ConfigError(f"--source {text!r}: must be a mapping with at least name and source, as in tasks.sources")
    return source
