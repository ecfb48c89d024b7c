"""Config loading, overrides, validation errors, expert groups, hashing and dict round trips.

Run: cd /work/main && .venv/bin/python -m pytest tests/unit/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from dume_ray.config import (
    CHAR_TASK_NAMES,
    ConfigError,
    OptimConfig,
    PipelineConfig,
    config_hash,
    from_dict,
    load_config,
    to_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def _error(overrides: list[str], path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---- shipped configs -------------------------------------------------------------------------------------

def test_configs_folder_has_yaml_files():
    assert CONFIG_FILES, f"no YAML under {REPO}/configs"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_config_loads_into_a_pipeline_config(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.groups, "a loadable config must define at least one expert group"


# ---- overrides -------------------------------------------------------------------------------------------

def test_override_sets_value_and_coerces_int_to_float():
    cfg = load_config(None, ["distill.temperature=4"])
    assert cfg.distill.temperature == 4.0
    assert isinstance(cfg.distill.temperature, float)


def test_override_beats_yaml_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  temperature: 3.0\n  alpha: 0.25\n")
    cfg = load_config(str(path), ["distill.temperature=5"])
    assert cfg.distill.temperature == 5.0
    assert cfg.distill.alpha == 0.25


def test_override_without_equals_sign_is_rejected():
    assert "key=value" in _error(["distill.temperature"])


# ---- schema errors ---------------------------------------------------------------------------------------

def test_misspelled_override_key_error_names_full_key_path():
    message = _error(["distill.temprature=4"])
    assert "distill.temprature" in message


def test_misspelled_yaml_key_error_names_file_and_key_path(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("experts:\n  optim:\n    stepz: 3\n")
    message = _error([], str(path))
    assert "experts.optim.stepz" in message
    assert str(path) in message


def test_wrongly_typed_value_raises_config_error_naming_key():
    message = _error(["distill.temperature=abc"])
    assert "distill.temperature" in message


def test_wrongly_typed_nested_int_raises_config_error_naming_key():
    assert "base.optim.steps" in _error(["base.optim.steps=many"])


def test_missing_config_file_raises_config_error(tmp_path):
    assert "not found" in _error([], str(tmp_path / "nope.yaml"))


# ---- range and combination checks ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-1.5"])
def test_non_positive_temperature_is_rejected(value):
    assert "distill.temperature" in _error([f"distill.temperature={value}"])


@pytest.mark.parametrize("value", ["-0.1", "1.01"])
def test_alpha_outside_unit_interval_is_rejected(value):
    assert "distill.alpha" in _error([f"distill.alpha={value}"])


@pytest.mark.parametrize("value", ["0", "1"])
def test_alpha_at_interval_bounds_is_accepted(value):
    assert load_config(None, [f"distill.alpha={value}"]).distill.alpha == float(value)


def test_unknown_builtin_task_is_rejected_and_named():
    message = _error(["tasks.builtin=[copy,bogus]"])
    assert "tasks.builtin" in message and "bogus" in message


def test_group_naming_unknown_task_is_rejected():
    message = _error(["tasks.builtin=[copy,reverse]", "experts.groups=[[copy,reverse,nope]]"])
    assert "experts.groups" in message and "nope" in message


def test_task_in_two_groups_is_rejected():
    message = _error(["tasks.builtin=[copy,reverse]", "experts.groups=[[copy,reverse],[reverse]]"])
    assert "experts.groups" in message and "reverse" in message and "more than one group" in message


def test_task_in_no_group_is_rejected():
    message = _error(["tasks.builtin=[copy,reverse,add]", "experts.groups=[[copy,reverse]]"])
    assert "experts.groups" in message and "add" in message and "no group" in message


@pytest.mark.parametrize("section", ["base", "experts", "distill"])
def test_use_gpu_without_workers_is_rejected(section):
    message = _error([f"{section}.resources.use_gpu=true", f"{section}.resources.num_workers=0"])
    assert "resources.use_gpu" in message and "num_workers" in message


def test_use_gpu_with_one_worker_is_accepted():
    cfg = load_config(None, ["experts.resources.use_gpu=true", "experts.resources.num_workers=1"])
    assert cfg.experts.resources.use_gpu is True


# ---- groups ----------------------------------------------------------------------------------------------

def test_default_groups_are_one_per_task():
    cfg = load_config(None, ["tasks.builtin=[copy,reverse,add]"])
    assert cfg.groups == {"copy": ["copy"], "reverse": ["reverse"], "add": ["add"]}


def test_default_config_groups_cover_all_builtin_tasks():
    assert list(load_config().groups) == CHAR_TASK_NAMES


def test_custom_groups_are_named_by_plus_joined_tasks():
    cfg = load_config(None, ["tasks.builtin=[copy,reverse,add,sub]", "experts.groups=[[copy,reverse],[add,sub]]"])
    assert cfg.groups == {"copy+reverse": ["copy", "reverse"], "add+sub": ["add", "sub"]}


# ---- hashing and dict round trip -------------------------------------------------------------------------

def test_config_hash_equal_for_equal_configs():
    a = load_config(None, ["distill.temperature=4"])
    b = load_config(None, ["distill.temperature=4.0"])
    assert a is not b
    assert config_hash(a) == config_hash(b)
    assert config_hash(a.distill, "x") == config_hash(b.distill, "x")


def test_config_hash_changes_when_a_field_changes():
    a = load_config()
    b = load_config(None, ["distill.temperature=4"])
    c = load_config(None, ["experts.optim.lr=0.01"])
    assert len({config_hash(a), config_hash(b), config_hash(c)}) == 3
    assert config_hash(a.distill) != config_hash(b.distill)
    assert config_hash(a.experts) == config_hash(b.experts)


def test_optim_config_round_trips_through_to_dict_and_from_dict():
    original = OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=3, steps=17, batch_size=5, grad_clip=0.5,
                           checkpoint_every=7)
    data = to_dict(original)
    assert isinstance(data, dict) and data["steps"] == 17
    restored = from_dict(OptimConfig, data)
    assert isinstance(restored, OptimConfig)
    assert restored == original
    assert dataclasses.asdict(restored) == data


# ---- upcycle ---------------------------------------------------------------------------------------------

def test_negative_ridge_lambda_fails_at_config_load():
    assert "upcycle.ridge_lambda must be >= 0, got -0.1" in _error(["upcycle.ridge_lambda=-0.1"])


def test_a_single_group_skips_upcycling_in_run_and_the_upcycle_command_names_the_cause():
    import pytest
    from dume_ray.manifest import StageInputError
    from dume_ray.stage_hashes import pipeline_hashes
    from dume_ray.upcycle.launch import run_upcycle

    cfg = load_config(None, ["tasks.builtin=[copy,reverse]", "experts.groups=[[copy,reverse]]"])
    assert cfg.upcycle.enabled and not cfg.upcycle_active and "upcycle" not in pipeline_hashes(cfg)
    with pytest.raises(StageInputError, match="at least 2 experts.*experts.groups.*upcycle.enabled=false"):
        run_upcycle(cfg)


def test_upcycle_routing_and_top_k_are_checked():
    assert "upcycle.routing" in _error(["upcycle.routing=mean"])
    assert "upcycle.top_k=9 exceeds" in _error(["upcycle.top_k=9"])
