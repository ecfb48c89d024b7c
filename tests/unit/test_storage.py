"""The run folder on a storage URI (`dume_ray/storage.py`), against a plain folder (pyarrow's LocalFileSystem)
and against an S3-compatible server (moto, on loopback; `s3_server` in tests/conftest.py). No Ray.

    .venv/bin/python -m pytest -q tests/unit/test_storage.py
"""

import io
import json
import os
import shutil
import time

import pyarrow.fs as pafs
import pytest

from dume_ray import storage
from dume_ray.config import ConfigError, load_config
from dume_ray.storage import FORMAT_FILE, FORMAT_VERSION, RunStorage


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    """A storage URI with nothing under it yet: a folder, or a prefix in a fresh bucket of the moto server."""
    if request.param == "local":
        return str(tmp_path / "storage")
    bucket = request.getfixturevalue("new_bucket")
    return f"s3://{bucket}/runs"


def _stage(run_dir, stage: str, files: dict, done: bool = True) -> None:
    for rel, text in files.items():
        path = os.path.join(run_dir, stage, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if done:
        with open(os.path.join(run_dir, stage, "DONE.json"), "w") as f:
            json.dump({"config_hash": "h1", "outputs": {}}, f)


def _stored(store: RunStorage) -> dict:
    """{run-relative path: bytes} of everything under the run on storage, read with plain pyarrow.fs."""
    fs, root = storage.resolve(store.uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(root):].strip("/")] = f.read()
    return out


def test_push_then_pull_into_a_fresh_node_copies_the_run_but_not_checkpoints_logs_or_temp_files(store_uri, tmp_path):
    run = tmp_path / "node_a" / "myrun"
    _stage(run, "base", {"model/config.json": "{}", "model/weights.bin": "w" * 100})
    _stage(run, "experts/copy", {"model/weights.bin": "e"})
    _stage(run, "student", {"model/weights.bin": "half"}, done=False)  # not finished: travels, no manifest
    _stage(run, "base", {"ray_train/ckpt/state": "x", ".model.tmp-1/w": "x", "model/w.tmp-99": "x"}, done=False)
    _stage(run, "logs", {"driver.log": "x"}, done=False)
    store = RunStorage.for_run(store_uri, "myrun", str(run))
    assert store.push() == 6 and store.push() == 0  # unchanged files are not sent again
    assert sorted(_stored(store)) == ["base/DONE.json", "base/model/config.json", "base/model/weights.bin",
                                      "experts/copy/DONE.json", "experts/copy/model/weights.bin",
                                      "student/model/weights.bin"]
    other = tmp_path / "node_b" / "myrun"
    fresh = RunStorage.for_run(store_uri, "myrun", str(other))
    assert fresh.pull() == 6 and fresh.pull() == 0
    assert (other / "base" / "model" / "weights.bin").read_text() == "w" * 100
    assert not (other / "base" / "ray_train").exists() and not (other / "logs").exists()


def test_manifests_are_uploaded_last_deepest_first(tmp_path, monkeypatch):
    run = tmp_path / "myrun"
    _stage(run, "soft_targets/groups/copy", {"shards/part-0.parquet": "p"})
    _stage(run, "soft_targets", {"extra.json": "{}"})
    _stage(run, "base", {"model/weights.bin": "w"})
    storage.write_format(str(run))
    store = RunStorage.for_run(str(tmp_path / "storage"), "myrun", str(run))
    written = []
    real = store._put
    monkeypatch.setattr(store, "_put", lambda path, source: written.append(path.rsplit("myrun/", 1)[1]) or real(path, source))
    store.push()
    manifests = [i for i, p in enumerate(written) if p.endswith("DONE.json")]
    assert manifests == list(range(len(written) - 3, len(written)))  # after every data file
    assert written[manifests[0]] == "soft_targets/groups/copy/DONE.json"  # a group's before its stage's
    assert written[0] == FORMAT_FILE  # first: a run folder half uploaded is still recognised as ours


def test_pull_removes_a_local_manifest_the_storage_lacks_and_replaces_a_changed_file(store_uri, tmp_path):
    """Storage is the truth: a stage finished only in a stale local copy reruns; a file changed on storage
    (same size, newer) is fetched again."""
    run_a, run_b = tmp_path / "a" / "r", tmp_path / "b" / "r"
    _stage(run_a, "base", {"model/w": "v1"})
    a = RunStorage.for_run(store_uri, "r", str(run_a))
    a.push()
    b = RunStorage.for_run(store_uri, "r", str(run_b))
    b.pull()
    _stage(run_b, "experts/copy", {"model/w": "stale"})  # only here: as if left from another run
    time.sleep(1.1)  # object stores keep whole seconds: a change is seen by its size or its time
    (run_a / "base" / "model" / "w").write_text("v2")  # same size, new content and time
    assert a.push() == 1
    b.pull()
    assert (run_b / "base" / "model" / "w").read_text() == "v2"
    assert not (run_b / "experts" / "copy" / "DONE.json").exists()
    assert (run_b / "base" / "DONE.json").exists()


def test_a_worker_on_another_node_fetches_its_input_and_pushes_its_output(store_uri, tmp_path, monkeypatch):
    """The driver's config names the run folder relatively (`runs/r`, as under `ray job submit`, which unpacks the
    job's working directory on every node): a worker elsewhere keeps its own copy under its own working directory,
    fetches what it reads (by the relative path or the driver's absolute one) and pushes what it saves."""
    (tmp_path / "driver").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    driver_run = tmp_path / "driver" / "runs" / "r"
    _stage(driver_run, "base", {"model/w": "base weights"})
    driver = RunStorage.for_run(store_uri, "r", "runs/r")
    driver.push()
    env = driver.worker_env()
    (tmp_path / "node2").mkdir()
    monkeypatch.chdir(tmp_path / "node2")  # same host (a loopback cluster), another working directory
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    local = storage.ensure_local("runs/r/base/model")
    assert local == str(tmp_path / "node2" / "runs" / "r" / "base" / "model")
    assert open(os.path.join(local, "w")).read() == "base weights"
    assert storage.ensure_local(str(driver_run / "base" / "model")) == local  # the driver's absolute path
    assert storage.ensure_local("/elsewhere/model") == "/elsewhere/model"  # outside the run: untouched
    _stage(tmp_path / "node2" / "runs" / "r", "experts/copy", {"model/w": "expert weights"}, done=False)
    storage.push_path("runs/r/experts/copy/model")
    assert driver.fetch(str(driver_run / "experts" / "copy" / "model")) == str(driver_run / "experts" / "copy" / "model")
    assert (driver_run / "experts" / "copy" / "model" / "w").read_text() == "expert weights"
    monkeypatch.setenv(storage.ENV_DRIVER_HOST, "another-host")  # another machine, the same absolute paths
    monkeypatch.setenv(storage.ENV_RUN_AS_GIVEN, str(driver_run))
    assert not storage.active().on_driver_node()


def test_on_the_driver_node_the_local_copy_is_kept(tmp_path, monkeypatch):
    run = tmp_path / "r"
    _stage(run, "base", {"model/w": "new, not pushed yet"}, done=False)
    store = RunStorage.for_run(str(tmp_path / "storage"), "r", str(run))
    for key, value in store.worker_env().items():
        monkeypatch.setenv(key, value)
    assert storage.ensure_local(str(run / "base" / "model")) == str(run / "base" / "model")
    assert (run / "base" / "model" / "w").read_text() == "new, not pushed yet"


def test_ray_train_storage_is_the_same_place_on_storage(tmp_path, s3_env, new_bucket):
    store = RunStorage.for_run(f"s3://{new_bucket}/runs", "r", str(tmp_path / "r"))
    path, fs = store.ray_train_storage(str(tmp_path / "r" / "experts" / "ray_train"))
    assert path == f"{new_bucket}/runs/r/experts/ray_train" and isinstance(fs, pafs.S3FileSystem)


def test_check_writable_and_check_format_pass_on_a_new_run_then_record_the_version(store_uri, tmp_path):
    store = RunStorage.for_run(store_uri, "r", str(tmp_path / "r"))
    store.check_writable()
    assert store.check_format() is False  # nothing there yet
    assert _stored(store) == {}  # the probe was deleted
    store.record_format()
    assert json.loads(_stored(store)[FORMAT_FILE]) == {"format_version": FORMAT_VERSION}
    assert store.check_format() is True


def test_check_format_names_the_folder_and_both_versions(store_uri, tmp_path):
    store = RunStorage.for_run(store_uri, "r", str(tmp_path / "r"))
    store._put(f"{store.root}/{FORMAT_FILE}", io.BytesIO(b'{"format_version": 99}'))
    with pytest.raises(ConfigError, match=rf"r/{FORMAT_FILE}: the run folder has format_version 99, this dume_ray .* {FORMAT_VERSION}"):
        store.check_format()


def test_check_format_refuses_a_prefix_holding_other_files(store_uri, tmp_path):
    store = RunStorage.for_run(store_uri, "r", str(tmp_path / "r"))
    store._put(f"{store.root}/someone-else/data.csv", io.BytesIO(b"a,b\n"))
    with pytest.raises(ConfigError, match=f"holds files but no {FORMAT_FILE}"):
        store.check_format()


def test_local_run_folder_of_another_version_is_refused_and_one_without_a_version_accepted(tmp_path):
    storage.check_local_format(str(tmp_path))  # a run from before versions were recorded
    storage.write_format(str(tmp_path))
    storage.check_local_format(str(tmp_path))
    (tmp_path / FORMAT_FILE).write_text('{"format_version": 0}')
    with pytest.raises(ConfigError, match=f"{FORMAT_FILE}: the run folder has format_version 0"):
        storage.check_local_format(str(tmp_path))


def test_unreachable_or_unwritable_storage_is_a_config_error_naming_the_uri(tmp_path, monkeypatch, s3_env):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match=r"storage='s3://bucket/prefix/r': cannot write there"):
        RunStorage.for_run("s3://bucket/prefix", "r", str(tmp_path / "r")).check_writable()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"storage='{blocker}/r': cannot write there"):
        RunStorage.for_run(str(blocker), "r", str(tmp_path / "r")).check_writable()


def test_missing_bucket_is_a_config_error_naming_it(tmp_path, s3_env):
    with pytest.raises(ConfigError, match="s3://no-such-bucket-here/p/r"):
        RunStorage.for_run("s3://no-such-bucket-here/p", "r", str(tmp_path / "r")).check_writable()


def test_storage_key_accepts_paths_and_known_schemes_only():
    assert load_config(None, ["storage=s3://bucket/prefix"]).storage == "s3://bucket/prefix"
    assert load_config(None, ["storage=/mnt/shared/runs"]).storage == "/mnt/shared/runs"
    with pytest.raises(ConfigError, match="storage must be a path or a URI with a scheme in"):
        load_config(None, ["storage=ftp://host/x"])


def test_the_cli_adopts_a_local_run_on_new_storage_then_pulls_it_on_another_node(tmp_path, capsys):
    """`open_storage` (what `python -m dume_ray` runs before any work): a run new to the storage is uploaded from
    the local copy, finished stages included; a later start elsewhere pulls it."""
    from dume_ray.cli import open_storage

    cfg = load_config(None, [f"runs_dir={tmp_path / 'a'}", f"storage={tmp_path / 'store'}", "name=r"])
    _stage(cfg.run_dir, "base", {"model/w": "weights"})
    storage.write_format(cfg.run_dir)
    store = open_storage(cfg)
    assert "a new run there" in capsys.readouterr().out and _stored(store) == {}  # nothing before the checks pass
    assert store.push() == 3
    other = load_config(None, [f"runs_dir={tmp_path / 'b'}", f"storage={tmp_path / 'store'}", "name=r"])
    open_storage(other)
    assert "3 file(s) fetched" in capsys.readouterr().out
    assert (tmp_path / "b" / "r" / "base" / "DONE.json").exists()


def test_a_folder_removed_locally_is_removed_on_storage_and_not_pulled_again(store_uri, tmp_path):
    run = tmp_path / "node_a" / "myrun"
    _stage(run, "student", {"model/w.bin": "new", "parent-abc/w.bin": "old"})
    store = RunStorage.for_run(store_uri, "myrun", str(run))
    store.push()
    assert "student/parent-abc/w.bin" in _stored(store)
    shutil.rmtree(run / "student" / "parent-abc")
    store.remove(str(run / "student" / "parent-abc"))
    store.remove(str(run / "student" / "parent-abc"))  # twice: nothing left to delete is fine
    assert sorted(_stored(store)) == ["student/DONE.json", "student/model/w.bin"]
    other = tmp_path / "node_b" / "myrun"
    RunStorage.for_run(store_uri, "myrun", str(other)).pull()
    assert not (other / "student" / "parent-abc").exists() and (other / "student" / "model" / "w.bin").exists()
