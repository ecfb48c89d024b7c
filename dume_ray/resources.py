"""What each stage asks of the cluster, and whether the cluster can give it: a readable error instead of a hang.

Ray queues a task or a Ray Train worker group that asks for more than the cluster has, and waits for an
autoscaler that may never come (a CPU box asked for `use_gpu: true`, a 2-GPU worker on 1-GPU nodes). The
driver (`cli.py`) therefore compares every stage's largest job with the live nodes before it starts:

    shapes = stage_jobs(cfg, ["experts", "soft-targets"])     # {stage: [bundle, ...]} for one job
    problems = resource_problems(shapes, node_resources)       # [] when everything fits

A bundle is one worker's or actor's resources ({"CPU": 1.0, "GPU": 1.0}); a job's bundles must each fit on
one node and together fit in the cluster. Concurrency between jobs is Ray's business: one job that fits is
enough to make progress.

Memory: every training job and scoring actor also asks Ray for `memory=` sized from its model's weights on
disk (`job_memory_bytes`), so on a big model the scheduler places (or queues) them by memory, instead of
packing them by CPU until a node runs out and Ray warns or kills a worker.

Peak memory: `reset_peak_rss()` at a job's start and `peak_rss_mb()` at its end give the job's own peak in a
process that runs many (a reused Ray worker; benchmarks/smollm2_stages.py's plain loop).

Pure: no Ray here. Tested in tests/unit/test_resources.py.
"""

from __future__ import annotations

import glob
import os
import resource
import sys

from dume_ray.config import PipelineConfig, ResourcesConfig

Bundle = dict[str, float]


class ResourceShortage(RuntimeError):
    """The cluster cannot run a stage's job as configured; the message says what and which keys to change."""


# Copies of the weights one job holds: training = weights + gradients + AdamW's two moments (4) plus as much
# again for activations, the optimizer step's temporaries and checkpoint serialization; scoring = the weights
# plus a forward's activations and the logits of a batch.
TRAIN_MEMORY_FACTOR = 8.0
SCORE_MEMORY_FACTOR = 3.0
MIN_MEMORY_BYTES = 256 * 2**20  # Python, torch and Ray's worker itself, whatever the model


def weights_bytes(model_dir: str) -> int:
    """Size of a saved model's weights (its safetensors / .bin files), 0 when the folder has none."""
    files = glob.glob(os.path.join(model_dir, "*.safetensors")) + glob.glob(os.path.join(model_dir, "*.bin"))
    return sum(os.path.getsize(f) for f in files)


def job_memory_bytes(model_dir: str, factor: float, largest_node: float = 0) -> int:
    """The `memory=` a job on this model asks Ray for: its weights' size x `factor`, at least MIN_MEMORY_BYTES,
    and at most `largest_node` (the most memory any node offers, when known): a request no node can meet would
    leave the job queued forever, while a capped one runs where it fits best."""
    wanted = max(MIN_MEMORY_BYTES, weights_bytes(model_dir) * factor)
    return int(min(wanted, largest_node) if largest_node > 0 else wanted)


def idle_core_share(cpus_per_job: float, jobs: int, free_cpus: float, largest_node_cpus: float,
                    enabled: bool = True) -> int:
    """How many times its configured CPUs (and torch threads) each of `jobs` local-mode jobs takes, so that
    fewer jobs than free cores leave none idle (the base alone, one expert added to a finished run): a whole
    share of the free CPUs, never more than one node holds; 1 when the jobs already fill the cluster, or when
    not `enabled` (`resources.share_idle_cores=false`)."""
    if not enabled or jobs <= 0 or cpus_per_job <= 0:
        return 1
    return max(1, int(min(free_cpus / jobs, largest_node_cpus) // cpus_per_job))


def training_job_bundles(resources: ResourcesConfig) -> list[Bundle]:
    """One Ray Train job: `num_workers` workers, or (local mode) the single Ray task that runs it."""
    if resources.num_workers == 0:
        return [{"CPU": resources.cpus_per_worker}]
    worker = {"CPU": resources.cpus_per_worker, **({"GPU": 1.0} if resources.use_gpu else {})}
    return [dict(worker) for _ in range(resources.num_workers)]


def stage_jobs(cfg: PipelineConfig, stages: list[str]) -> dict[str, list[Bundle]]:
    """{stage: bundles of its largest single job} for the stages about to run (CLI names)."""
    shapes: dict[str, list[Bundle]] = {}
    for stage in stages:
        if stage == "base" and cfg.base.enabled:
            shapes[stage] = training_job_bundles(cfg.base.resources)
        elif stage == "experts":
            shapes[stage] = training_job_bundles(cfg.experts.resources)
        elif stage in ("distill", "multitask", "distill+multitask"):
            shapes[stage] = training_job_bundles(cfg.distill.resources)
        elif stage == "soft-targets":
            st = cfg.soft_targets
            actor = {"CPU": st.cpus_per_actor, **({"GPU": st.gpus_per_actor} if st.gpus_per_actor > 0 else {})}
            shapes[stage] = [dict(actor) for _ in range(st.num_actors)]
        elif stage == "eval":
            shapes[stage] = [{"CPU": 1.0, **({"GPU": cfg.eval.gpus_per_task} if cfg.eval.gpus_per_task > 0 else {})}]
    return shapes


def resource_problems(shapes: dict[str, list[Bundle]], nodes: list[Bundle]) -> list[str]:
    """Why a stage's job can never be scheduled on these nodes (each node's total resources); [] if it can."""
    total: Bundle = {}
    for node in nodes:
        for key, amount in node.items():
            total[key] = total.get(key, 0.0) + amount
    problems = []
    for stage, bundles in shapes.items():
        for bundle in bundles:
            if not any(_fits(bundle, node) for node in nodes):
                problems.append(f"{stage}: one worker asks for {_show(bundle)} but no node has that much "
                                f"(largest node: {_show(_largest(nodes, bundle))})")
                break
        need: Bundle = {}
        for bundle in bundles:
            for key, amount in bundle.items():
                need[key] = need.get(key, 0.0) + amount
        short = {k: v for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
        if short:
            problems.append(f"{stage}: one job needs {_show(need)} in all ({len(bundles)} worker(s)) but the cluster "
                            f"has {_show({k: total.get(k, 0.0) for k in need})}")
    return problems


def explain(problems: list[str], waited_s: float) -> str:
    """The error a user reads: what does not fit, and which config keys change it."""
    lines = [f"the Ray cluster cannot provide the resources this config asks for (waited {waited_s:.0f} s):"]
    lines += [f"  - {p}" for p in problems]
    lines.append("Lower <stage>.resources.num_workers / cpus_per_worker, set <stage>.resources.use_gpu=false, or "
                 "soft_targets.gpus_per_actor / num_actors; or add nodes (an autoscaling cluster gets "
                 "resource_wait_s seconds to provide them).")
    return "\n".join(lines)


def _fits(bundle: Bundle, node: Bundle) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _largest(nodes: list[Bundle], bundle: Bundle) -> Bundle:
    return {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in bundle}


def _show(bundle: Bundle) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(bundle.items()))


def reset_peak_rss() -> None:
    """Start this process's peak-RSS count afresh (Linux: `/proc/self/clear_refs`; elsewhere a no-op, and
    `peak_rss_mb` then reports the peak since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since `reset_peak_rss` (VmHWM), or since it started
    (`getrusage` ru_maxrss) where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)
