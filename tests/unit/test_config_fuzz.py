"""Fuzzing the config loader: random key paths and random values, from the command line and from YAML.
Every outcome is either a valid config or a ConfigError naming the key at fault; never another exception
(which would surface as a traceback deep in a training stage).

    .venv/bin/python -m pytest -q tests/unit/test_config_fuzz.py
"""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from dume_ray.config import ConfigError, PipelineConfig, load_config, to_yaml
from dume_ray.stage_hashes import pipeline_hashes


def _leaf_keys(node, prefix=""):
    for key in node:
        child = node._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _leaf_keys(child, path + ".")
        else:
            yield path


LEAVES = sorted(_leaf_keys(OmegaConf.structured(PipelineConfig)))
JUNK_SEGMENTS = st.sampled_from(["foo", "lr", "optim", "steps", "Model", "distill", "0", "groups", "temperature"])
KEYS = st.one_of(
    st.sampled_from(LEAVES),                                                   # a real key
    st.builds(lambda leaf, junk: f"{leaf.rsplit('.', 1)[0]}.{junk}", st.sampled_from(LEAVES), JUNK_SEGMENTS),
    st.lists(JUNK_SEGMENTS, min_size=1, max_size=4).map(".".join),             # a made-up path
)
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "null", "true", "false", "nan", "-inf", "inf", "1e400", "[]", "[1, 2]", "[[copy], [zz]]",
                     "{a: 1}", "embedded", "bfloat16", "scratch", "validation", "'x/y'", "~", "0.0", "-0.0"]),
    st.text(alphabet="abc01.-_ ", max_size=8),
)


def _assert_loads_or_config_error(overrides, key):
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        message = str(exc)
        assert message.strip() and "Traceback" not in message
        # The error names the key (or, for a made-up path, the part of it that does not exist).
        first_unknown = next((p for p in _prefixes(key) if p not in LEAVES and not _is_section(p)), key)
        assert key in message or first_unknown.rsplit(".", 1)[-1] in message or key.split(".")[0] in message, message
        return
    assert isinstance(cfg, PipelineConfig)
    pipeline_hashes(cfg)  # everything the stages derive from a config works on every config that loads
    assert load_config(None, [f"{k}={v}" for k, v in _flat(OmegaConf.create(to_yaml(cfg)))]) == cfg


def _prefixes(key):
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_section(path):
    return any(leaf.startswith(path + ".") for leaf in LEAVES)


def _flat(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float, bool, str)):
            yield f"{prefix}{key}", (f"'{value}'" if isinstance(value, str) else value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=KEYS, value=VALUES)
def test_any_single_override_loads_or_fails_with_a_config_error_naming_the_key(key, value):
    _assert_loads_or_config_error([f"{key}={value}"], key)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
def test_any_yaml_file_loads_or_fails_with_a_config_error(tmp_path_factory, entries):
    nested = {}
    for key, value in entries.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(yaml.safe_dump(nested))
    try:
        assert isinstance(load_config(str(path)), PipelineConfig)
    except ConfigError as exc:
        assert str(path) in str(exc)  # the message names the file
