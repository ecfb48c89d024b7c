"""End-to-end smoke run of the CLI on configs/smoke/tiny.yaml, as a user would run it (a subprocess).

    .venv/bin/python -m pytest -q -m smoke

Checks the artifacts of every stage, finite losses, the printed report (with the DUME rows), that a rerun
skips every finished stage, and that the student and the upcycled MoE load with plain transformers (no
dume_ray import).
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.smoke
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "dume_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_runs_every_stage_then_skips_them_on_rerun(tmp_path):
    config = os.path.join(ROOT, "configs", "smoke", "tiny.yaml")
    first = _cli("run", "--config", config, f"runs_dir={tmp_path}", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    for stage in ("base", "experts/copy", "experts/reverse", "experts/add", "upcycle", "soft_targets", "student", "multitask", "eval"):
        assert (run_dir / stage / "DONE.json").exists(), stage
    for model in ("base/model", "experts/copy/model", "student/model", "multitask/model"):
        assert (run_dir / model / "config.json").exists(), model
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"base", "experts", "student", "multitask", "dume", "dume+", "oracle", "weight_average",
                                 "random"}
    assert len(report["upcycle"]["variants"]) == 6 and report["upcycle"]["moe_active_parameters_per_token"] > 0
    assert "## DUME upcycling" in first.stdout
    assert all(0.0 <= v <= 1.0 for v in report["means"].values())
    assert (run_dir / "eval" / "report.png").stat().st_size > 1000
    assert "| **mean** |" in first.stdout and "student − multitask" in first.stdout
    for stage in ("student", "multitask"):
        loss = json.loads((run_dir / stage / "DONE.json").read_text())["metrics"]["final_loss"]
        assert math.isfinite(loss)
    assert (run_dir / "config.yaml").exists()

    second = _cli("run", "--config", config, f"runs_dir={tmp_path}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done already") == 9  # base, 3 experts, upcycle, soft_targets, student, multitask, eval

    load = subprocess.run([sys.executable, "-c", (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'student' / 'model')!r});"
        f"t = AutoTokenizer.from_pretrained({str(run_dir / 'student' / 'model')!r});"
        "print('dume_ray' in sys.modules, m.config.vocab_size == len(t))")], capture_output=True, text=True)
    assert load.stdout.strip() == "False True", load.stderr[-2000:]
    moe = subprocess.run([sys.executable, "-c", (
        "import sys; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'upcycle' / 'moe')!r}, trust_remote_code=True);"
        "print('dume_ray' in sys.modules, type(m).__name__, m.config.num_local_experts)")], capture_output=True, text=True)
    assert moe.stdout.strip() == "False DumeMoEForCausalLM 3", moe.stderr[-2000:]


def test_cli_rejects_bad_input_before_training(tmp_path):
    bad = _cli("run", f"runs_dir={tmp_path}", "distill.alpha=1.5", cwd=tmp_path)
    assert bad.returncode == 2 and "distill.alpha must be in [0, 1], got 1.5" in bad.stderr
    typo = _cli("run", f"runs_dir={tmp_path}", "distill.tempreature=2", cwd=tmp_path)
    assert typo.returncode == 2 and "distill.tempreature" in typo.stderr
    too_long = _cli("run", f"runs_dir={tmp_path}", "model.max_seq_len=8", cwd=tmp_path)
    assert too_long.returncode == 2 and "exceeds the limit max_seq_len=8" in too_long.stderr
