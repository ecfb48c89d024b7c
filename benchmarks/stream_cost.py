"""Stream cost: student steps fed by the real Ray Data soft-target stream vs plain CE steps fed by the same loader.

    python benchmarks/stream_cost.py                 # demo model (hidden 64, 2 layers), batch 32, top-k 8
    python benchmarks/stream_cost.py --repeats 5 --steps 40
    python benchmarks/stream_cost.py --tiny          # smoke setting, writes to a temp folder

What is measured is the path the `distill` stage runs, end to end on one local Ray:
1. Shards: one fresh expert per built-in task (random weights: throughput does not depend on what they
   learned) scores its task's training rows with `TeacherScorer` and `write_shard` writes them, as the
   soft-targets stage does. A copy of the same shards without the three soft-target columns is the loader
   of a plain CE trainer ("the same loader without targets").
2. Datasets: `distill.launch.soft_target_stream` (the function `run_students` calls) turns each shard folder
   into the Ray Dataset the pipeline hands its TorchTrainer.
3. Consumption: one TorchTrainer in local mode (`num_workers: 0`, as demo.yaml's distill stage) inside a Ray
   task with one CPU, as `experts.launch.fit_concurrently` runs it, with the datasets passed as `datasets=`.
   Inside it, `worker_utils.setup_worker` and `worker_utils.batch_stream` (the student's iterator over
   `get_dataset_shard`, with its local shuffle buffer and Ray Data's prefetch) feed each mode's steps:
   - `ce`: plain stream -> `collate` -> `ce_train_step` (a multitask trainer without soft targets);
   - `stream KD`: soft-target stream -> `soft_target_batch` -> `annealed_alpha` -> `distill_train_step` (alpha,
     T, divergence from the config): the student's step (`training.kd_step` where the package has it, else
     a line-for-line copy of `distill/worker.py`'s `train_step`; the JSON says which);
   - `naive KD`: plain stream -> `collate` -> each row's teacher forward (no grad, full vocabulary, top-k in
     the loop) -> `distill_train_step`: the online alternative, teachers run inside the student's loop.
Each mode has its own student (same init, same optimiser) and its own iterator. A round is `--steps` steps of
every mode, run in chunks of `--chunk` steps with the modes in a rotating order (ce, stream, naive; stream,
naive, ce; ...), so a load spike on the shared machine hits all modes alike; `--repeats` rounds after a warm-up.
A step's time includes waiting for its batch (`next()` on the iterator), also reported alone as "waiting".
We report per mode the median over rounds of response tokens per wall-clock second and per CPU-second of the
training process (`time.process_time`: the steps plus Ray Data's iterator threads in that process; steadier
than wall-clock when other jobs share the cores), and their ratios to `ce`. Target (issue 16): stream / ce
>= 0.9 (wall-clock).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
TARGET = 0.9
MODES = ("ce (multitask, plain stream)", "stream KD (student, soft-target stream)", "naive KD (teachers in loop, plain stream)")
TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logmass")


def write_stream(models_dir: str, shards_dir: str, plain_dir: str, tasks_cfg, model_cfg, top_k: int) -> tuple[dict, str]:
    """One fresh expert per task scores its task's training rows into one Parquet shard per task (`write_shard`);
    the same rows without the soft-target columns go to `plain_dir`."""
    import pyarrow.parquet as pq
    from dume_ray.data.soft_targets import write_shard
    from dume_ray.model import create_initial_model, load_tokenizer
    from dume_ray.soft_targets.teacher_scoring import TeacherScorer
    from dume_ray.tasks import encode_rows, load_tasks

    base = create_initial_model(model_cfg, 0, os.path.join(models_dir, "student"))
    tokenizer = load_tokenizer(base)
    tasks = load_tasks(tasks_cfg, tokenizer, model_cfg.max_seq_len)
    experts = {}
    os.makedirs(plain_dir, exist_ok=True)
    for i, name in enumerate(tasks):
        experts[name] = create_initial_model(model_cfg, 100 + i, os.path.join(models_dir, f"expert-{name}"))
        rows = encode_rows({name: tasks[name]}, tokenizer, "train", model_cfg.max_seq_len, {name: name})
        scorer = TeacherScorer(experts[name], top_k)
        batch = {k: [r[k] for r in rows] for k in ("example_id", "task", "group", "input_ids", "response_start")}
        batch["input_ids"] = [list(x) for x in batch["input_ids"]]
        path = os.path.join(shards_dir, f"{name}.parquet")
        write_shard(scorer(batch), path)
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(list(TARGET_COLUMNS)), os.path.join(plain_dir, f"{name}.parquet"))
    return experts, base


def stream_manifest(shards_dir: str) -> dict:
    """The parts of the soft-targets stage's manifest that `soft_target_stream` reads."""
    paths = glob.glob(os.path.join(shards_dir, "*.parquet"))
    return {"outputs": {"shards": {"all": shards_dir}}, "metrics": {"bytes": sum(os.path.getsize(p) for p in paths)}}


def naive_targets(batch: dict, lm_batch: dict, teachers: dict, top_k: int) -> dict:
    """Teachers inside the loop: each row's expert forwards it (full vocab), top-k of the log-probs."""
    import torch
    from dume_ray.data.encode import response_positions

    b_idx, t_idx = response_positions(lm_batch["labels"])
    logprobs = torch.empty(len(b_idx), next(iter(teachers.values())).config.vocab_size)  # [n, v]
    with torch.no_grad():
        for group, teacher in teachers.items():
            rows = torch.tensor([g == group for g in batch["group"]])
            if not rows.any():
                continue
            logits = teacher(input_ids=lm_batch["input_ids"][rows], attention_mask=lm_batch["attention_mask"][rows]).logits
            full = torch.zeros(len(rows), *logits.shape[1:])
            full[rows] = logits.float()
            keep = rows[b_idx]
            logprobs[keep] = torch.log_softmax(full[b_idx[keep], t_idx[keep]], dim=-1)
    values, ids = torch.topk(logprobs, top_k, dim=-1)  # [n, k]
    in_topk = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(-1, ids, True)
    tail = torch.logsumexp(logprobs.masked_fill(in_topk, float("-inf")), dim=-1)  # [n]
    return {**lm_batch, "topk_ids": ids, "topk_logprobs": values, "tail_logmass": tail}


def bench_loop(config: dict) -> dict:
    """Ray Train worker: the three modes, each on its own `batch_stream`, interleaved; per-round throughput."""
    import torch
    from dume_ray.config import OptimConfig, from_dict
    from dume_ray.data.encode import batch_rows, collate
    try:  # where the package keeps them after the training-loop refactor, else where they were before
        from dume_ray.losses import annealed_alpha
    except ImportError:
        from dume_ray.distill.losses import annealed_alpha
    from dume_ray.distill.worker import soft_target_batch  # re-exported there by both layouts
    from dume_ray.model import load_model, load_tokenizer
    from dume_ray.training import ce_train_step, distill_train_step, make_optimizer
    from dume_ray.worker_utils import batch_stream, per_worker_batch_size, setup_worker

    optim = from_dict(OptimConfig, config["optim"])
    device = setup_worker(config["seed"], config["torch_threads"])
    pad_id = load_tokenizer(config["student_dir"]).pad_token_id
    teachers = {g: load_model(p).eval() for g, p in config["expert_dirs"].items()}
    top_k, bs = config["top_k"], per_worker_batch_size(optim.batch_size)

    try:  # the pipeline's own step functions, where this version of the package has them
        from dume_ray.training import ce_step, kd_step
        ce = ce_step(optim.grad_clip, config["dtype"])
        stream_kd = kd_step(optim.grad_clip, top_k, config["alpha"], optim.steps, config["anneal"], config["temperature"],
                            config["divergence"], config["jsd_beta"], config["dtype"])
        step_source = "training.ce_step / training.kd_step"
    except ImportError:  # before them: the bodies of experts/worker.py's and distill/worker.py's train_step
        step_source = "copies of the workers' train_step bodies (ce_train_step / soft_target_batch + distill_train_step)"

        def ce(model, batch, optimizer, scheduler, step, pad_id, device):
            lm = {k: v.to(device) for k, v in collate(batch_rows(batch), pad_id).items()}
            return ce_train_step(model, lm, optimizer, scheduler, optim.grad_clip, config["dtype"])

        def stream_kd(model, batch, optimizer, scheduler, step, pad_id, device):
            batch = {k: v.to(device) for k, v in soft_target_batch(batch, pad_id, top_k).items()}
            alpha = annealed_alpha(config["alpha"], step, optim.steps, config["anneal"])
            return distill_train_step(model, batch, optimizer, scheduler, optim.grad_clip, alpha, config["temperature"],
                                      config["divergence"], config["jsd_beta"], config["dtype"])

    def naive_kd(model, batch, optimizer, scheduler, step, pad_id, device):
        lm = collate(batch_rows(batch), pad_id)
        alpha = annealed_alpha(config["alpha"], step, optim.steps, config["anneal"])
        return distill_train_step(model, naive_targets(batch, lm, teachers, top_k), optimizer, scheduler, optim.grad_clip,
                                  alpha, config["temperature"], config["divergence"], config["jsd_beta"], config["dtype"])

    # mode -> (step function, dataset name); every mode has its own iterator (its own Ray Data split)
    plan = {MODES[0]: (ce, "plain_ce"), MODES[1]: (stream_kd, "train"), MODES[2]: (naive_kd, "plain_naive")}
    state = {}
    for mode, (fn, dataset) in plan.items():  # one student per mode: same init, same optimiser
        model = load_model(config["student_dir"]).to(device)
        state[mode] = [model, *make_optimizer(model, optim), 0, batch_stream(dataset, bs, seed=config["seed"])]

    def run(mode: str, n: int) -> tuple[int, float, float, float]:
        model, optimizer, scheduler, step, batches = state[mode]
        tokens, wait, t, cpu = 0, 0.0, time.perf_counter(), time.process_time()
        for _ in range(n):
            w = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - w
            tokens += plan[mode][0](model, batch, optimizer, scheduler, step, pad_id, device)["tokens"]
            step += 1
        state[mode][3] = step
        return tokens, time.perf_counter() - t, time.process_time() - cpu, wait

    for mode in plan:  # warm-up: the first batches also start each stream's executor
        run(mode, config["warmup"])
    rates, cpu_rates, waits = ({mode: [] for mode in plan} for _ in range(3))
    order = list(plan)
    for _ in range(config["repeats"]):
        total = {mode: [0, 0.0, 0.0, 0.0] for mode in plan}  # tokens, wall s, CPU s, wait s
        for chunk in range(-(-config["steps"] // config["chunk"])):
            # chunks of a few steps, modes in a rotating order: a load spike on the shared machine hits all alike
            for mode in order[chunk % 3:] + order[:chunk % 3]:
                n = min(config["chunk"], config["steps"] - chunk * config["chunk"])
                total[mode] = [a + b for a, b in zip(total[mode], run(mode, n))]
        for mode, (tokens, wall, cpu, wait) in total.items():
            rates[mode].append(tokens / wall)
            cpu_rates[mode].append(tokens / cpu)
            waits[mode].append(wait / wall)
    return {"rates": rates, "cpu_rates": cpu_rates, "data_wait_fraction": waits, "step_functions": step_source, "torch_threads": torch.get_num_threads(), "batch_size": bs}


def run_on_ray(loop_config: dict, datasets: dict, cpus: int, storage: str) -> dict:
    """`experts.launch._fit` with several datasets: a TorchTrainer in a Ray task that holds the worker's CPUs."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    @ray.remote(num_cpus=cpus)
    def fit(config, data):
        trainer = TorchTrainer(bench_loop, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=0, resources_per_worker={"CPU": cpus}),
                               run_config=RunConfig(name="stream-cost", storage_path=storage), datasets=data)
        return trainer.fit().return_value

    return ray.get(fit.remote(loop_config, datasets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="model, tasks, batch size, alpha/T, top-k, resources")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=5, help="steps of one mode before switching to the next")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (the machine has 2)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = time.time()

    import ray
    import ray.data
    from dume_ray.config import load_config, to_dict
    from dume_ray.distill.launch import soft_target_stream

    overrides = ["tasks.builtin=[copy,reverse]", "tasks.num_train=64", "model.hidden_size=32", "model.intermediate_size=64"] if args.tiny else []
    if args.tiny:
        args.steps, args.repeats, args.warmup, args.chunk = 2, 2, 1, 1
    cfg = load_config(os.path.join(REPO, args.config), overrides)
    work = tempfile.mkdtemp(prefix="bench-stream-")
    shards, plain = os.path.join(work, "shards"), os.path.join(work, "plain")
    t0 = time.time()
    expert_dirs, student_dir = write_stream(os.path.join(work, "models"), shards, plain, cfg.tasks, cfg.model, cfg.soft_targets.top_k)
    scoring_seconds = time.time() - t0

    t0 = time.time()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
    ray_start_seconds = time.time() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False  # the table, not Ray Data's bars, is the output
    try:
        cache = cfg.soft_targets.cache_max_mb
        datasets = {"train": soft_target_stream(stream_manifest(shards), cache, cfg.seed),
                    "plain_ce": soft_target_stream(stream_manifest(plain), cache, cfg.seed),
                    "plain_naive": soft_target_stream(stream_manifest(plain), cache, cfg.seed)}
        d, res = cfg.distill, cfg.distill.resources
        loop_config = {"optim": to_dict(d.optim), "alpha": d.alpha, "temperature": d.temperature, "divergence": d.divergence,
                       "jsd_beta": d.jsd_beta, "anneal": d.anneal and d.alpha > 0, "top_k": cfg.soft_targets.top_k,
                       "seed": cfg.seed, "torch_threads": res.torch_threads, "dtype": cfg.model.dtype,
                       "student_dir": student_dir, "expert_dirs": expert_dirs,
                       "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "chunk": args.chunk}
        t0 = time.time()
        out = run_on_ray(loop_config, datasets, res.cpus_per_worker, os.path.join(work, "ray_train"))
        fit_seconds = time.time() - t0
        cached = stream_manifest(shards)["metrics"]["bytes"] <= cache * 2**20
    finally:
        ray.shutdown()

    rates, cpu_rates, waits = out["rates"], out["cpu_rates"], out["data_wait_fraction"]
    ce, ce_cpu = statistics.median(rates[MODES[0]]), statistics.median(cpu_rates[MODES[0]])
    rows, results = [], {}
    for mode, values in rates.items():
        med, med_cpu = statistics.median(values), statistics.median(cpu_rates[mode])
        rows.append([mode, f"{med:,.0f}", f"{min(values):,.0f}–{max(values):,.0f}", f"{med / ce:.2f}",
                     f"{med_cpu:,.0f}", f"{med_cpu / ce_cpu:.2f}", f"{statistics.median(waits[mode]):.0%}"])
        results[mode] = {"median_tokens_per_s": med, "per_round": values, "ratio_to_ce": med / ce,
                         "median_tokens_per_cpu_s": med_cpu, "per_round_per_cpu_s": cpu_rates[mode],
                         "cpu_ratio_to_ce": med_cpu / ce_cpu,
                         "data_wait_fraction_per_round": waits[mode], "median_data_wait_fraction": statistics.median(waits[mode])}
    ratio, cpu_ratio = results[MODES[1]]["ratio_to_ce"], results[MODES[1]]["cpu_ratio_to_ce"]
    per_round = [s / c for s, c in zip(rates[MODES[1]], rates[MODES[0]])]
    table = markdown_table(["step (fed by)", "response tokens/s, wall (median)", "range over rounds", "ratio to ce",
                            "tokens per CPU-second (median)", "ratio to ce, CPU", "time waiting for the batch (median)"], rows)
    verdict = (f"stream / ce = {ratio:.2f} wall-clock, {cpu_ratio:.2f} per CPU-second "
               f"(target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'} on wall-clock); "
               f"wall-clock ratio per round {', '.join(f'{r:.2f}' for r in per_round)}")
    print(f"\n{table}\n\n{verdict}", flush=True)
    from dume_ray.model import load_tokenizer
    settings = {"config": args.config, "model": {"hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
                                                 "vocab_size": len(load_tokenizer(student_dir))},
                "batch_size": out["batch_size"], "top_k": cfg.soft_targets.top_k, "alpha": d.alpha, "temperature": d.temperature,
                "teachers": len(expert_dirs), "steps_per_round": args.steps, "rounds": args.repeats, "warmup": args.warmup,
                "steps_per_switch": args.chunk,
                "torch_threads": out["torch_threads"], "ray_cpus": args.ray_cpus, "worker_cpus": res.cpus_per_worker,
                "stream": ("in-memory blocks (soft_target_stream: shards <= cache_max_mb)" if cached
                           else "read_parquet each epoch (shards > cache_max_mb)"),
                "step_functions": out["step_functions"],
                "iterator": "worker_utils.batch_stream (get_dataset_shard -> iter_batches numpy, local shuffle buffer 4x batch)",
                "shard_bytes": stream_manifest(shards)["metrics"]["bytes"], "plain_shard_bytes": stream_manifest(plain)["metrics"]["bytes"],
                "scoring_seconds": round(scoring_seconds, 1), "ray_start_seconds": round(ray_start_seconds, 1),
                "trainer_seconds": round(fit_seconds, 1)}
    write_result(result_path("stream_cost", args.out, args.tiny), "stream_cost", command_line(), started,
                 {"settings": settings, "results": results, "stream_over_ce": ratio, "stream_over_ce_per_round": per_round,
                  "stream_over_ce_per_cpu_s": cpu_ratio,
                  "cpu_time": "time.process_time() of the training process: the step, and Ray Data's iterator and prefetch "
                              "threads that run in it (not Ray's other processes)",
                  "target": TARGET, "target_met": ratio >= TARGET}, f"{table}\n\n{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
