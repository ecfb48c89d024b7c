"""Command line: `python -m dume_ray <stage> --config FILE [key=value ...]`.

    python -m dume_ray run --config configs/demo.yaml                 # every stage, skipping finished ones
    python -m dume_ray experts --config configs/demo.yaml experts.optim.steps=500
    python -m dume_ray search --config configs/search.yaml             # Ray Tune: groupings x T x alpha
    python -m dume_ray run --config configs/demo.yaml grouping=from_search   # pipeline with the search's winner
    python -m dume_ray --help

Each stage reads earlier stages' outputs from `runs/<name>/` and can be rerun on its own. The resolved
config is printed and saved as `runs/<name>/config.yaml`. Inputs are checked (tasks, columns, lengths,
tokenizer) before any training starts. Ray is started locally, or joined when RAY_ADDRESS is set (as under
`ray job submit`) or `ray_address` is configured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dume_ray.config import ConfigError, PipelineConfig, load_config, to_yaml
from dume_ray.resources import ResourceShortage
from dume_ray.manifest import StageInputError, write_text_atomic

QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAY_DEDUP_LOGS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def _stages():
    from dume_ray.distill.launch import run_distill, run_distill_and_multitask, run_multitask
    from dume_ray.eval.launch import run_eval
    from dume_ray.experts.launch import run_base, run_experts
    from dume_ray.search.launch import run_search
    from dume_ray.soft_targets.launch import run_soft_targets
    from dume_ray.upcycle.launch import run_upcycle
    return {"base": run_base, "experts": run_experts, "upcycle": run_upcycle, "soft-targets": run_soft_targets,
            "distill": run_distill, "multitask": run_multitask, "distill+multitask": run_distill_and_multitask,
            "eval": run_eval, "search": run_search}


STAGE_HELP = {
    "run": "the whole pipeline: base → experts → upcycle → soft-targets → distill + multitask (side by side) → eval",
    "base": "briefly pretrain the starting model on the task mixture (shared starting point of the experts)",
    "experts": "fine-tune one expert per task group from the base (Ray Train, groups run concurrently)",
    "upcycle": "DUME: a training-free MoE from the experts (averaged trunk, MoE of their MLPs, ridge router)",
    "soft-targets": "experts score their groups' training examples: top-k soft targets as Parquet (Ray Data)",
    "distill": "train the student on the soft-target stream: KD at temperature T + CE (Ray Train)",
    "multitask": "the baseline: same student, data, optimiser and steps, plain mixed CE (Ray Train)",
    "eval": "score every model on the held-out split; write report.md/json/png and print the table",
    "search": "Ray Tune over task groupings x temperature x alpha (proxy runs on validation) -> search/best.yaml",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dume_ray", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=None, help="YAML config (default: the embedded demo defaults)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.temperature=4")
    for name, text in EDIT_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--run", required=True, help="the run folder to change, e.g. runs/demo (its config.yaml)")
        p.add_argument("--task", action="append", default=[], help="a built-in task name (repeatable)")
        if name == "add-task":
            p.add_argument("--source", action="append", default=[],
                           help="a task of your own, as a YAML mapping like an entry of tasks.sources (repeatable)")
        p.add_argument("overrides", nargs="*", help="key=value overrides on top of the run's config")
    return parser.parse_args(argv)


EDIT_HELP = {
    "add-task": "add task(s) to a run, then rerun it: trains one new expert per added task and scores its soft "
                "targets only; the others are reused",
    "remove-task": "remove task(s) from a run, then rerun it: the other experts and soft targets are reused",
}


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """The config the command runs with: the YAML plus overrides, or for add-task / remove-task the run's own
    config edited (`run_edit.py`)."""
    if args.stage in EDIT_HELP:
        from dume_ray.run_edit import edited_config
        adding = args.stage == "add-task"
        return edited_config(args.run, add_tasks=args.task if adding else [], add_sources=getattr(args, "source", []),
                             remove=[] if adding else args.task, overrides=args.overrides)
    return load_config(args.config, args.overrides)


def preflight(cfg: PipelineConfig) -> None:
    """Fail before any training on bad tasks, columns, lengths, a missing or unsupported model, or a chat
    template asked of a tokenizer that has none."""
    from dume_ray.model import load_source_tokenizer, model_type_of
    from dume_ray.tasks import SPLITS, encode_rows, load_tasks
    from dume_ray.upcycle.moe import check_supported_model_type

    if cfg.upcycle_active:
        check_supported_model_type(model_type_of(cfg.model), "upcycle.enabled=true")
    tokenizer = load_source_tokenizer(cfg.model, cfg.data)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    group_of = {t: g for g, names in cfg.groups.items() for t in names}
    for split in SPLITS:
        encode_rows(tasks, tokenizer, split, cfg.model.max_seq_len, group_of)
    for what, counts in (("dropped", {n: t.skipped_rows for n, t in tasks.items() if any(t.skipped_rows.values())}),
                         ("truncated", {n: t.truncated_rows for n, t in tasks.items() if t.truncated_rows})):
        if counts:
            print(f"[preflight] {what} rows (tasks.skip_bad_rows / tasks.too_long={cfg.tasks.too_long}, "
                  f"model.max_seq_len={cfg.model.max_seq_len}): {counts}", flush=True)
    print(f"[preflight] {len(tasks)} tasks, {len(cfg.groups)} expert groups: {' | '.join(cfg.groups)}", flush=True)


def init_ray(cfg: PipelineConfig) -> bool:
    """Start a local Ray, or join RAY_ADDRESS / `ray_address`; True when joined to an existing cluster."""
    import ray
    import ray.data
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    # Variables already in this process's environment reach the workers anyway (a `ray job submit`'s own
    # env_vars, or the shell's for a local Ray), and Ray refuses a job whose driver repeats one of its keys.
    env_vars = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    os.environ.update(QUIET_ENV)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"[ray] {'joined ' + address if address else 'started a local Ray'}: {ray.cluster_resources()}", flush=True)
    return bool(address)


def wait_for_resources(cfg: PipelineConfig, stages: list[str], joined: bool) -> None:
    """Fail with a readable error when a stage's job can never be scheduled, instead of Ray waiting forever.

    On a joined cluster an autoscaler may add nodes: ask it for the largest job (`request_resources`) and give
    it `resource_wait_s` seconds. A local Ray started here never grows, so there the check is immediate.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    from dume_ray.resources import explain, resource_problems, stage_jobs

    shapes = stage_jobs(cfg, stages)
    timeout = cfg.resource_wait_s if joined else 0.0
    start, requested = time.time(), False
    while True:
        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
        problems = resource_problems(shapes, nodes)
        if not problems or time.time() - start >= timeout:
            break
        if not requested:
            request_resources(bundles=max(shapes.values(), key=lambda b: sum(sum(x.values()) for x in b)))
            requested = True
            print(f"[ray] waiting up to {timeout:.0f} s for the cluster to provide: {'; '.join(problems)}", flush=True)
        time.sleep(min(2.0, timeout))
    if requested:
        request_resources(bundles=[])  # the stages' own demand keeps the nodes from here on
    if problems:
        raise ResourceShortage(explain(problems, time.time() - start))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for key, value in QUIET_ENV.items():  # before transformers is imported: it reads them once, at import
        os.environ.setdefault(key, value)
    try:
        cfg = resolve_config(args)
        print(to_yaml(cfg), flush=True)
        preflight(cfg)  # before anything is written: bad input leaves the run folder as it was
        write_text_atomic(f"{cfg.run_dir}/config.yaml", to_yaml(cfg))
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.stage in ("run", *EDIT_HELP):
        order = (["base", "experts"] + (["upcycle"] if cfg.upcycle_active else [])
                 + ["soft-targets", "distill+multitask" if cfg.multitask.enabled else "distill", "eval"])
    else:
        order = [args.stage]
    joined = init_ray(cfg)
    try:
        wait_for_resources(cfg, order, joined)
    except ResourceShortage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    stages = _stages()
    start = time.time()
    for i, name in enumerate(order, 1):
        print(f"\n=== [{i}/{len(order)}] {name} ({time.time() - start:.0f} s elapsed) ===", flush=True)
        try:
            stages[name](cfg)
        except StageInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"\n=== done in {time.time() - start:.0f} s: {cfg.run_dir} ===", flush=True)
    return 0
