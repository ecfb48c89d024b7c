"""Command line: `python -m dume_ray <stage> --config FILE [key=value ...]`.

    python -m dume_ray run --config configs/demo.yaml                 # every stage, skipping finished ones
    python -m dume_ray experts --config configs/demo.yaml experts.optim.steps=500
    python -m dume_ray search --config configs/search.yaml             # Ray Tune: groupings x T x alpha
    python -m dume_ray run --config configs/demo.yaml grouping=from_search   # pipeline with the search's winner
    python -m dume_ray --help

Each stage reads earlier stages' outputs from `runs/<name>/` and can be rerun on its own. The resolved
config is saved as `runs/<name>/config.yaml` (and printed with --verbose). Inputs are checked (config, tasks,
data files, columns, lengths, tokenizer, earlier stages' outputs, a local Ray's CPUs/GPUs) before Ray starts:
a bad one is one line on stderr naming the key, file or row, exit status 2 (3: not enough resources), and the
run folder is left as it was; --debug adds the traceback. Ray is started locally, or joined when RAY_ADDRESS
is set (as under `ray job submit`) or `ray_address` is configured.

Quiet by default: Ray's own output goes to `runs/<name>/logs/` (driver.log, workers.log, ray_session/ -> the
Ray session's logs); the terminal gets the pipeline's lines, a progress line while a stage trains (steps,
loss, steps/s, ETA) and each stage's wall time. --verbose prints Ray's output here as well. An unexpected
error is one line pointing to `runs/<name>/logs/error.log` (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import traceback
from typing import Optional

from dume_ray.config import ConfigError, PipelineConfig, load_config, to_yaml
from dume_ray.resources import ResourceShortage
from dume_ray.manifest import StageInputError, write_text_atomic
from dume_ray.storage import RunStorage, check_local_format, write_format

QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAY_DEDUP_LOGS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
# Ray runs its workers at nice 15 (its default), so on a machine shared with other work the training jobs lose
# their CPU to every other process (SmolLM2 expert steps 1.5-2x slower than the same loop at nice 0, load 10-15 on
# 2 cores: benchmarks/results/smollm2_stages.json). `RAY_worker_niceness=0` in the environment that starts Ray
# gives them normal priority; not the default here, since other Ray instances on the machine (a test suite's)
# keep theirs at 15 and would then starve.


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


EXAMPLES = {
    "run": ["python -m dume_ray run --config configs/demo.yaml",
            "python -m dume_ray run --config configs/smoke/tiny.yaml runs_dir=/tmp/runs   # about a minute on CPU",
            "python -m dume_ray run --config configs/smollm2.yaml --verbose             # Ray's own logs on the terminal"],
    "base": ["python -m dume_ray base --config configs/demo.yaml",
             "python -m dume_ray base --config configs/demo.yaml base.optim.steps=100"],
    "experts": ["python -m dume_ray experts --config configs/demo.yaml experts.optim.steps=500",
                "python -m dume_ray experts --config configs/demo.yaml experts.resources.num_workers=2 experts.resources.use_gpu=true"],
    "upcycle": ["python -m dume_ray upcycle --config configs/dume.yaml",
                "python -m dume_ray upcycle --config configs/dume.yaml upcycle.routing=sequence_mean"],
    "soft-targets": ["python -m dume_ray soft-targets --config configs/demo.yaml",
                     "python -m dume_ray soft-targets --config configs/demo.yaml soft_targets.top_k=32"],
    "distill": ["python -m dume_ray distill --config configs/demo.yaml distill.temperature=4",
                "python -m dume_ray distill --config configs/demo.yaml distill.alpha=0.9 --debug"],
    "multitask": ["python -m dume_ray multitask --config configs/demo.yaml",
                  "python -m dume_ray multitask --config configs/demo.yaml distill.optim.steps=500"],
    "eval": ["python -m dume_ray eval --config configs/demo.yaml",
             "python -m dume_ray eval --config configs/demo.yaml eval.max_new_tokens=16"],
    "search": ["python -m dume_ray search --config configs/search.yaml",
               "python -m dume_ray run --config configs/demo.yaml grouping=from_search   # train with the winner"],
    "add-task": ["python -m dume_ray add-task --run runs/demo --task initials",
                 "python -m dume_ray add-task --run runs/demo --source '{name: faq, source: jsonl, data_files: "
                 "{train: faq.jsonl, validation: faq_val.jsonl, test: faq_test.jsonl}}'",
                 "python -m dume_ray add-task --run s3://bucket/prefix/demo --task initials   # a run on storage"],
    "remove-task": ["python -m dume_ray remove-task --run runs/demo --task sub"],
}

EXIT_CODES = """exit status: 0 done; 1 unexpected error (its traceback is in runs/<name>/logs/error.log);
  2 bad input (config, override, data, model, missing earlier stage); 3 the cluster lacks the resources"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dume_ray", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, text in STAGE_HELP.items():
        epilog = EXIT_CODES + "\n\nexamples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        p = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=None, help="YAML config (default: the embedded demo defaults)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        p.add_argument("--verbose", action="store_true",
                       help="print Ray's own logs and every worker line here (default: in runs/<name>/logs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.temperature=4")
    for name, text in EDIT_HELP.items():
        epilog = EXIT_CODES + "\n\nexamples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        p = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--run", required=True, help="the run to change: its folder, e.g. runs/demo, or its place on storage, "
                            "e.g. s3://bucket/prefix/demo (<storage>/<name>)")
        p.add_argument("--task", action="append", default=[], help="a built-in task name (repeatable)")
        if name == "add-task":
            p.add_argument("--source", action="append", default=[],
                           help="a task of your own, as a YAML mapping like an entry of tasks.sources (repeatable)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        p.add_argument("--verbose", action="store_true",
                       help="print Ray's own logs and every worker line here (default: in runs/<name>/logs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides on top of the run's config")
    args, extra = parser.parse_known_args(argv)
    # `key=value` after a flag (`run --debug a=1 --verbose b=2`): argparse leaves the later ones over
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += [a for a in extra if a not in unknown]
    return args


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
    from dume_ray.model import model_type_of
    from dume_ray.tasks import SPLITS, encode_rows, load_tasks
    from dume_ray.upcycle.moe import check_supported_model_type

    if cfg.upcycle_active:
        check_supported_model_type(model_type_of(cfg.model), "upcycle.enabled=true")
    tokenizer = preflight_tokenizer(cfg)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    group_of = {t: g for g, names in cfg.groups.items() for t in names}
    encoded = {split: encode_rows(tasks, tokenizer, split, cfg.model.max_seq_len, group_of) for split in SPLITS}
    cut = answers_cut_by_generation_cap({s: encoded[s] for s in ("validation", "test")}, cfg.eval.max_new_tokens)
    if cut:
        longest = max(c["longest"] for c in cut.values())
        print(f"[preflight] warning: eval.max_new_tokens={cfg.eval.max_new_tokens} is shorter than some answers, "
              f"which greedy decoding then cannot match exactly: {cut}; set eval.max_new_tokens={longest} to score "
              f"them all", flush=True)
    for what, counts in (("dropped", {n: t.skipped_rows for n, t in tasks.items() if any(t.skipped_rows.values())}),
                         ("truncated", {n: t.truncated_rows for n, t in tasks.items() if t.truncated_rows})):
        if counts:
            print(f"[preflight] {what} rows (tasks.skip_bad_rows / tasks.too_long={cfg.tasks.too_long}, "
                  f"model.max_seq_len={cfg.model.max_seq_len}): {counts}", flush=True)
    print(f"[preflight] {len(tasks)} tasks, {len(cfg.groups)} expert groups: {' | '.join(cfg.groups)}", flush=True)


def answers_cut_by_generation_cap(rows_by_split: dict[str, list[dict]], max_new_tokens: int) -> dict[str, dict]:
    """{"task/split": {"rows": n, "longest": tokens}} of the encoded rows (`encode_rows`) whose answer has more
    tokens than generation may produce (`data.encode.answer_tokens`: eos not counted, decoding stops at the cap,
    so an answer of exactly max_new_tokens tokens still matches)."""
    from dume_ray.data.encode import answer_tokens

    cut: dict[str, dict] = {}
    for split, rows in rows_by_split.items():
        for row in rows:
            answer = answer_tokens(row)
            if answer > max_new_tokens:
                entry = cut.setdefault(f"{row['task']}/{split}", {"rows": 0, "longest": 0})
                entry["rows"] += 1
                entry["longest"] = max(entry["longest"], answer)
    return cut


def preflight_tokenizer(cfg: PipelineConfig):
    """The tokenizer the preflight encodes the tasks with: the base stage's copy when the base has finished
    for this config (the same tokenizer: the model and data settings are in its hash; a GGUF file takes
    seconds to parse again on every command), else the model source's."""
    from dume_ray.manifest import is_done, read_manifest
    from dume_ray.model import load_source_tokenizer, load_tokenizer
    from dume_ray.stage_hashes import base_hash

    base_dir = f"{cfg.run_dir}/base"
    if is_done(base_dir, base_hash(cfg)):
        model_dir = read_manifest(base_dir)["outputs"]["model"]
        if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
            return load_tokenizer(model_dir)
    return load_source_tokenizer(cfg.model, cfg.data)


UPSTREAM = {"experts": ["base"], "upcycle": ["experts"], "soft-targets": ["base", "experts"],
            "distill": ["base", "soft-targets"], "multitask": ["base", "soft-targets"],
            "distill+multitask": ["base", "soft-targets"], "eval": ["base", "experts", "distill", "multitask", "upcycle"]}


def check_stage_inputs(cfg: PipelineConfig, order: list[str]) -> None:
    """StageInputError before Ray starts when a stage run on its own reads an earlier stage that has not
    finished for this config (the stages check again when they run; this only fails sooner)."""
    from dume_ray.manifest import require
    from dume_ray.stage_hashes import pipeline_hashes

    if "search" in order:
        from dume_ray.search.launch import search_space
        search_space(cfg)  # an empty or oversized search space (ConfigError)
    if "upcycle" in order and len(cfg.groups) < 2:
        raise StageInputError(f"upcycle needs at least 2 experts, but experts.groups gives 1 group "
                              f"({list(cfg.groups)}): add groups, or set upcycle.enabled=false")
    hashes = pipeline_hashes(cfg)
    folders = {"base": [("base", "base")], "experts": [(f"experts/{g}", f"experts/{g}") for g in cfg.groups],
               "soft-targets": [("soft_targets", "soft_targets")], "distill": [("student", "student")],
               "multitask": [("multitask", "multitask")] if cfg.multitask.enabled else [],
               "upcycle": [("upcycle", "upcycle")] if cfg.upcycle_active else []}
    ran = {s for name in order for s in name.split("+")}
    from dume_ray.manifest import is_done
    from dume_ray.run_edit import parent_model
    for stage, command in (("student", "distill"), ("multitask", "multitask")):
        if command in ran and stage in hashes and not is_done(f"{cfg.run_dir}/{stage}", hashes[stage]):
            parent_model(cfg, stage)  # a continued student's parent is still there
    for stage in order:
        for needed in UPSTREAM.get(stage, []):
            if needed not in ran:
                for folder, key in folders[needed]:
                    require(f"{cfg.run_dir}/{folder}", needed, hashes[key])


def joins_a_cluster(cfg: PipelineConfig) -> bool:
    return bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def check_local_resources(cfg: PipelineConfig, order: list[str]) -> None:
    """A local Ray gets this machine's CPUs and GPUs and never more: refuse a job that cannot fit before
    starting it. (A joined cluster may autoscale; `wait_for_resources` checks it once Ray is up.)"""
    from dume_ray.resources import explain, resource_problems, stage_jobs

    if joins_a_cluster(cfg):
        return
    try:
        from ray._private.utils import get_num_cpus  # what a local ray.init() will see (cgroup limits included)
        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private helper: fall back to the plain count
        cpus = float(os.cpu_count() or 1)
    import torch
    gpus = float(torch.cuda.device_count())
    problems = resource_problems(stage_jobs(cfg, order), [{"CPU": cpus, "GPU": gpus}])
    if problems:
        hint = explain(problems, 0.0).splitlines()[-1]
        raise ResourceShortage(f"a local Ray on this machine has {cpus:g} CPU, {gpus:g} GPU: {'; '.join(problems)}. {hint}")


class RayOutput:
    """Where Ray's own output goes: `runs/<name>/logs/` by default, the terminal with --verbose.

    Quiet: this process's file descriptor 2 (Ray's C++ core, its Python loggers, library warnings) goes to
    `logs/driver.log`; every line the workers print goes to `logs/workers.log` through Ray's log dispatcher,
    and the step lines of `worker_utils.Progress` also feed one progress line per stage on the terminal.
    Our own lines (`print`) still go to stdout, and errors to the terminal's stderr (`self.terminal_err`).
    """

    STEP = re.compile(r"^\[(?P<label>[^\]]+)\] step (?P<step>\d+)/(?P<total>\d+)\s*(?P<losses>.*?)\s*\((?P<secs>[\d.]+) s\)\s*$")

    def __init__(self, log_dir: str, verbose: bool):
        self.log_dir, self.verbose = log_dir, verbose
        self.terminal_err = sys.stderr
        self.jobs: dict[str, dict] = {}  # label -> latest step line of the running stage
        self.lock = threading.Lock()
        self.last_shown = 0.0
        self.saved_fd = self.workers = None
        self.started_ray = False

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self.workers = open(os.path.join(self.log_dir, "workers.log"), "a", buffering=1)
        if self.verbose:
            return
        sys.stderr.flush()
        self.saved_fd = os.dup(2)
        self.terminal_err = os.fdopen(os.dup(self.saved_fd), "w", buffering=1)
        driver_log = os.open(os.path.join(self.log_dir, "driver.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(driver_log, 2)
        os.close(driver_log)

    def attach(self) -> None:
        """After ray.init: take over the worker lines from Ray's printer (quiet) or listen beside it (verbose)."""
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        if not self.verbose:
            dispatcher.remove_handler("ray_print_logs")
        dispatcher.remove_handler("dume_ray")  # an earlier command in this process (on a Ray it did not stop)
        dispatcher.add_handler("dume_ray", self.on_worker_lines)

    def stop(self) -> None:
        if self.workers is not None:  # worker lines after this command are no longer ours
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
            dispatcher.remove_handler("dume_ray")
        if self.started_ray:  # while still redirected: Ray's shutdown messages go to the log too
            import ray
            ray.shutdown()
        if self.saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self.saved_fd, 2)
            os.close(self.saved_fd)
            self.saved_fd = None

    def on_worker_lines(self, data: dict) -> None:
        tag = data.get("actor_name") or data.get("task_name") or f"pid={data.get('pid')}"
        for line in data.get("lines", []):
            if self.workers:
                self.workers.write(f"({tag}{', stderr' if data.get('is_err') else ''}) {line}\n")
            match = self.STEP.match(line)
            if match:
                with self.lock:
                    self.jobs[match["label"]] = {"step": int(match["step"]), "total": int(match["total"]),
                                                 "losses": match["losses"], "secs": float(match["secs"])}
                if not self.verbose and time.time() - self.last_shown >= PROGRESS_EVERY_S:
                    self.last_shown = time.time()
                    print(f"    {self.progress_line()}", flush=True)
            elif not self.verbose and line.startswith("resumed from checkpoint"):  # worker_utils: a restart
                print(f"    ({tag}) {line}", flush=True)

    def begin_stage(self) -> None:
        with self.lock:
            self.jobs = {}
        self.last_shown = time.time()

    def progress_line(self) -> str:
        """`copy 120/400 loss 0.512 | reverse 40/400 loss 0.923 | 6.1 steps/s | ETA 52 s` (ETA of the jobs seen)."""
        with self.lock:
            jobs = dict(self.jobs)
        if not jobs:
            return ""
        rates = {label: j["step"] / j["secs"] for label, j in jobs.items() if j["secs"] > 0}
        eta = max(((j["total"] - j["step"]) / rates[label] for label, j in jobs.items() if rates.get(label)), default=0.0)
        parts = [f"{label} {j['step']}/{j['total']} {j['losses']}".strip() for label, j in jobs.items()]
        return " | ".join(parts + [f"{sum(rates.values()):.1f} steps/s", f"ETA {eta:.0f} s"])


PROGRESS_EVERY_S = 30.0  # at most one progress line this often while a stage trains


def open_storage(cfg: PipelineConfig) -> Optional[RunStorage]:
    """The run's storage (`storage=`), checked before any work: reachable and writable (a probe object is
    written and deleted), and not a run of another format version. Then its finished stages are pulled into
    the local working copy, so what is skipped is what storage holds; a run new to the storage instead keeps
    the local copy, uploaded once every check has passed (a local run moved onto storage keeps its finished
    stages, and a refused start leaves nothing there). None without."""
    if not cfg.storage:
        return None
    store = RunStorage.for_run(cfg.storage, cfg.name, cfg.run_dir)
    stored = store.check_format()  # reads only: a run of another version is refused before the probe is written
    store.check_writable()
    if stored:
        print(f"[storage] {store.uri}: {store.pull()} file(s) fetched into {cfg.run_dir}", flush=True)
    else:
        print(f"[storage] {store.uri}: a new run there; {cfg.run_dir} is uploaded once the checks pass", flush=True)
    return store


def init_ray(cfg: PipelineConfig, output: RayOutput, worker_env: Optional[dict] = None) -> bool:
    """Start a local Ray, or join RAY_ADDRESS / `ray_address`; True when joined to an existing cluster.
    `worker_env`: variables every worker gets (the run's storage), on top of the quiet-logging ones."""
    import ray
    import ray.data
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    # Variables already in this process's environment reach the workers anyway (a `ray job submit`'s own
    # env_vars, or the shell's for a local Ray), and Ray refuses a job whose driver repeats one of its keys.
    env_vars = {**{k: v for k, v in QUIET_ENV.items() if k not in os.environ}, **(worker_env or {})}
    os.environ.update(QUIET_ENV)
    output.start()
    session_dir = None
    if not ray.is_initialized():
        output.started_ray = True
        context = ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True,
                           include_dashboard=None if address else cfg.ray_dashboard)  # a joined cluster keeps its own
        session_dir = (context.address_info or {}).get("session_dir")
    output.attach()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if session_dir:
        _link_ray_session_logs(output.log_dir, os.path.join(session_dir, "logs"))
    found = ", ".join(f"{v:g} {k}" for k, v in sorted(ray.cluster_resources().items()) if k in ("CPU", "GPU"))
    where = "" if output.verbose else f"; Ray's logs: {output.log_dir}/"
    how = f"joined {address}" if address else "started a local Ray" if output.started_ray else "using this process's Ray"
    print(f"[ray] {how} ({found}){where}", flush=True)
    return bool(address)


def _link_ray_session_logs(log_dir: str, session_logs: str) -> None:
    """`logs/ray_session` -> this Ray session's own log folder (raylet, GCS, every worker's .out/.err)."""
    try:
        link = os.path.join(log_dir, "ray_session")
        if os.path.islink(link):
            os.remove(link)
        if os.path.isdir(session_logs) and not os.path.exists(link):
            os.symlink(session_logs, link)
    except Exception:  # noqa: BLE001 - a joined cluster's logs live on its head node; nothing to link
        pass


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


INPUT_ERRORS = (ConfigError, StageInputError, ValueError, KeyError, OSError)  # before Ray: the user's to fix


def main(argv: list[str] | None = None) -> int:
    """Run the stage(s); the exit status (see EXIT_CODES). Every error is one line on stderr, naming what to
    fix; `--debug` adds the traceback."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for key, value in QUIET_ENV.items():  # before transformers is imported: it reads them once, at import
        os.environ.setdefault(key, value)
    state: dict = {"cfg": None, "output": None}
    try:
        return _run(args, state)
    except KeyboardInterrupt:
        return _fail(state, args, "interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - not the user's input: one line, the traceback in the run's logs
        return _unexpected(exc, state, args)
    finally:
        if state["output"] is not None:
            state["output"].stop()


def _run(args: argparse.Namespace, state: dict) -> int:
    from dume_ray.manifest import start_run
    start_run()  # the manifests this command writes belong to this run (the report tells them from reused ones)
    try:
        cfg = state["cfg"] = resolve_config(args)
        order = stage_order(cfg, args.stage)
        print(to_yaml(cfg) if args.verbose else f"[config] {cfg.name}: {len(cfg.tasks.names)} tasks, "
              f"{len(cfg.groups)} expert groups, stages: {' -> '.join(order)}", flush=True)
        preflight(cfg)  # before anything is written: bad input leaves the run folder as it was
        check_local_format(cfg.run_dir)
        store = open_storage(cfg)  # reachable, writable, a compatible run; its finished stages pulled here
        if store is not None and args.stage in EDIT_HELP:  # the parents to continue, as stored, not as found before the pull
            from dume_ray.run_edit import finished_students
            cfg.distill.continue_from = finished_students(cfg.run_dir, cfg)
        check_stage_inputs(cfg, order)
        check_local_resources(cfg, order)
    except ResourceShortage as exc:
        return _fail(state, args, exc, 3)
    except INPUT_ERRORS as exc:
        return _fail(state, args, exc, 2)
    write_text_atomic(f"{cfg.run_dir}/config.yaml", to_yaml(cfg))
    write_format(cfg.run_dir)
    worker_env = {}
    if store is not None:
        store.push()
        worker_env = store.worker_env()  # the workers find the storage and this run's folder by these
        os.environ.update(worker_env)
    output = state["output"] = RayOutput(f"{cfg.run_dir}/logs", args.verbose)
    joined = init_ray(cfg, output, worker_env)
    try:
        wait_for_resources(cfg, order, joined)
    except ResourceShortage as exc:
        return _fail(state, args, exc, 3)
    stages = _stages()
    start = time.time()
    for i, name in enumerate(order, 1):
        print(f"\n=== [{i}/{len(order)}] {name} ({time.time() - start:.0f} s elapsed) ===", flush=True)
        output.begin_stage()
        began = time.time()
        try:
            stages[name](cfg)
        except StageInputError as exc:
            return _fail(state, args, exc, 2)
        except ResourceShortage as exc:
            return _fail(state, args, exc, 3)
        if store is not None:
            store.push()  # data files first, manifests last: storage never shows a stage done without its files
        progress = output.progress_line().rsplit(" | ETA", 1)[0]  # finished: no ETA
        print(f"=== [{i}/{len(order)}] {name} done, wall time {time.time() - began:.0f} s"
              + (f": {progress}" if progress else "") + " ===", flush=True)
    print(f"\n=== done in {time.time() - start:.0f} s: {cfg.run_dir} ===", flush=True)
    return 0


def stage_order(cfg: PipelineConfig, stage: str) -> list[str]:
    if stage not in ("run", *EDIT_HELP):  # add-task / remove-task rerun the whole pipeline
        return [stage]
    return (["base", "experts"] + (["upcycle"] if cfg.upcycle_active else [])
            + ["soft-targets", "distill+multitask" if cfg.multitask.enabled else "distill", "eval"])


def _terminal_err(state: dict):
    return state["output"].terminal_err if state["output"] is not None else sys.stderr


def _fail(state: dict, args: argparse.Namespace, exc: BaseException | str, code: int) -> int:
    """One line on the terminal's stderr (the traceback first with --debug); returns the exit status."""
    err = _terminal_err(state)
    if args.debug and isinstance(exc, BaseException):
        traceback.print_exception(exc, file=err)
    print(f"error: {one_line(exc)}", file=err, flush=True)
    return code


def _unexpected(exc: Exception, state: dict, args: argparse.Namespace) -> int:
    """A bug or a failure outside the user's input: the exception on one line, and where its traceback is."""
    cfg, where = state["cfg"], "rerun with --debug for the traceback"
    if cfg is not None:
        log = os.path.abspath(os.path.join(cfg.run_dir, "logs", "error.log"))
        try:
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(sys.argv)}\n")
                traceback.print_exception(exc, file=f)
            where = f"traceback in {log}, Ray's logs in {os.path.dirname(log)}/; --debug prints it here"
        except OSError:
            pass
    err = _terminal_err(state)
    if args.debug:
        traceback.print_exception(exc, file=err)
    print(f"error: unexpected {_describe(exc)} ({where})", file=err, flush=True)
    return 1


def _describe(exc: BaseException) -> str:
    """`Type: message`; for an error raised in a Ray worker (RayTaskError and the like carry the worker's
    traceback in their text), the original exception and its last line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    return f"{type(exc).__name__}: {one_line(text)[:500]}"


def one_line(exc: BaseException | str) -> str:
    """The message on one line (multi-line messages, e.g. the resource report, are joined)."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])  # not KeyError's quoted repr
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
