"""Stage manifests: `<stage dir>/DONE.json` records what a finished stage was built from and what it made.

A stage is skipped on rerun only when its manifest exists and its config hash (which folds in the hashes
of the stages it reads) matches; any change upstream changes the hash, so stale outputs are never reused.
Manifests are written to a temp name and renamed, so a crash never leaves one that looks finished.

Pure: no Ray here. Tested in tests/unit/test_manifest.py.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

MANIFEST = "DONE.json"


def write_json_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
                "metrics": metrics or {}, "seconds": seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(os.path.join(stage_dir, MANIFEST), manifest)
    return manifest


def clear(stage_dir: str) -> None:
    """Forget a stage's completion before redoing it (its outputs are then overwritten)."""
    path = os.path.join(stage_dir, MANIFEST)
    if os.path.exists(path):
        os.remove(path)
