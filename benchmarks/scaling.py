"""Scaling (GPU machines only): experts trained concurrently vs one after another on the same devices.

    python benchmarks/scaling.py                     # needs CUDA; on CPU prints "skipped: no GPU", exits 0
    python benchmarks/scaling.py --tiny              # smoke setting, writes to a temp folder

With CUDA, it runs the `experts` stage twice on the same base (the `base` stage first): once with
`experts.resources.max_concurrent_jobs=1` (one after another) and once with every group at once
(`max_concurrent_jobs=0`, each job `num_workers=1, use_gpu=true`, `soft_targets.gpus_per_actor` untouched),
and reports the stage wall times and the speed-up. On a CPU-only machine it writes `{"skipped": true}`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, result_path, write_result  # noqa: E402


def cuda_devices() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def timed_experts(config: str, overrides: list[str], runs_dir: str, name: str, concurrent: int) -> float:
    """Wall seconds of a fresh `experts` stage (the base is reused from the first run via a link)."""
    run_dir = os.path.join(runs_dir, name)
    shutil.rmtree(os.path.join(run_dir, "experts"), ignore_errors=True)
    common = [f"name={name}", f"runs_dir={runs_dir}", "experts.resources.num_workers=1", "experts.resources.use_gpu=true",
              f"experts.resources.max_concurrent_jobs={concurrent}", *overrides]
    subprocess.run([sys.executable, "-m", "dume_ray", "base", "--config", config, *common], cwd=REPO, check=True)
    start = time.time()
    subprocess.run([sys.executable, "-m", "dume_ray", "experts", "--config", config, *common], cwd=REPO, check=True)
    return time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = time.time()
    path = result_path("scaling", args.out, args.tiny)
    gpus = cuda_devices()
    if gpus == 0:
        print("skipped: no GPU", flush=True)
        write_result(path, "scaling", command_line(), started, {"skipped": True, "reason": "no GPU"}, "skipped: no GPU")
        return 0
    overrides = ["experts.optim.steps=2", "base.optim.steps=2", "tasks.num_train=32"] if args.tiny else []
    runs_dir = os.path.abspath(args.runs_dir)
    serial = timed_experts(args.config, overrides, runs_dir, "bench-scaling", concurrent=1)
    concurrent = timed_experts(args.config, overrides, runs_dir, "bench-scaling", concurrent=0)
    rows = [["one after another (max_concurrent_jobs=1)", f"{serial:.1f}", "1.00"],
            ["concurrently (max_concurrent_jobs=0)", f"{concurrent:.1f}", f"{serial / concurrent:.2f}"]]
    table = markdown_table([f"experts stage on {gpus} GPU(s)", "wall s", "speed-up"], rows)
    print("\n" + table, flush=True)
    write_result(path, "scaling", command_line(), started,
                 {"skipped": False, "gpus": gpus, "serial_seconds": serial, "concurrent_seconds": concurrent}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
