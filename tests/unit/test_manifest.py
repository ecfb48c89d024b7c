"""Stage manifests: completion by config hash, corrupt manifests, atomic writes, clearing.

Run: cd /work/main && .venv/bin/python -m pytest tests/unit/test_manifest.py -q
"""

from __future__ import annotations

import json
import os

import pytest

from dume_ray.manifest import MANIFEST, clear, is_done, mark_done, read_manifest, write_json_atomic


def test_stage_is_not_done_before_mark_done(tmp_path):
    assert not is_done(str(tmp_path / "stage"), "abc")
    assert read_manifest(str(tmp_path / "stage")) is None


def test_stage_is_done_after_mark_done_with_same_hash(tmp_path):
    stage = str(tmp_path / "stage")
    manifest = mark_done(stage, "abc", outputs={"model": "m"}, metrics={"loss": 1.5}, seconds=2.0)
    assert is_done(stage, "abc")
    on_disk = read_manifest(stage)
    assert on_disk["config_hash"] == "abc"
    assert on_disk["outputs"] == {"model": "m"} and on_disk["metrics"] == {"loss": 1.5}
    assert on_disk == json.loads(json.dumps(manifest))


def test_stage_is_not_done_for_another_hash(tmp_path):
    stage = str(tmp_path / "stage")
    mark_done(stage, "abc", outputs={})
    assert not is_done(stage, "abd")


@pytest.mark.parametrize("content", [
    b"",                                  # empty file
    b'{"config_hash": "abc", "outp',      # truncated JSON
    b"\xff\xfe\x00\x81 not utf-8",        # binary garbage
    b'["abc"]',                           # valid JSON, not an object
    b'"abc"',
], ids=["empty", "truncated", "binary", "json-list", "json-string"])
def test_corrupt_manifest_counts_as_not_done(tmp_path, content):
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / MANIFEST).write_bytes(content)
    assert read_manifest(str(stage)) is None
    assert not is_done(str(stage), "abc")


def test_unreadable_manifest_path_counts_as_not_done(tmp_path):
    stage = tmp_path / "stage"
    (stage / MANIFEST).mkdir(parents=True)  # a folder where the file should be: open() fails
    assert not is_done(str(stage), "abc")


def test_write_json_atomic_leaves_only_the_target_file(tmp_path):
    target = tmp_path / "deep" / "out.json"
    write_json_atomic(str(target), {"b": 1, "a": [1, 2]})
    write_json_atomic(str(target), {"b": 2})  # overwrite goes through the same temp+rename
    assert os.listdir(target.parent) == ["out.json"]
    assert json.loads(target.read_text()) == {"b": 2}


def test_clear_removes_manifest_and_is_idempotent(tmp_path):
    stage = str(tmp_path / "stage")
    mark_done(stage, "abc", outputs={})
    clear(stage)
    assert not os.path.exists(os.path.join(stage, MANIFEST))
    assert not is_done(stage, "abc")
    clear(stage)  # clearing an unfinished stage is a no-op
    assert not os.path.exists(os.path.join(stage, MANIFEST))
