"""End to end: wall time of each stage of the demo pipeline on Ray, and the same work in one plain process.

    python benchmarks/end_to_end.py                          # configs/demo.yaml (upcycle off, see below), 3 rounds
    python benchmarks/end_to_end.py --repeats 1              # one round
    python benchmarks/end_to_end.py --config configs/demo.yaml --threads 2
    python benchmarks/end_to_end.py --sides ray              # without the side that joins a running Ray
    python benchmarks/end_to_end.py --tiny                   # smoke setting, writes to a temp folder

Three sides per round, in this order:
1. Ray, started by the run (the demo's own command): a fresh `python -m dume_ray run --config C name=bench-e2e-rI runs_dir=R` (I = the round) in a subprocess; per-stage
   seconds from the stages' `DONE.json` manifests, total = the subprocess's wall time (Ray start included); the
   faults it survived from its log (`log_faults`: out-of-memory task kills, restarts from checkpoint).
2. Ray, joined running cluster: the same command with RAY_ADDRESS set to a Ray head started just before it and
   left to settle, outside the clock (`RunningRay`), as `ray job submit` runs it on a cluster that `ray up`
   started: no Ray start in the run.
3. Plain: `reference_pipeline` below in a fresh process (`plain_process`, timed from its start like the Ray
   side's command): the stages' pure functions called in order, no Ray:
   the same models, steps, batch sizes, schedules, checkpoint interval, validation scoring after each
   training job, soft targets (`TeacherScorer` + `write_shard`) and test-split scoring of every model.
   Experts train one after another here (the Ray run trains them concurrently, one CPU each).
Ray's workers run at `RAY_worker_niceness=0` (set for the `run` subprocess unless the environment sets it or --tiny; Ray's
default is nice 15, the plain loop runs at this process's niceness), so both sides get the same CPU priority on a
machine other work loads; the JSON records the value ("ray_worker_niceness").
The ratio Ray / plain is the cost of the orchestration (issue 16's target: <= 1.15 end to end, and <= 2 for the
soft targets, which the Ray run scores at the end of each expert's training job: `soft_targets.in_expert_jobs`).
A second table splits every training job into phases (`worker_utils.Phases`: worker start, model build, data
load, steps, checkpoint, save, validation, soft targets, teardown; "Ray start" is the `run` process's time
before its first stage), Ray and plain side by side. The upcycle stage
is left out of both (`upcycle.enabled=false`) by default: its work is the same pure functions in both and
its report rows would need the whole MoE evaluation duplicated here; `--with-upcycle` is not offered.
The plain run uses the package's own loop (`training.train_loop` with `ce_step` / `kd_step`, as the workers do);
what exists only here is the order it calls the stages in, and the plain shuffled batches in place of Ray Data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, ray_workers_at_own_priority, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
TINY_OVERRIDES = ["tasks.builtin=[copy,reverse]", "tasks.num_train=32", "tasks.num_test=8", "tasks.num_validation=4",
                  "base.optim.steps=2", "experts.optim.steps=2", "distill.optim.steps=2", "eval.max_new_tokens=4"]


# ---------------------------------------------------------------------------------------------------------
# The plain-process reference: the stages' pure functions, in order, no Ray.
# ---------------------------------------------------------------------------------------------------------

def train_job(init_dir: str, out_dir: str, rows: list, optim, train_step, validation: dict, max_new_tokens: int,
              seed: int, mlp_only: bool = False) -> dict[str, float]:
    """One training job as the workers run it: the package's `train_loop` and step, a checkpoint every
    `checkpoint_every` (with the validation loss the workers log to the dashboards there), then save_pretrained
    and validation exact-match. Returns its seconds per phase
    (`worker_utils.Phases`, as the Ray jobs report them) and "tokens": the response tokens it trained on."""
    import torch
    from dume_ray.data.encode import shuffled_batches
    from dume_ray.model import freeze_non_mlp, load_model, load_tokenizer
    from dume_ray.training import evaluate_tasks, make_optimizer, save_training_state, train_loop, validation_loss
    from dume_ray.training_jobs import validation_pairs
    from dume_ray.worker_utils import Phases
    phases = Phases(None)
    phases.enter("model build")
    torch.manual_seed(seed)
    tokenizer, model = load_tokenizer(init_dir), load_model(init_dir)
    if mlp_only:
        freeze_non_mlp(model)
    optimizer, scheduler = make_optimizer(model, optim)
    pairs = validation_pairs(validation)

    def checkpoint(step: int, _metrics: dict) -> None:
        with phases.pause("steps", "checkpoint"):
            validation_loss(model, tokenizer, pairs)
            save_training_state(f"{out_dir}-checkpoint", model, optimizer, scheduler, step)

    tokens = []
    phases.enter("steps")
    train_loop(model, optimizer, scheduler, phases.timed_iter(shuffled_batches(rows, optim.batch_size, seed), "data load"),
               train_step, tokenizer.pad_token_id, start_step=0, total_steps=optim.steps,
               checkpoint_every=optim.checkpoint_every, on_checkpoint=checkpoint,
               on_step=lambda _step, metrics: tokens.append(metrics.get("tokens", 0)))
    phases.enter("save")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    phases.enter("validation")
    evaluate_tasks(model, tokenizer, validation, "validation", max_new_tokens)
    phases.enter(None)
    return {**phases.seconds, "tokens": sum(tokens)}


def kd_step_of(cfg, alpha: float, vocab_size: int):
    """The step of the student (alpha = distill.alpha) or the multitask baseline (alpha = 0), as
    `distill/launch.py` configures the workers' `kd_step`."""
    from dume_ray.training import kd_step
    d = cfg.distill
    return kd_step(d.optim.grad_clip, min(cfg.soft_targets.top_k, vocab_size), alpha, d.optim.steps,
                   d.anneal and alpha > 0, d.temperature, d.divergence, d.jsd_beta, cfg.model.dtype)


def reference_pipeline(cfg, out: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """base -> experts -> soft targets -> student -> multitask -> eval in this process; (seconds per stage,
    {training stage: seconds per phase}, the experts' phases summed over the groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dume_ray.data.soft_targets import write_shard
    from dume_ray.model import create_initial_model, load_model, load_tokenizer
    from dume_ray.soft_targets.teacher_scoring import score_rows
    from dume_ray.tasks import encode_rows, load_tasks
    from dume_ray.training import ce_step, evaluate_tasks

    seconds, profiles, t = {}, {}, time.time()
    init = create_initial_model(cfg.model, cfg.seed, f"{out}/base/init", cfg.data)
    tokenizer = load_tokenizer(init)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    mx = cfg.eval.max_new_tokens
    profiles["base"] = train_job(init, f"{out}/base/model", encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len, {n: "base" for n in tasks}),
           cfg.base.optim, ce_step(cfg.base.optim.grad_clip, cfg.model.dtype), tasks, mx, cfg.seed)
    seconds["base"], t = time.time() - t, time.time()

    group_of = {n: g for g, names in cfg.groups.items() for n in names}
    for group, names in cfg.groups.items():  # one after another
        rows = encode_rows({n: tasks[n] for n in names}, tokenizer, "train", cfg.model.max_seq_len, group_of)
        phases = train_job(f"{out}/base/model", f"{out}/experts/{group}", rows, cfg.experts.optim,
                        ce_step(cfg.experts.optim.grad_clip, cfg.model.dtype), {n: tasks[n] for n in names}, mx, cfg.seed,
                        mlp_only=cfg.experts.train_mlp_only)
        profiles["experts"] = {k: round(profiles.get("experts", {}).get(k, 0.0) + v, 2) for k, v in phases.items()}
    seconds["experts"], t = time.time() - t, time.time()

    for group, names in cfg.groups.items():  # each expert scores its own group's rows
        rows = encode_rows({n: tasks[n] for n in names}, tokenizer, "train", cfg.model.max_seq_len, group_of)
        table = score_rows(f"{out}/experts/{group}", rows, cfg.soft_targets.top_k, cfg.soft_targets.batch_size)
        write_shard(table, f"{out}/soft_targets/{group}.parquet")
    seconds["soft_targets"], t = time.time() - t, time.time()

    stream = pa.concat_tables([pq.read_table(f"{out}/soft_targets/{g}.parquet") for g in cfg.groups]).to_pylist()
    for stage, alpha in (("student", cfg.distill.alpha), ("multitask", 0.0)):
        profiles[stage] = train_job(f"{out}/base/model", f"{out}/{stage}", stream, cfg.distill.optim,
                                 kd_step_of(cfg, alpha, len(tokenizer)), tasks, mx, cfg.seed)
        seconds[stage], t = time.time() - t, time.time()

    models = {"base": (f"{out}/base/model", list(tasks)), "student": (f"{out}/student", list(tasks)),
              "multitask": (f"{out}/multitask", list(tasks)), **{f"expert:{g}": (f"{out}/experts/{g}", n) for g, n in cfg.groups.items()}}
    for label, (model_dir, names) in models.items():
        evaluate_tasks(load_model(model_dir), tokenizer, {n: tasks[n] for n in names}, cfg.eval.split, mx, cfg.eval.batch_size)
    seconds["eval"] = time.time() - t
    return seconds, profiles


# ---------------------------------------------------------------------------------------------------------
# The Ray run, and the comparison.
# ---------------------------------------------------------------------------------------------------------

def ray_pipeline(config: str, overrides: list[str], runs_dir: str, name: str,
                 address: str | None = None) -> tuple[float, dict, dict, dict]:
    """A fresh `python -m dume_ray run`; (total wall seconds, {stage: manifest seconds}, {CLI stage: wall seconds},
    {training stage: its jobs' seconds per phase (`worker_utils.Phases`), summed over the experts}; the
    profile's "Ray start" is everything before the first stage: process start, config, `ray.init`).
    `address`: join that running Ray (RAY_ADDRESS, as `ray job submit` hands it to the job) instead of starting one."""
    shutil.rmtree(os.path.join(runs_dir, name), ignore_errors=True)
    os.makedirs(runs_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "dume_ray", "run", "--config", config, f"name={name}", f"runs_dir={runs_dir}", *overrides]
    log = os.path.join(runs_dir, f"{name}.log")
    print(f"[end_to_end] $ {' '.join(cmd[1:])} (log {log})", flush=True)
    start = time.time()
    # A driver joining a Ray that uses token authentication (Ray's default) must say so; the token is the
    # ~/.ray/auth_token the head was started with, as on a cluster node.
    env = {**os.environ, **({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"} if address else {})}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    total = time.time() - start
    if rc != 0:
        raise RuntimeError(f"the Ray pipeline failed (rc={rc}); see {log}")
    stages, profiles = {}, {}
    for stage in ("base", "experts", "upcycle", "soft_targets", "student", "multitask", "eval"):
        stage_dir = os.path.join(runs_dir, name, stage)
        if stage == "experts":
            found = [json.load(open(os.path.join(stage_dir, g, "DONE.json"))) for g in sorted(os.listdir(stage_dir))
                     if os.path.exists(os.path.join(stage_dir, g, "DONE.json"))]
            stages["experts (training loops, summed over jobs)"] = sum(m["seconds"] for m in found)
            jobs = [m["metrics"].get("profile", {}) for m in found]
        elif os.path.exists(os.path.join(stage_dir, "DONE.json")):
            done = json.load(open(os.path.join(stage_dir, "DONE.json")))
            stages[stage] = done["seconds"]
            jobs = [done.get("metrics", {}).get("profile", {})]
        else:
            continue
        if any(jobs):
            profiles[stage] = {k: round(sum(j.get(k, 0.0) for j in jobs), 2) for k in jobs[0]}
    walls = stage_walls(log)
    profiles["ray start"] = {"Ray start": round(total - walls.pop("_stages_total"), 2)}
    return total, stages, walls, profiles


def plain_process(config: str, overrides: list[str], threads: int) -> tuple[float, dict, dict]:
    """The plain side as a user would run it: a fresh process (`end_to_end.py --plain-child`: interpreter start,
    imports, config, then `reference_pipeline`), timed from start to exit like the Ray side's `python -m dume_ray
    run`, so both totals include Python's start and the torch/transformers imports (about 3 s here). Returns
    (total wall seconds, {stage: seconds}, {stage: phase seconds})."""
    work = tempfile.mkdtemp(prefix="bench-e2e-plain-")
    out = os.path.join(work, "plain.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--plain-child", out, "--config", config,
           "--threads", str(threads), *overrides]
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    total = time.time() - start
    with open(out) as f:
        result = json.load(f)
    shutil.rmtree(work, ignore_errors=True)
    return total, result["stages"], result["profile"]


class RunningRay:
    """A local Ray head started before a run and stopped after it, outside the run's clock, as a cluster started
    by `ray up` outlives the jobs sent to it: the "joined" side runs `python -m dume_ray run` with RAY_ADDRESS
    set to it, so that side pays no Ray start (a cluster's, paid once per `ray up`). Up only around that side's
    run, so its idle processes take no CPU from the other sides. Held by a child process (`ray.init` there), not
    by `ray start`, whose only way down is `ray stop`: that would kill every other Ray on the machine. Closing
    the child's stdin ends it, and its `ray.shutdown` takes the head's processes with it."""

    HOLD = ("import ray, sys; context = ray.init(include_dashboard=False); "
            "print('ADDRESS=' + context.address_info['gcs_address'], flush=True); sys.stdin.read()")
    START_TIMEOUT_S = 180.0
    SETTLE_S = 10.0  # the head's own start-up work (its prestarted workers' imports) ends before the clock starts

    def __enter__(self) -> "RunningRay":
        import select
        self.process = subprocess.Popen([sys.executable, "-c", self.HOLD], cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        env={**os.environ, "RAY_AUTH_MODE": "token"})
        try:
            deadline, self.address = time.time() + self.START_TIMEOUT_S, ""
            while not self.address:
                ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.time()))
                line = self.process.stdout.readline() if ready else ""
                if not line:
                    raise RuntimeError(f"the Ray head for the joined side did not start within {self.START_TIMEOUT_S:.0f} s "
                                       f"(exit status {self.process.poll()})")
                self.address = line.strip()[len("ADDRESS="):] if line.startswith("ADDRESS=") else ""
            time.sleep(self.SETTLE_S)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stage_walls(log: str) -> dict[str, float]:
    """Wall seconds of each CLI stage from its banners ('=== [i/n] name (N s elapsed) ===', '=== done in N s')."""
    import re
    text = open(log).read()
    marks = [(m.group(1), int(m.group(2))) for m in re.finditer(r"=== \[\d+/\d+\] (\S+) \((\d+) s elapsed\)", text)]
    end = re.search(r"=== done in (\d+) s", text)
    marks.append(("end", int(end.group(1)) if end else marks[-1][1]))
    return {**{name: float(t1 - t0) for (name, t0), (_, t1) in zip(marks, marks[1:])}, "_stages_total": float(marks[-1][1])}


def log_faults(log: str) -> dict:
    """What a pipeline run survived, from its log: Ray's out-of-memory kills of a task (retried from its
    checkpoint: a loaded machine) and the eval report's 'Faults survived' lines (restarts, steps redone). They
    lengthen the stages they hit, so timings from a round with them are not a clean run's."""
    text = open(log).read()
    faults = text.split("## Faults survived", 1)[1].split("\n\n")[1] if "## Faults survived" in text else ""
    return {"oom_task_kills": text.count("failed due to oom"),
            "report": [line[2:] for line in faults.splitlines() if line.startswith("- ")]}


RAY_SIDES = {"ray": "Ray, started by the run", "joined": "Ray, joined running cluster"}


def summarize(runs: list[dict]) -> tuple[str, str, dict]:
    """The per-stage table (medians over rounds; a column per Ray side and the plain process), the verdict line,
    and the median totals and ratios."""
    def med(get) -> float:
        return statistics.median(get(r) for r in runs)

    sides = [side for side in RAY_SIDES if side in runs[0]]
    rows = [[s, *(f"{med(lambda r: r[side]['stages'][s]):.1f}" for side in sides),
             f"{med(lambda r: r['plain']['stages'].get(s.split(' ')[0], float('nan'))):.1f}"]
            for s in runs[0][sides[0]]["stages"]]
    walls = runs[0][sides[0]]["cli_stage_walls"]
    if "experts" in walls:
        rows.insert(2, ["experts (stage wall, jobs concurrent)",
                        *(f"{med(lambda r: r[side]['cli_stage_walls']['experts']):.1f}" for side in sides),
                        f"{med(lambda r: r['plain']['stages']['experts']):.1f}"])
    if "distill+multitask" in walls:  # `run` trains the two side by side; the plain loop one after the other
        rows.append(["student + multitask (stage wall, side by side)",
                     *(f"{med(lambda r: r[side]['cli_stage_walls']['distill+multitask']):.1f}" for side in sides),
                     f"{med(lambda r: r['plain']['stages']['student'] + r['plain']['stages']['multitask']):.1f}"])
    median = {"plain_seconds": med(lambda r: r["plain"]["total_seconds"])}
    for side in sides:
        median[f"{side}_seconds"] = med(lambda r: r[side]["total_seconds"])
        median[f"{side}_over_plain"] = med(lambda r: r[side]["total_seconds"] / r["plain"]["total_seconds"])
        median[f"soft_targets_{side}_over_plain"] = med(lambda r: soft_target_seconds(r, side) / r["plain"]["stages"]["soft_targets"])
    rows.append(["soft targets, all (stage + scoring in the expert jobs, summed)",
                 *(f"{med(lambda r: soft_target_seconds(r, side)):.1f}" for side in sides),
                 f"{med(lambda r: r['plain']['stages']['soft_targets']):.1f}"])
    rows.append(["**total wall** (Ray: process start to end, incl. Ray start when the run starts it)",
                 *(f"{median[f'{side}_seconds']:.1f}" for side in sides), f"{median['plain_seconds']:.1f}"])
    table = markdown_table([f"stage (median of {len(runs)} rounds)", *(f"{RAY_SIDES[side]}, s" for side in sides),
                            "plain process, s"], rows)
    verdicts = []
    for side in sides:
        ratio, soft = median[f"{side}_over_plain"], median[f"soft_targets_{side}_over_plain"]
        per_round = ", ".join(f"{r[side]['total_seconds'] / r['plain']['total_seconds']:.2f}" for r in runs)
        verdicts.append(f"{RAY_SIDES[side]} / plain = {ratio:.2f}, median of the rounds' ratios {per_round} "
                        f"(target <= {TARGET_TOTAL}: {'met' if ratio <= TARGET_TOTAL else 'NOT met'}); soft targets "
                        f"{soft:.2f} (target <= {TARGET_SOFT_TARGETS}: {'met' if soft <= TARGET_SOFT_TARGETS else 'NOT met'})")
    return table, "\n".join(verdicts), median


PHASES = ["Ray start", "worker start", "model build", "data load", "steps", "checkpoint", "save", "validation",
          "soft targets", "teardown"]
TARGET_TOTAL, TARGET_SOFT_TARGETS = 1.15, 2.0  # issue 16's goals: Ray / plain end to end, and for the soft targets


def soft_target_seconds(run: dict, side: str = "ray") -> float:
    """A Ray run's soft-target time: the stage's own, plus the scoring at the end of the expert jobs (summed
    over the jobs, though they overlap: an upper bound on the wall time it adds)."""
    return run[side]["stages"].get("soft_targets", 0.0) + run[side]["profile"].get("experts", {}).get("soft targets", 0.0)


def profile_table(runs: list[dict]) -> str:
    """Where each training stage's time goes, Ray vs plain (medians over rounds; experts summed over groups)."""
    def med(side: str, stage: str, phase: str) -> str:
        values = [r[side]["profile"].get(stage, {}).get(phase) for r in runs]
        values = [v for v in values if v is not None]
        return f"{statistics.median(values):.1f}" if values else "-"

    sides = [side for side in (*RAY_SIDES, "plain") if side in runs[0]]
    stages = ["ray start", *(s for s in ("base", "experts", "student", "multitask") if s in runs[0][sides[0]]["profile"])]
    rows = [[f"{stage} ({side})", *(med(side, stage, p) for p in PHASES)]
            for stage in stages for side in sides if stage != "ray start" or side != "plain"]
    return markdown_table([f"phase seconds (median of {len(runs)} rounds)", *PHASES], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the plain process (0 = torch default)")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (Ray run, plain run); medians are reported")
    parser.add_argument("--sides", nargs="+", choices=list(RAY_SIDES), default=None,
                        help="Ray sides to run beside the plain process: ray = the run starts its own Ray, joined = it "
                             "joins a running one (RAY_ADDRESS, as under `ray job submit`); default both (--tiny: "
                             "joined, the tests' CLI smoke runs cover the other)")
    parser.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = parser.parse_args(argv)
    started = time.time()
    import torch
    from dume_ray.config import load_config
    if args.plain_child:  # the plain side's own process (plain_process): the reference pipeline, its result to a file
        if args.threads:
            torch.set_num_threads(args.threads)
        work = os.path.dirname(args.plain_child)
        stages, profile = reference_pipeline(load_config(os.path.join(REPO, args.config), args.overrides), work)
        with open(args.plain_child, "w") as f:
            json.dump({"stages": stages, "profile": profile}, f)
        return 0
    overrides = [*(TINY_OVERRIDES if args.tiny else []), "upcycle.enabled=false", *args.overrides]
    if args.tiny:
        args.config, args.repeats = "configs/smoke/tiny.yaml", 1
        args.out = args.out or result_path("end_to_end", None, True)
        args.runs_dir = os.path.join(os.path.dirname(args.out), "runs")
        args.sides = args.sides or ["joined"]
    args.sides = [side for side in RAY_SIDES if side in (args.sides or RAY_SIDES)]
    if args.threads:
        torch.set_num_threads(args.threads)
    # Ray's workers at the plain loop's priority (Ray's default is nice 15, the plain loop runs at this process's):
    # a like-for-like comparison on a machine other work also loads, as benchmarks/smollm2_stages.py does.
    niceness = ray_workers_at_own_priority(args.tiny)
    load_config(os.path.join(REPO, args.config), overrides)  # a bad config or override fails here, before any run

    runs, load, path = [], [], result_path("end_to_end", args.out, args.tiny)
    runs_dir = os.path.abspath(args.runs_dir)
    for repeat in range(args.repeats):  # each side in turn in each round; medians over rounds
        before = list(os.getloadavg())
        run = {}
        for side in args.sides:
            name = f"bench-e2e-{side}-r{repeat}"  # a log per round and side, kept (the run folder is small)
            with RunningRay() if side == "joined" else contextlib.nullcontext() as cluster:
                total, stages, walls, profile = ray_pipeline(args.config, overrides, runs_dir, name,
                                                             cluster.address if cluster else None)
            run[side] = {"total_seconds": total, "stages": stages, "cli_stage_walls": walls, "profile": profile,
                         "faults": log_faults(os.path.join(runs_dir, f"{name}.log"))}
        plain_total, plain_stages, plain_profile = plain_process(args.config, overrides, args.threads)
        run["plain"] = {"total_seconds": plain_total, "stages": plain_stages, "profile": plain_profile}
        for side in RAY_SIDES:
            if side in run:
                run[f"{side}_over_plain"] = run[side]["total_seconds"] / run["plain"]["total_seconds"]
        runs.append(run)
        load.append({"before": before, "after": list(os.getloadavg())})
        print(f"[end_to_end] round {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{side} {run[side]['total_seconds']:.1f} s" for side in (*RAY_SIDES, "plain") if side in run)
            + f"; load average (1, 5, 15 min) {load[-1]}", flush=True)
        # Written after every round (marked partial until the last), so a cut-short run still leaves its rounds.
        table, verdict, median = summarize(runs)
        table = f"{table}\n\n{profile_table(runs)}"
        write_result(path, "end_to_end", command_line(), started,
                     {"config": args.config, "overrides": overrides, "plain_torch_threads": torch.get_num_threads(),
                      "ray_worker_niceness": niceness,
                      "rounds": runs, "partial": len(runs) < args.repeats, "median": median,
                      **{f"{side}_over_plain": median[f"{side}_over_plain"] for side in args.sides},
                      **{f"{side}_target_met": median[f"{side}_over_plain"] <= TARGET_TOTAL for side in args.sides},
                      **{f"soft_targets_{side}_target_met": median[f"soft_targets_{side}_over_plain"] <= TARGET_SOFT_TARGETS
                         for side in args.sides},
                      "loadavg": load}, f"{table}\n\n{verdict}")
    print(f"\n{table}\n\n{verdict}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
