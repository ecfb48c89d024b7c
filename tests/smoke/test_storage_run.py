"""The whole tiny pipeline with its run folder on S3 (`storage=s3://bucket/prefix`), the store being moto's
server on loopback (`s3_server` in tests/conftest.py); then the outputs are read back with plain pyarrow.fs.

    .venv/bin/python -m pytest -q tests/smoke/test_storage_run.py      # about 2 min on 2 CPUs

What it shows: every stage's manifest and FORMAT.json are on storage, the student loads with plain
transformers from the stored files, another node's empty working copy, pulled from storage, sees every
stage finished for this config (what `run` checks before it skips a stage), and from a third working directory
with no copy of the run, `add-task --run s3://.../smoke` trains only the new task's expert and leaves the
stored experts' manifests as they were.
"""

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

pytestmark = pytest.mark.smoke
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "smoke", "tiny.yaml")
STAGES = {"base": "base", "experts/copy": "experts/copy", "experts/reverse": "experts/reverse", "experts/add": "experts/add",
          "upcycle": "upcycle", "soft_targets": "soft_targets", "soft_targets/groups/copy": "soft_targets/copy",
          "student": "student", "multitask": "multitask", "eval": "eval"}  # folder -> its key in pipeline_hashes


def test_tiny_pipeline_with_its_run_folder_on_s3(tmp_path, s3_env, new_bucket):
    overrides = ["runs_dir=runs", f"storage=s3://{new_bucket}/prefix", "upcycle.dume_plus_steps=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "dume_ray", "run", "--config", TINY, *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[storage] s3://{new_bucket}/prefix/smoke: a new run there" in proc.stdout

    # ---- read back with plain pyarrow.fs: no dume_ray ----------------------------------------------------
    fs = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1")
    root = f"{new_bucket}/prefix/smoke"
    stored = {i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
              if i.type == pafs.FileType.File}

    def read(rel: str) -> bytes:
        with fs.open_input_stream(f"{root}/{rel}") as f:
            return f.read()

    assert json.loads(read("FORMAT.json")) == {"format_version": 1} and "config.yaml" in stored
    for stage in STAGES:
        assert len(json.loads(read(f"{stage}/DONE.json"))["config_hash"]) > 0, stage
    assert any(p.startswith("soft_targets/groups/add/shards/") and p.endswith(".parquet") for p in stored)
    assert not [p for p in stored if "/." in p or ".tmp-" in p]  # no temp names, no probe left behind
    report = json.loads(read("eval/report.json"))
    assert report and "student" in json.dumps(report)

    local = tmp_path / "student_from_s3"
    local.mkdir()
    pafs.copy_files(f"{root}/student/model", str(local), source_filesystem=fs)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    logits = model(**tokenizer(["12+3="], return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size and bool(logits.isfinite().all())

    # ---- another node: an empty working copy, filled from storage, sees every stage finished ---------------
    from dume_ray import manifest
    from dume_ray.config import load_config
    from dume_ray.stage_hashes import pipeline_hashes
    from dume_ray.storage import RunStorage

    cfg = load_config(TINY, [f"runs_dir={tmp_path / 'node_b'}", *overrides[1:]])
    RunStorage.for_run(cfg.storage, cfg.name, cfg.run_dir).pull()
    hashes = pipeline_hashes(cfg)
    for folder, key in STAGES.items():
        assert manifest.is_done(f"{cfg.run_dir}/{folder}", hashes[key]), folder

    # ---- that node adds a task to the stored run, naming it by its URI: one new expert, the others reused -----
    node_b = tmp_path / "node_b_cli"
    node_b.mkdir()
    experts_before = {g: read(f"experts/{g}/DONE.json") for g in ("copy", "reverse", "add")}
    proc = subprocess.run([sys.executable, "-m", "dume_ray", "add-task", "--run", f"s3://{new_bucket}/prefix/smoke",
                           "--task", "sort"], cwd=node_b, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(read("experts/sort/DONE.json"))["metrics"]["steps"] == 4
    assert {g: read(f"experts/{g}/DONE.json") for g in experts_before} == experts_before  # untouched on storage
    assert "sort" in json.loads(read("eval/report.json"))["tasks"]
    assert (node_b / "runs" / "smoke" / "experts" / "copy" / "DONE.json").exists()  # its working copy, pulled
