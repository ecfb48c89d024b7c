"""Atomic outputs: a crash in the middle of writing a checkpoint, a model folder, a manifest or the
soft-target shards never leaves something half-written that looks finished, and never destroys the last
good copy. The crash is simulated by an exception raised from inside the write.

    .venv/bin/python -m pytest -q tests/unit/test_atomic_outputs.py
"""

import json
import os

import pytest
import torch

from dume_ray import manifest
from dume_ray.manifest import StageInputError, atomic_dir, mark_done, require, write_json_atomic
from dume_ray.training import load_training_state, make_optimizer, save_training_state
from dume_ray.config import OptimConfig


class Crash(Exception):
    pass


def _model_and_optim(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    optimizer, scheduler = make_optimizer(model, OptimConfig(steps=10, warmup_steps=1))
    return model, optimizer, scheduler


def test_atomic_dir_replaces_the_old_folder_only_when_the_block_finishes(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v1")
    with pytest.raises(Crash):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "weights"), "w").write("half of v2")
            raise Crash()
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temp or old folders left behind


def test_crash_while_saving_a_checkpoint_keeps_the_previous_one_loadable(tmp_path, monkeypatch):
    model, optimizer, scheduler = _model_and_optim(0)
    save_training_state(str(tmp_path / "ckpt"), model, optimizer, scheduler, step=100)

    real_save = torch.save

    def save_half_then_crash(obj, f):
        real_save(obj, f)
        f.truncate(10)  # a file cut short, as a killed process leaves it
        raise Crash()

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(Crash):
        save_training_state(str(tmp_path / "ckpt"), model, optimizer, scheduler, step=200)
    monkeypatch.undo()

    fresh, fresh_optimizer, fresh_scheduler = _model_and_optim(1)
    step, _ = load_training_state(str(tmp_path / "ckpt"), fresh, fresh_optimizer, fresh_scheduler)
    assert step == 100
    assert torch.equal(fresh.weight, model.weight)


def test_crash_while_writing_a_manifest_leaves_the_stage_unfinished(tmp_path, monkeypatch):
    def dump_half_then_crash(obj, f, **kwargs):
        f.write('{"config_hash": "abc", "outp')
        raise Crash()

    monkeypatch.setattr(json, "dump", dump_half_then_crash)
    with pytest.raises(Crash):
        mark_done(str(tmp_path), "abc", {"model": "m"})
    monkeypatch.undo()
    assert not manifest.is_done(str(tmp_path), "abc")
    assert not (tmp_path / manifest.MANIFEST).exists()


def test_write_json_atomic_overwrites_in_one_step(tmp_path):
    path = str(tmp_path / "report.json")
    write_json_atomic(path, {"v": 1})
    write_json_atomic(path, {"v": 2})
    assert json.load(open(path)) == {"v": 2} and os.listdir(tmp_path) == ["report.json"]


def test_require_rejects_a_missing_upstream_stage_naming_the_command(tmp_path):
    with pytest.raises(StageInputError, match="run `python -m dume_ray experts`"):
        require(str(tmp_path / "experts" / "copy"), "experts", "h1")


def test_require_rejects_an_upstream_stage_made_with_another_config(tmp_path):
    mark_done(str(tmp_path), "old-hash", {"model": "m"})
    with pytest.raises(StageInputError, match="made with another config.*old-hash.*new-hash"):
        require(str(tmp_path), "base", "new-hash")
    assert require(str(tmp_path), "base", "old-hash")["outputs"] == {"model": "m"}
