"""Shared helpers of the benchmark scripts: markdown tables, result JSON with machine info, run metadata, and
`cli`, which runs `python -m dume_ray ...` in the benchmark's own process on one Ray kept up between calls.

Every script in benchmarks/ prints a markdown table and writes `benchmarks/results/<name>.json` through
`write_result` (or the path given with `--out`; `--tiny` runs default to a temp folder so they never
overwrite the committed results). Benchmarks are not part of the package and are not run by CI; one smoke
test (tests/smoke/test_benchmarks.py) runs each with `--tiny`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Optional, Sequence

# Quiet Hugging Face progress bars in the benchmarks' own processes and their subprocesses (as the CLI does).
os.environ.update({"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None  # when the script started


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """Rows of cells (strings or numbers; floats get 3 decimals) -> a markdown table."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "–" if v is None else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_pm(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """'0.232 ± 0.012' (mean ± sample std) for a list of per-seed values; tables give n in their own column."""
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def start_ray() -> None:
    """One local Ray for every in-process `cli.main` call of a benchmark: a command that finds Ray running uses
    it and leaves it up, where it would otherwise start and stop its own (~10 s each on 2 cores, and its
    worker processes would import torch again)."""
    import ray
    from dume_ray.cli import QUIET_ENV
    os.environ.update(QUIET_ENV)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": QUIET_ENV})


def cli(argv: list[str], log_path: str, tag: str = "bench") -> float:
    """`python -m dume_ray ...` in this process, on the one Ray `start_ray` keeps up between calls (started before
    the call's clock starts); its output appended to a log. Returns its wall time in seconds; raises on failure."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from dume_ray.cli import main
    start_ray()
    print(f"[{tag}] $ python -m dume_ray {' '.join(argv)}", flush=True)
    start = time.time()
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = main(argv)
    seconds = time.time() - start
    print(f"[{tag}]   rc={rc} in {seconds:.0f} s (log {log_path})", flush=True)
    if rc != 0:
        raise RuntimeError(f"python -m dume_ray {' '.join(argv)} failed (rc={rc}); see {log_path}")
    return seconds


def ray_workers_at_own_priority(tiny: bool) -> str:
    """Ray's workers at the `run` process's priority (`RAY_worker_niceness=0`; Ray's default is nice 15) unless the
    environment sets it or it is a --tiny smoke run (which keeps the default, as the test suite's other Ray
    instances do): a timing beside a plain loop, or between stages in workers and in the driver, then compares
    like with like on a machine other work also loads. Returns the value for the result JSON."""
    if not tiny:
        os.environ.setdefault("RAY_worker_niceness", "0")
    return os.environ.get("RAY_worker_niceness", "Ray's default (15)")


def machine_info() -> dict:
    """Where and on what the numbers were measured, including the load at the time."""
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "hostname": platform.node()}
    try:
        info["loadavg_1_5_15_at_start"] = LOAD_AT_START
        info["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import ray
        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def result_path(name: str, out: Optional[str], tiny: bool) -> str:
    """--out if given; tiny runs go to a temp folder (never over benchmarks/results/); else results/<name>.json."""
    if out:
        return out
    if tiny:
        return os.path.join(tempfile.mkdtemp(prefix=f"bench-{name}-"), f"{name}.json")
    return os.path.join(RESULTS_DIR, f"{name}.json")


def write_result(path: str, name: str, command: Sequence[str], started: float, payload: dict, table: str) -> str:
    """Write {benchmark, command, started/finished UTC, wall seconds, git commit, machine, table, results}."""
    record = {"benchmark": name, "command": " ".join(command),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_seconds": round(time.time() - started, 1), "git_commit": git_commit(),
              "machine": machine_info(), "table": table, **payload}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"\n[{name}] wrote {path}", flush=True)
    return path


def command_line() -> list[str]:
    """The command as one would retype it (shell-quoted, so an empty argument shows as '')."""
    import shlex
    script = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return [shlex.quote(a) for a in ["python", script, *sys.argv[1:]]]
