"""Every user mistake is one line that names its source (the override, the file and line or row, the key), a
non-zero exit status, no traceback, and a run folder left as it was; all of it before Ray starts.

    .venv/bin/python -m pytest -q tests/unit/test_bad_inputs.py

Most cases call `cli.main(argv)` in-process (what `python -m dume_ray` runs, with `init_ray` replaced by a
tripwire); `test_bad_input_from_a_subprocess` runs a few as a user would. Also: `--help` epilogs, the
`--debug` / `--verbose` flags, an unexpected error's one line and log file, and how worker lines become the
progress line (no Ray: the log dispatcher's handler is called directly).
"""

import json
import os
import subprocess
import sys

import pytest

from dume_ray import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A small, valid config: every case below breaks one thing in it.
GOOD = """\
name: bad
tasks:
  builtin: [copy, reverse]
  num_train: 16
  num_validation: 4
  num_test: 4
model: {hidden_size: 32, intermediate_size: 64}
"""
ROWS = "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(4))


def _user_task(tmp_path, train: str, source: str = "jsonl", **columns) -> str:
    """A config whose only task reads `train` (validation and test are fine) from local files."""
    ext = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}[source]
    ok = ROWS if source == "jsonl" else "prompt,response\na,b\nc,d\n"
    files = {}
    for split, text in (("train", train), ("validation", ok), ("test", ok)):
        path = tmp_path / f"user_{split}.{ext}"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        files[split] = str(path)
    extra = "".join(f"\n      {k}: {v}" for k, v in columns.items())
    return (f"name: bad\ntasks:\n  builtin: []\n  sources:\n    - name: mine\n      source: {source}\n"
            f"      data_files: {json.dumps(files)}{extra}\n")


def _manifest(run: str, stage: str, config_hash: str) -> dict:
    return {f"{run}/{stage}/DONE.json": json.dumps({"config_hash": config_hash, "outputs": {}})}


# (id, stage, config YAML or None, extra files {relative path: text}, overrides, exit status, must be in the error)
CASES = [
    # ---- overrides -------------------------------------------------------------------------------------------
    ("override-unknown-key", "run", GOOD, {}, ["experts.optim.lrr=1"], 2, ["override 'experts.optim.lrr=1'", "lrr"]),
    ("override-unknown-section", "run", GOOD, {}, ["distil.temperature=2"], 2, ["override 'distil.temperature=2'"]),
    ("override-bad-type", "run", GOOD, {}, ["distill.temperature=abc"], 2, ["override 'distill.temperature=abc'"]),
    ("override-unparseable-scalar", "run", GOOD, {}, ["base.enabled=0b_"], 2, ["'base.enabled=0b_'", "key 'base.enabled'"]),
    ("override-without-equals", "run", GOOD, {}, ["distill.temperature"], 2, ["'distill.temperature'", "key=value"]),
    ("override-out-of-range", "run", GOOD, {}, ["distill.alpha=1.5"], 2, ["override 'distill.alpha=1.5'", "[0, 1]"]),
    ("override-unknown-task", "experts", GOOD, {}, ["tasks.builtin=[copy,nosuch]"], 2, ["tasks.builtin", "nosuch"]),
    ("override-group-unknown-task", "run", GOOD, {}, ["experts.groups=[[copy],[zz]]"], 2, ["zz"]),
    # ---- the YAML file ---------------------------------------------------------------------------------------
    ("yaml-syntax-error", "run", "seed: 1\ntasks: {builtin: [copy,\nname: x\n", {}, [], 2, ["cfg.yaml, line 4: ", "flow sequence (line 2)"]),
    ("yaml-unknown-key", "run", GOOD + "experts:\n  optim:\n    stepz: 3\n", {}, [], 2, ["cfg.yaml", "experts.optim.stepz"]),
    ("yaml-missing-file", "run", None, {}, [], 2, ["config file not found", "nope.yaml"]),
    # ---- user data -------------------------------------------------------------------------------------------
    ("data-file-missing", "run", "missing", {}, [], 2, ["train data file", "no_such_train.jsonl", "does not exist"]),
    ("data-jsonl-syntax", "run", ("jsonl", ROWS + '{"prompt": "x", "response": \n'), {}, [], 2, ["user_train.jsonl:5:29", "not valid JSON"]),
    ("data-jsonl-not-object", "run", ("jsonl", ROWS + "[1, 2]\n"), {}, [], 2, ["user_train.jsonl:5", "JSON object"]),
    ("data-wrong-type", "run", ("jsonl", ROWS + json.dumps({"prompt": "x", "response": 3}) + "\n"), {}, [], 2,
     ["user_train.jsonl", "row 4", "'response' is not a string"]),
    ("data-empty-file", "run", ("jsonl", ""), {}, [], 2, ["user_train.jsonl", "empty"]),
    ("data-csv-missing-column", "run", ("csv", "prompt,answer\na,b\n"), {}, [], 2, ["user_train.csv", "no column 'response'"]),
    ("data-parquet-garbage", "run", ("parquet", b"PAR1 this is not parquet at all"), {}, [], 2, ["user_train.parquet", "cannot read"]),
    # ---- the model -------------------------------------------------------------------------------------------
    ("model-path-missing", "run", GOOD, {}, ["model.name_or_path=/nowhere/my-model"], 2, ["no model folder at '/nowhere/my-model'"]),
    ("model-gguf-missing", "run", GOOD, {}, ["model.gguf=/nowhere/m.gguf"], 2, ["no GGUF file at '/nowhere/m.gguf'"]),
    ("model-gguf-garbage", "run", GOOD, {"broken.gguf": "not a GGUF file " * 8}, ["model.gguf=broken.gguf"], 2, ["broken.gguf", "cannot"]),
    ("model-gguf-not-gguf", "run", GOOD, {}, ["model.gguf=weights.bin"], 2, ["model.gguf must name a .gguf file"]),
    # ---- resources (a local Ray: this machine's CPUs and GPUs, GPUs faked to 0 below) -------------------------
    ("resources-cpus", "run", GOOD, {}, ["experts.resources.cpus_per_worker=4096"], 3, ["experts", "4096 CPU"]),
    ("resources-gpu", "run", GOOD, {}, ["distill.resources.num_workers=1", "distill.resources.use_gpu=true"], 3,
     ["distill+multitask", "1 GPU", "use_gpu=false"]),
    # ---- earlier stages --------------------------------------------------------------------------------------
    ("stage-base-not-run", "experts", GOOD, {}, [], 2, ["stage 'base' has not finished", "python -m dume_ray base"]),
    ("stage-soft-targets-not-run", "distill", GOOD, {}, [], 2, ["has not finished", "bad/base"]),
    ("stage-stale-base", "experts", GOOD, _manifest("runs/bad", "base", "stale0000"), [], 2,
     ["made with another config", "hash stale0000"]),
    ("stage-upcycle-one-group", "upcycle", GOOD, {}, ["experts.groups=[[copy,reverse]]"], 2, ["at least 2 experts"]),
    # ---- the run folder and its storage (docs/cluster.md) -----------------------------------------------------
    ("storage-unknown-scheme", "run", GOOD, {}, ["storage=ftp://host/runs"], 2, ["storage must be a path or a URI", "ftp://host/runs"]),
    ("storage-unwritable", "run", GOOD, {"blocker": "a file, not a folder"}, ["storage=blocker"], 2,
     ["storage='blocker/bad': cannot write there"]),
    ("storage-other-version", "run", GOOD, {"store/bad/FORMAT.json": '{"format_version": 7}'}, ["storage=store"], 2,
     ["store/bad/FORMAT.json: the run folder has format_version 7"]),
    ("storage-not-a-run", "run", GOOD, {"store/bad/data.csv": "a,b"}, ["storage=store"], 2, ["store/bad: holds files but no FORMAT.json"]),
    ("run-folder-other-version", "run", GOOD, {"runs/bad/FORMAT.json": '{"format_version": 7}'}, [], 2,
     ["runs/bad/FORMAT.json: the run folder has format_version 7"]),
    ("stage-search-empty-space", "search", GOOD, {}, ["search.groupings=[copy|reverse]", "search.max_groups=1"], 2,
     ["empty search space"]),
]


def _snapshot(root) -> dict:
    """{relative path: (size, mtime_ns)} of every file and folder under `root`."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size if name in files else 0, st.st_mtime_ns)
    return out


def _prepare(tmp_path, config, files) -> list[str]:
    """Write the case's config and files, and an earlier run's folder; the `--config` arguments."""
    run = tmp_path / "runs" / "bad"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("an earlier run's config\n")
    (run / "notes.txt").write_text("kept\n")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    if config is None:
        return ["--config", str(tmp_path / "nope.yaml")]
    if config == "missing":
        config = _user_task(tmp_path, ROWS).replace(str(tmp_path / "user_train.jsonl"), str(tmp_path / "no_such_train.jsonl"))
    elif isinstance(config, tuple):
        config = _user_task(tmp_path, config[1], config[0])
    (tmp_path / "cfg.yaml").write_text(config)
    return ["--config", str(tmp_path / "cfg.yaml")]


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    """cwd = tmp_path (the default runs_dir is relative), no GPU, and a tripwire instead of starting Ray."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    started = []
    monkeypatch.setattr(cli, "init_ray", lambda *a, **k: started.append(1) or pytest.fail("Ray was started"))
    return started


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it_and_leaves_the_run_folder(case, tmp_path, capsys, no_ray):
    _, stage, config, files, overrides, status, expected = case
    args = _prepare(tmp_path, config, files)
    before = _snapshot(tmp_path)
    code = cli.main([stage, *args, *overrides])
    out, err = capsys.readouterr()
    assert code == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path) == before  # nothing written, no run folder or logs folder created
    assert not no_ray


def test_enough_distinct_bad_inputs():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20


SUBPROCESS_CASES = ["override-unknown-key", "yaml-syntax-error", "yaml-missing-file", "stage-base-not-run"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_from_a_subprocess(name, tmp_path):
    """As a user runs it: `python -m dume_ray ...`; no Ray line, nothing written."""
    _, stage, config, files, overrides, status, expected = next(c for c in CASES if c[0] == name)
    args = _prepare(tmp_path, config, files)
    before = _snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "dume_ray", stage, *args, *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(text in lines[0] for text in expected), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "[ray]" not in proc.stdout
    assert _snapshot(tmp_path) == before


def test_unreachable_storage_is_one_line_naming_the_uri_before_ray(tmp_path, capsys, no_ray, monkeypatch):
    """An S3 endpoint nobody answers (and, on a reachable one, a bucket that does not exist): exit 2, one line
    naming the storage URI, no Ray, the local run folder as it was."""
    args = _prepare(tmp_path, GOOD, {})
    before = _snapshot(tmp_path)
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["run", *args, "storage=s3://bucket/prefix"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: storage='s3://bucket/prefix/bad'"), lines
    assert _snapshot(tmp_path) == before and not no_ray


def test_missing_bucket_is_one_line_naming_the_uri(tmp_path, capsys, no_ray, s3_env):
    args = _prepare(tmp_path, GOOD, {})
    assert cli.main(["run", *args, "storage=s3://no-such-bucket/prefix"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "s3://no-such-bucket/prefix/bad" in lines[0] and "cannot write there" in lines[0], lines


def test_debug_shows_the_traceback_then_the_same_line(tmp_path, capsys, no_ray):
    args = _prepare(tmp_path, GOOD, {})
    assert cli.main(["run", *args, "experts.optim.lrr=1", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: override 'experts.optim.lrr=1'")


def test_unexpected_error_is_one_line_pointing_to_the_log(tmp_path, capsys, no_ray, monkeypatch):
    def boom(cfg):
        raise RuntimeError("boom in preflight")

    monkeypatch.setattr(cli, "preflight", boom)
    args = _prepare(tmp_path, GOOD, {})
    assert cli.main(["run", *args]) == 1
    err = capsys.readouterr().err
    log = tmp_path / "runs" / "bad" / "logs" / "error.log"
    assert err.count("\n") == 1 and "error: unexpected RuntimeError: boom in preflight" in err and str(log) in err
    assert "Traceback" not in err and "Traceback" in log.read_text() and "boom in preflight" in log.read_text()
    assert cli.main(["run", *args, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ---- --help, flags -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", list(cli.STAGE_HELP))
def test_help_of_every_subcommand_ends_with_examples(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out.rstrip().splitlines()
    at = text.index("examples:")
    examples = text[at + 1:]
    assert 2 <= len(examples) <= 3 and all(e.startswith("  python -m dume_ray ") for e in examples), examples
    assert any(e.startswith(f"  python -m dume_ray {stage} ") for e in examples)
    assert "--debug" in "\n".join(text) and "--verbose" in "\n".join(text)


def test_debug_and_verbose_flags_parse_anywhere_and_default_off():
    args = cli.parse_args(["experts", "--config", "c.yaml", "a=1"])
    assert (args.debug, args.verbose, args.config, args.overrides) == (False, False, "c.yaml", ["a=1"])
    args = cli.parse_args(["eval", "--verbose", "a=1", "--debug", "b=2"])
    assert args.debug and args.verbose and args.overrides == ["a=1", "b=2"]


# ---- quiet output (no Ray: the dispatcher's handler is called as Ray would call it) --------------------------

def test_worker_lines_go_to_the_log_and_step_lines_make_the_progress_line(tmp_path, capsys):
    output = cli.RayOutput(str(tmp_path / "logs"), verbose=True)  # verbose: no file-descriptor redirect here
    output.workers = open(tmp_path / "workers.log", "w", buffering=1)
    output.begin_stage()
    output.on_worker_lines({"pid": 7, "is_err": False, "lines": [
        "[expert copy] step 50/200 loss 0.800 (10.0 s)", "2026-01-01 INFO some Ray Train noise",
        "[expert reverse] step 20/200 loss 1.500 ce_loss 1.500 (10.0 s)"]})
    output.on_worker_lines({"pid": 7, "is_err": True, "lines": ["[expert copy] step 100/200 loss 0.500 (20.0 s)"]})
    line = output.progress_line()
    assert line == "expert copy 100/200 loss 0.500 | expert reverse 20/200 loss 1.500 ce_loss 1.500 | 7.0 steps/s | ETA 90 s"
    assert capsys.readouterr().out == ""  # verbose: Ray's own printer shows the lines; nothing added
    logged = (tmp_path / "workers.log").read_text()
    assert "Ray Train noise" in logged and "(pid=7, stderr) [expert copy] step 100/200" in logged
    output.begin_stage()
    assert output.progress_line() == ""


def test_an_error_from_a_ray_worker_is_described_by_its_cause():
    class RayTaskErrorLike(RuntimeError):  # the shape of ray.exceptions.RayTaskError: text with a traceback
        def __init__(self, cause):
            super().__init__("ray::_fit() (pid=1)\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                             "ValueError: loss is nan at step 12")
            self.cause = cause

    assert cli._describe(RayTaskErrorLike(ValueError("loss is nan at step 12"))) == "ValueError: loss is nan at step 12"
    assert cli._describe(RuntimeError("worker died\nTraceback (most recent call last):\nOSError: disk full")) \
        == "RuntimeError: OSError: disk full"


def test_quiet_output_sends_file_descriptor_2_to_the_run_log_and_errors_to_the_terminal(tmp_path, capfd):
    output = cli.RayOutput(str(tmp_path / "logs"), verbose=False)
    output.start()
    try:
        os.write(2, b"[2026-01-01 raylet.cc:1] C++ noise\n")  # what Ray's core and its loggers write
        print("error: for the user", file=output.terminal_err, flush=True)
    finally:
        output.stop()
    os.write(2, b"after stop\n")
    err = capfd.readouterr().err
    assert "error: for the user" in err and "after stop" in err and "C++ noise" not in err
    assert "C++ noise" in (tmp_path / "logs" / "driver.log").read_text()


def test_a_workers_step_line_carries_tokens_per_second_into_the_progress_line(capsys, monkeypatch):
    from dume_ray import worker_utils
    monkeypatch.setattr(worker_utils, "is_rank_zero", lambda: True)
    progress = worker_utils.Progress("copy", total_steps=4, every=2)
    progress.start -= 2.0  # two seconds in
    for step in (1, 2):
        progress(step, {"loss": 0.5, "tokens": 100})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("[copy] step 2/4 loss 0.500 tok/s ") and printed.endswith(" s)")
    assert 80 <= float(printed.split("tok/s ")[1].split()[0]) <= 100  # 200 tokens in a little over 2 s
    output = cli.RayOutput("unused", verbose=True)
    output.begin_stage()
    output.on_worker_lines({"pid": 1, "is_err": False, "lines": [printed]})
    assert output.progress_line().startswith("copy 2/4 loss 0.500 tok/s ")
