"""Stage manifests, and atomic writes of everything a stage outputs.

`<stage dir>/DONE.json` records what a finished stage was built from and what it made, and which run made it
(`RUN_ID`: one CLI command). A stage is skipped on rerun only when its manifest exists and
its config hash (see `stage_hashes.py`) matches; any change upstream changes the hash, so stale outputs are
never reused.

Every output is written to a temp name and renamed into place (`write_json_atomic`, `write_text_atomic`,
`atomic_dir`), and the manifest is written last, so a crash never leaves a half-written file or folder that
looks finished: at worst the stage has no manifest and reruns (training resumes from its checkpoint).

Pure: no Ray here. Tested in tests/unit/test_manifest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Iterator, Optional

MANIFEST = "DONE.json"
RUN_ID = ""  # the run (one CLI command: `start_run`) that the manifests written now belong to, so a report can
#   tell what this run trained from what it reused


def start_run() -> str:
    """A new run id (time and process id; a process that runs several commands gets one per command)."""
    global RUN_ID
    RUN_ID = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"
    return RUN_ID


start_run()  # a stage called outside the CLI (tests, benchmarks) has one run id per process


def write_json_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temp folder beside `path`; when the block finishes, it replaces `path` in one rename
    (an older `path` is moved aside first and then deleted). If the block raises, `path` is untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(stage_dir: str) -> Optional[dict]:
    path = os.path.join(stage_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError (binary garbage)
        return None  # unreadable manifest = stage not finished; it reruns
    return manifest if isinstance(manifest, dict) else None  # valid JSON but not a manifest object


def is_done(stage_dir: str, config_hash: str) -> bool:
    manifest = read_manifest(stage_dir)
    return manifest is not None and manifest.get("config_hash") == config_hash


def mark_done(stage_dir: str, config_hash: str, outputs: dict, metrics: Optional[dict] = None,
              inputs: Optional[dict] = None, seconds: Optional[float] = None) -> dict:
    manifest = {"config_hash": config_hash, "inputs": inputs or {}, "outputs": outputs,
                "metrics": metrics or {}, "seconds": seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "run_id": RUN_ID}
    write_json_atomic(os.path.join(stage_dir, MANIFEST), manifest)
    return manifest


class StageInputError(RuntimeError):
    """A stage's input is missing or was made from another config; the message says what to run."""


def require(stage_dir: str, command: str, expected_hash: Optional[str] = None) -> dict:
    """The manifest of an upstream stage this stage reads; raises StageInputError when that stage has not
    finished, or finished for another config (its outputs would be stale for this one)."""
    found = read_manifest(stage_dir)
    if found is None:
        raise StageInputError(f"stage '{command}' has not finished in {stage_dir}: run `python -m dume_ray {command}` "
                              f"(or `run`) with this config first")
    if expected_hash is not None and found.get("config_hash") != expected_hash:
        raise StageInputError(f"{stage_dir} was made with another config (hash {found.get('config_hash')}, this config "
                              f"needs {expected_hash}): rerun `python -m dume_ray {command}` (or `run`) with this config")
    return found


def clear(stage_dir: str) -> None:
    """Forget a stage's completion before redoing it (its outputs are then overwritten)."""
    path = os.path.join(stage_dir, MANIFEST)
    if os.path.exists(path):
        os.remove(path)
