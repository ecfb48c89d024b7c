"""SmolLM2 per training stage: Ray vs a plain torch loop (same model, batch, torch threads), peak memory per
stage, and the experts stage with 1 vs 2 experts at once.

    python benchmarks/smollm2_stages.py                  # configs/smollm2.yaml, 2 tasks, 3 rounds (~25 min on 2 cores)
    python benchmarks/smollm2_stages.py --repeats 1
    python benchmarks/smollm2_stages.py --tiny           # the tiny embedded model, 2 steps a stage, temp folder

Setting (SETTINGS below, written into the JSON): SmolLM2-135M-Instruct (the GGUF of configs/smollm2.yaml,
imported once by an untimed `base` stage), 2 word tasks, MLP-only experts 16 steps each, student and multitask
32 steps, batch 8, a checkpoint halfway and at the end of every job (as the config's own 40/20 and 120/60),
upcycle and eval off (each job still scores its validation split, on both sides).

Each round runs, stage by stage, Ray and plain side by side (which goes first alternates between rounds):
  experts   Ray `python -m dume_ray experts` with `experts.resources.max_concurrent_jobs=1` (one expert at a time,
            each on both cores: 2 torch threads) | plain: the same experts one after another at 2 threads;
            each expert scores its own group's soft targets at its end (`soft_targets.in_expert_jobs`), so the
            "soft targets" phase is the soft-target scoring, Ray vs plain;
  experts x2  Ray, 2 experts at once (1 core, 1 thread each), the concurrency comparison (then `soft-targets`,
            which only writes the stage's manifest from the groups the jobs scored);
  student   Ray `distill` (alone: both cores, 2 threads) | plain: the same KD loop on the same soft targets;
  multitask Ray `multitask` | plain.
Ray: the real CLI in this process on one Ray kept up between commands (`common.cli`; Ray's start is not in
any stage), the stage's folders removed first; stage wall = the command's wall time; each job's phases
(`worker_utils.Phases`), response tokens and peak RSS come from its manifest. Plain: one process, started
before the first round, runs every plain stage (`PlainProcess`), each with `end_to_end.train_job` (the package's
`train_loop` with `ce_step` / `kd_step`, checkpoints and validation as the workers do) from the Ray run's base
model and soft targets; a stage's wall time counts config, tokenizer, tasks, encoding, training and scoring (the
Ray command does the same); at each checkpoint both compute the validation loss (the workers log it to the
dashboards) and save the training state. The untimed `base` runs in its own process first. Tokens/s = response tokens trained on / seconds of the "steps" phase (data waits and
checkpoints excluded). Peak RSS (VmHWM, reset at the start: `resources.reset_peak_rss`): the process that
trains (Ray: the job's worker; plain: the plain process) and the Ray driver (this process, per command).
Goal (issue 16): Ray / plain <= 1.10 per training stage.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, cli, command_line, markdown_table, ray_workers_at_own_priority, result_path,  # noqa: E402
                    start_ray, write_result)

sys.path.insert(0, REPO)
SETTINGS = ["tasks.builtin=[reverse_words,sort_words]", "tasks.num_train=64", "tasks.num_validation=8",
            "tasks.num_test=8", "upcycle.enabled=false",
            "experts.optim.steps=16", "experts.optim.warmup_steps=2", "experts.optim.checkpoint_every=8",
            "distill.optim.steps=32", "distill.optim.warmup_steps=4", "distill.optim.checkpoint_every=16"]
TINY = ["tasks.builtin=[copy,reverse]", "tasks.num_train=32", "tasks.num_test=8", "tasks.num_validation=4",
        "base.optim.steps=2", "experts.optim.steps=2", "distill.optim.steps=2", "eval.max_new_tokens=4"]
STAGES = ["experts", "student", "multitask"]
TARGET = 1.10  # issue 16: Ray / plain per training stage


# ---------------------------------------------------------------------------------------------------------
# The plain side: one process for every plain stage of the benchmark, no Ray.
# ---------------------------------------------------------------------------------------------------------

def plain_stage(spec: dict) -> dict:
    """Run one stage as `spec` says ({stage, config, overrides, base_dir, soft_targets_dir, out, threads}); the
    stage's wall seconds, phases (summed over the experts), tokens and scoring, and the process's peak RSS
    during the stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from end_to_end import kd_step_of, train_job
    from dume_ray.config import load_config
    from dume_ray.model import load_tokenizer
    from dume_ray.resources import peak_rss_mb, reset_peak_rss
    from dume_ray.tasks import encode_rows, load_tasks
    from dume_ray.teacher_scoring import TeacherScorer, write_group_shards
    from dume_ray.training import ce_step

    torch.set_num_threads(spec["threads"])
    reset_peak_rss()
    start = time.time()
    cfg = load_config(os.path.join(REPO, spec["config"]), spec["overrides"])
    tokenizer = load_tokenizer(spec["base_dir"])
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    mx, out, profile, scoring = cfg.eval.max_new_tokens, spec["out"], {}, {"seconds": 0.0, "model load": 0.0}
    if spec["stage"] == "experts":  # one after another; each then scores its group, as the Ray jobs do at their end
        group_of = {n: g for g, names in cfg.groups.items() for n in names}
        for group, names in cfg.groups.items():
            rows = encode_rows({n: tasks[n] for n in names}, tokenizer, "train", cfg.model.max_seq_len, group_of)
            phases = train_job(spec["base_dir"], f"{out}/{group}", rows, cfg.experts.optim,
                               ce_step(cfg.experts.optim.grad_clip, cfg.model.dtype), {n: tasks[n] for n in names}, mx,
                               cfg.seed, mlp_only=cfg.experts.train_mlp_only)
            profile = {k: profile.get(k, 0.0) + v for k, v in phases.items()}
            t = time.time()
            scorer = TeacherScorer(f"{out}/{group}", cfg.soft_targets.top_k)  # the Ray job scores the model it holds
            scoring["model load"] += time.time() - t
            t = time.time()
            write_group_shards(scorer, rows, cfg.soft_targets.batch_size, f"{out}/soft_targets/{group}", len(tokenizer))
            scoring["seconds"] += time.time() - t
    else:  # the student or the baseline, on the Ray run's soft targets
        shards = sorted(glob.glob(os.path.join(spec["soft_targets_dir"], "**", "*.parquet"), recursive=True))
        stream = pa.concat_tables([pq.read_table(p) for p in shards]).to_pylist()
        alpha = cfg.distill.alpha if spec["stage"] == "student" else 0.0
        profile = train_job(spec["base_dir"], f"{out}/{spec['stage']}", stream, cfg.distill.optim,
                           kd_step_of(cfg, alpha, len(tokenizer)), tasks, mx, cfg.seed)
    return {"seconds": time.time() - start, "profile": profile, "tokens": profile.pop("tokens"),
            "scoring": scoring, "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads()}


class PlainProcess:
    """The plain torch loop: one process (started once, before the first round) that runs every plain stage it
    is sent, one after another, as one training script would; `run` sends a stage and waits for its result."""
    DONE = "[plain-stage-done]"

    def __init__(self, log: str):
        self.log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--plain-worker"], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def run(self, stage: str, args, overrides: list[str], base_dir: str, soft_targets_dir: str, threads: int) -> dict:
        work = tempfile.mkdtemp(prefix=f"bench-smol-plain-{stage}-")
        spec = {"stage": stage, "config": args.config, "overrides": overrides, "base_dir": base_dir,
                "soft_targets_dir": soft_targets_dir, "out": work, "threads": threads}
        print(f"[smollm2_stages] plain {stage} ({threads} torch threads)", flush=True)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:  # what the stage prints, then its result
            if line.startswith(self.DONE):
                break
            self.log.write(line)
        else:
            raise RuntimeError(f"the plain process died (rc={self.proc.wait()}) during {stage}; see {self.log.name}")
        result = json.loads(line[len(self.DONE):])
        shutil.rmtree(work, ignore_errors=True)
        if "error" in result:
            raise RuntimeError(f"plain {stage} failed: {result['error']}; see {self.log.name}")
        print(f"[smollm2_stages]   plain {stage}: {result['seconds']:.1f} s", flush=True)
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def plain_worker() -> int:
    """The plain process's loop: a stage spec per line on stdin, its result as one line on stdout."""
    import traceback
    for line in sys.stdin:
        try:
            result = plain_stage(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which stops with it
            traceback.print_exc()
            result = {"error": repr(exc)}
        print(PlainProcess.DONE + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The Ray side: the real CLI, one stage at a time, on one Ray.
# ---------------------------------------------------------------------------------------------------------

def run_ray(stage: str, base_args: list[str], run_dir: str, log: str, extra: list[str] = ()) -> dict:
    """`python -m dume_ray <stage>` after removing what it would otherwise skip; the command's wall time, its jobs'
    phases (summed), tokens and peak RSS (the largest job's), and this driver's peak RSS during the command."""
    from dume_ray.worker_utils import peak_rss_mb, reset_peak_rss
    folders = {"experts": ["experts", "soft_targets"], "soft-targets": [], "distill": ["student"], "multitask": ["multitask"]}
    for folder in folders[stage]:
        shutil.rmtree(os.path.join(run_dir, folder), ignore_errors=True)
    reset_peak_rss()
    wall = cli([stage, *base_args, *extra], log, "smollm2_stages")
    driver = peak_rss_mb()
    if stage == "soft-targets":
        return {"seconds": wall, "driver_peak_rss_mb": driver}
    done = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(run_dir, "experts", "*", "DONE.json")))] \
        if stage == "experts" else [json.load(open(os.path.join(run_dir, "student" if stage == "distill" else stage, "DONE.json")))]
    profiles = [m["metrics"]["profile"] for m in done]
    return {"seconds": wall, "profile": {k: round(sum(p.get(k, 0.0) for p in profiles), 2) for k in profiles[0]},
            "tokens": sum(m["metrics"]["tokens"] for m in done),
            "peak_rss_mb": max(m["metrics"]["peak_rss_mb"] for m in done), "driver_peak_rss_mb": driver}


def response_tokens(cfg, base_dir: str) -> int:
    """Response tokens in the experts' training rows: what the soft-target scoring scores (both sides)."""
    from dume_ray.model import load_tokenizer
    from dume_ray.tasks import encode_rows, load_tasks
    tokenizer = load_tokenizer(base_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    rows = encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len, {n: "all" for n in tasks})
    return sum(len(r["input_ids"]) - r["response_start"] for r in rows)


# ---------------------------------------------------------------------------------------------------------
# The comparison.
# ---------------------------------------------------------------------------------------------------------

def speed(side: dict) -> float:
    """Steady tokens/s: tokens over the seconds of the "steps" phase."""
    return side["tokens"] / side["profile"]["steps"] if side["profile"].get("steps") else float("nan")


def summarize(rounds: list[dict], scored_tokens: int) -> tuple[str, dict]:
    """The tables (medians over rounds) and the median Ray / plain per stage."""
    def med(values) -> float:
        return statistics.median(list(values))

    rows, ratios = [], {}
    for stage in STAGES:
        ray_s, plain_s = med(r[stage]["ray"]["seconds"] for r in rounds), med(r[stage]["plain"]["seconds"] for r in rounds)
        ratio = med(r[stage]["ray"]["seconds"] / r[stage]["plain"]["seconds"] for r in rounds)
        tok = med(speed(r[stage]["ray"]) / speed(r[stage]["plain"]) for r in rounds)
        ratios[stage] = {"wall_ray_over_plain": ratio, "steps_tokens_per_s_plain_over_ray": tok}
        rows.append([stage, f"{ray_s:.1f}", f"{plain_s:.1f}", f"{ratio:.2f}",
                     f"{med(speed(r[stage]['ray']) for r in rounds):.0f}", f"{med(speed(r[stage]['plain']) for r in rounds):.0f}",
                     f"{med(r[stage]['ray']['peak_rss_mb'] for r in rounds):.0f}",
                     f"{med(r[stage]['plain']['peak_rss_mb'] for r in rounds):.0f}",
                     f"{med(r[stage]['ray']['driver_peak_rss_mb'] for r in rounds):.0f}"])
    ray_score = med(r["experts"]["ray"]["profile"].get("soft targets", float("nan")) for r in rounds)
    plain_score = med(r["experts"]["plain"]["scoring"]["seconds"] for r in rounds)
    ratios["soft_target_scoring"] = {"seconds_ray_over_plain": med(
        r["experts"]["ray"]["profile"].get("soft targets", float("nan")) / r["experts"]["plain"]["scoring"]["seconds"] for r in rounds)}
    rows.append(["soft-target scoring (in the expert jobs)", f"{ray_score:.1f}", f"{plain_score:.1f}",
                 f"{ratios['soft_target_scoring']['seconds_ray_over_plain']:.2f}",
                 f"{scored_tokens / ray_score:.0f}", f"{scored_tokens / plain_score:.0f}", "", "", ""])
    n = len(rounds)
    table = markdown_table([f"stage (median of {n} rounds)", "Ray wall, s", "plain wall, s", "Ray / plain",
                            "Ray tok/s (steps)", "plain tok/s (steps)", "Ray job peak RSS, MiB", "plain peak RSS, MiB",
                            "Ray driver peak RSS, MiB"], rows)
    one, two = med(r["experts"]["ray"]["seconds"] for r in rounds), med(r["experts_x2"]["ray"]["seconds"] for r in rounds)
    conc = markdown_table([f"experts, Ray (median of {n} rounds)", "stage wall, s", "tok/s (steps, all jobs)",
                           "job peak RSS, MiB (largest)"],
                          [["1 at a time (the lone job's share of the cores)", f"{one:.1f}",
                            f"{med(r['experts']['ray']['tokens'] / r['experts']['ray']['profile']['steps'] for r in rounds):.0f}",
                            f"{med(r['experts']['ray']['peak_rss_mb'] for r in rounds):.0f}"],
                           ["2 at once (one share each)", f"{two:.1f}",
                            f"{med(2 * r['experts_x2']['ray']['tokens'] / r['experts_x2']['ray']['profile']['steps'] for r in rounds):.0f}",
                            f"{med(r['experts_x2']['ray']['peak_rss_mb'] for r in rounds):.0f}"]])
    ratios["experts_two_at_once_over_one"] = med(r["experts_x2"]["ray"]["seconds"] / r["experts"]["ray"]["seconds"] for r in rounds)
    phases = ["worker start", "model build", "data load", "steps", "checkpoint", "save", "validation", "soft targets", "teardown"]

    def phase(side: dict, name: str) -> float:  # the plain experts' scoring is timed outside `train_job`
        return side["scoring"]["seconds"] if name == "soft targets" and "scoring" in side else side["profile"].get(name, 0.0)

    def driver(stage: str, side: str) -> str:  # the command's own time: its wall less its jobs' (one after another)
        if side == "plain" or stage == "experts_x2":
            return "-"
        return f"{med(r[stage]['ray']['seconds'] - r[stage]['ray']['profile'].get('job wall', 0.0) for r in rounds):.1f}"
    prof = markdown_table([f"phase seconds (median of {n} rounds)", "driver (command - jobs)", *phases],
                          [[f"{stage} ({side})", driver(stage, side),
                            *(f"{med(phase(r[stage][side], p) for r in rounds):.1f}" for p in phases)]
                           for stage in [*STAGES, "experts_x2"] for side in ("ray", "plain") if side in rounds[0][stage]])
    return f"{table}\n\n{conc}\n\n{prof}", ratios


def verdict(ratios: dict) -> str:
    walls = ", ".join(f"{s} {ratios[s]['wall_ray_over_plain']:.2f}" for s in STAGES)
    met = all(ratios[s]["wall_ray_over_plain"] <= TARGET for s in STAGES)
    return (f"Ray / plain stage wall: {walls} (target <= {TARGET} per stage: {'met' if met else 'NOT met'}); "
            f"experts 2 at once / 1 at a time: {ratios['experts_two_at_once_over_one']:.2f} of the wall")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)  # internal: the plain process
    parser.add_argument("--retable", default=None, metavar="JSON",
                        help="recompute the tables and ratios of a result file from its rounds (no measuring)")
    parser.add_argument("--note", default=None, help="with --retable: a note stored in the file (what was run and why)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both sides")
    args = parser.parse_args(argv)
    if args.plain_worker:
        return plain_worker()
    if args.retable:
        record = json.load(open(args.retable))
        table, ratios = summarize(record["rounds"], record["scored_response_tokens"])
        if args.note:
            record["note"] = args.note
        record.update(table=f"{table}\n\n{verdict(ratios)}", ratios=ratios, retabled_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      target_met=all(ratios[s]["wall_ray_over_plain"] <= TARGET for s in STAGES))
        with open(args.retable, "w") as f:
            json.dump(record, f, indent=2, default=str)
        print(record["table"])
        return 0
    started = time.time()
    import ray
    from dume_ray.config import load_config
    from dume_ray.resources import idle_core_share
    overrides = [*(TINY if args.tiny else SETTINGS), *args.overrides]
    if args.tiny:
        args.config, args.repeats = "configs/smoke/tiny.yaml", 1
        args.out = args.out or result_path("smollm2_stages", None, True)
        args.runs_dir = os.path.join(os.path.dirname(args.out), "runs")
    path = result_path("smollm2_stages", args.out, args.tiny)
    niceness = ray_workers_at_own_priority(args.tiny)
    cfg = load_config(os.path.join(REPO, args.config), overrides)
    name = "bench-smollm2-stages"
    run_dir = os.path.join(os.path.abspath(args.runs_dir), name)
    log = f"{run_dir}.log"
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)  # a finished base of the same config is kept (`base` skips it)
    base_args = ["--config", args.config, f"name={name}", f"runs_dir={os.path.abspath(args.runs_dir)}", *overrides]
    # Untimed: the GGUF import (the tiny base's training), in its own process, so this driver's memory is a driver's.
    print("[smollm2_stages] base (its own process and Ray)", flush=True)
    with open(log, "a") as f:
        subprocess.run([sys.executable, "-m", "dume_ray", "base", *base_args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    start_ray()
    base_dir = os.path.join(run_dir, "base", "model")
    # What one job alone gets in Ray's local mode (fit_concurrently: a whole share of the free cores); plain gets the same.
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = cfg.experts.resources.torch_threads * idle_core_share(cfg.experts.resources.cpus_per_worker, 1, cpus, cpus)
    x2_cpus = min(cfg.experts.resources.cpus_per_worker, cpus / 2)  # two experts must fit at once
    scored = response_tokens(cfg, base_dir)
    plain = PlainProcess(f"{run_dir}-plain.log")
    rounds, load = [], []
    for i in range(args.repeats):
        before, rnd = list(os.getloadavg()), {}
        ray_first = i % 2 == 0

        def pair(stage: str, ray_stage: str, extra: list[str] = ()) -> dict:
            sides = {}
            for side in (("ray", "plain") if ray_first else ("plain", "ray")):
                sides[side] = run_ray(ray_stage, base_args, run_dir, log, extra) if side == "ray" else \
                    plain.run(stage, args, overrides, base_dir, os.path.join(run_dir, "soft_targets"), threads)
            return sides

        def save() -> None:  # after every stage: the finished rounds' tables, and the round in progress as it is
            table, ratios = summarize(rounds, scored) if rounds else ("no round finished yet", {})
            write_result(path, "smollm2_stages", command_line(), started,
                         {"config": args.config, "overrides": overrides, "plain_torch_threads": threads, "ray_worker_niceness": niceness,
                          "scored_response_tokens": scored, "rounds": rounds, "round_in_progress": rnd,
                          "partial": len(rounds) < args.repeats, "ratios": ratios, "target": TARGET,
                          "target_met": bool(ratios) and all(ratios[s]["wall_ray_over_plain"] <= TARGET for s in STAGES),
                          "loadavg": load}, f"{table}\n\n{verdict(ratios)}" if ratios else table)

        rnd["experts"] = pair("experts", "experts", ["experts.resources.max_concurrent_jobs=1"])
        save()
        rnd["experts_x2"] = {"ray": run_ray("experts", base_args, run_dir, log, [
            "experts.resources.max_concurrent_jobs=2", f"experts.resources.cpus_per_worker={x2_cpus}"])}
        rnd["soft-targets"] = {"ray": run_ray("soft-targets", base_args, run_dir, log)}
        save()
        rnd["student"] = pair("student", "distill")
        save()
        rnd["multitask"] = pair("multitask", "multitask")
        rounds.append(rnd)
        rnd = {}
        load.append({"before": before, "after": list(os.getloadavg())})
        print(f"[smollm2_stages] round {i + 1}/{args.repeats} done; load average (1, 5, 15 min) {load[-1]}", flush=True)
        save()
        table, ratios = summarize(rounds, scored)
    plain.close()
    print(f"\n{table}\n\n{verdict(ratios)}", flush=True)
    if not args.tiny:
        shutil.rmtree(run_dir, ignore_errors=True)  # ~1 GB of models and checkpoints
    return 0


if __name__ == "__main__":
    sys.exit(main())
