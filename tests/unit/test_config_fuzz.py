"""Fuzzing the config loader: random key paths and random values, from the command line and from YAML.
Every outcome is either a valid config or a ConfigError naming the key at fault (the file, for YAML); never
another exception (which would surface as a traceback deep in a training stage).

Reproducible by default: tests/conftest.py loads the hypothesis profile "ci" (derandomize=True, no example
database), so every run tries the same examples. Every falsifying example found so far is kept below as an
explicit case (PARSER_REJECTED, the @example lines), so it is tried on every run whatever the profile.
To look for new ones, draw random examples with the "dev" profile or a seed (a seed implies "dev"):

    .venv/bin/python -m pytest -q -p no:xdist tests/unit/test_config_fuzz.py                       # as CI
    .venv/bin/python -m pytest -q -p no:xdist tests/unit/test_config_fuzz.py --hypothesis-seed=7    # explore
    .venv/bin/python -m pytest -q -p no:xdist tests/unit/test_config_fuzz.py --hypothesis-profile=dev

A failure prints the falsifying example; add it to PARSER_REJECTED (or an @example) along with the fix.
"""

import re

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
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
# Scalars the YAML parser itself rejects, often with a bare ValueError/KeyError/IndexError and no position
# (PyYAML resolves `0b_` as a binary int, then int("", 2) fails): falsifying examples found by fuzzing.
PARSER_REJECTED = ["0b_", "0x_", "-0b_", "+0b_", "-0x_", "0b__", "!!int", "!!float x", "!!bool x", "!!timestamp x",
                   "!!binary x", "!!set x", "!x", ":", "[", "{", "'", '"', "*a", "@", "`", "%"]
# Look like parser-rejected ones but parse as strings (or ints): the schema then rejects or accepts them.
NEAR_MISSES = ["0b", "0x", "0o", "0o_", "0_", "0b1", "1__0", "190:20:30", "1:_", "0x1_f", "-"]
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "null", "true", "false", "nan", "-inf", "inf", "1e400", "[]", "[1, 2]", "[[copy], [zz]]",
                     "{a: 1}", "embedded", "bfloat16", "scratch", "validation", "'x/y'", "~", "0.0", "-0.0",
                     "1" + "0" * 400, *PARSER_REJECTED, *NEAR_MISSES]),
    st.text(alphabet="abc01.-_ ", max_size=8),
    st.text(alphabet="0bxo1_-+.:!'[]{}#& ", max_size=6),                    # YAML-ish punctuation
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
            yield f"{prefix}{key}", (_quoted(value) if isinstance(value, str) else value)


def _quoted(text):
    """`text` as one double-quoted YAML scalar, escapes and all (`a'b` broke a plain '...' quoting)."""
    return yaml.safe_dump(text, default_style='"', width=float("inf")).rstrip("\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=KEYS, value=VALUES)
@example(key="base.enabled", value="0b_")  # the issue: `error: invalid literal for int() with base 2: ''`
@example(key="distill.temperature", value="0x_")
@example(key="distill.temperature", value="1" + "0" * 400)  # OverflowError in OmegaConf's float conversion
@example(key="[", value="1")  # IndexError in OmegaConf's key parser
@example(key="name", value="a'b")  # loads; the round trip's '...' quoting of it did not parse
@example(key="runs_dir", value="Q\U00032454T")  # and a JSON-style "\ud889\udc54" escape of it neither
def test_any_single_override_loads_or_fails_with_a_config_error_naming_the_key(key, value):
    _assert_loads_or_config_error([f"{key}={value}"], key)


@pytest.mark.parametrize("key", ["base.enabled", "distill.temperature", "name", "foo.bar"])
@pytest.mark.parametrize("value", PARSER_REJECTED)
def test_unparsable_override_value_is_a_config_error_naming_override_and_key(key, value):
    override = f"{key}={value}"
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert repr(override) in message and f"key '{key}'" in message and "cannot parse" in message, message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("value", NEAR_MISSES)
def test_near_miss_override_values_load_or_fail_naming_the_key(value):
    _assert_loads_or_config_error([f"base.enabled={value}"], "base.enabled")
    _assert_loads_or_config_error([f"distill.temperature={value}"], "distill.temperature")


def test_float_field_given_a_huge_int_override_names_the_key():
    with pytest.raises(ConfigError, match=r"distill\.temperature.*OverflowError"):
        load_config(None, ["distill.temperature=1" + "0" * 400])


def test_bad_override_after_a_failing_section_still_names_the_override():
    message = str(pytest.raises(ConfigError, load_config, None, ["distill.temperature=0", "base.enabled=0b_"]).value)
    assert "'base.enabled=0b_'" in message and "key 'base.enabled'" in message and "distill" not in message


@pytest.mark.parametrize("value", PARSER_REJECTED)
def test_unparsable_yaml_scalar_is_a_config_error_naming_the_file(tmp_path, value):
    path = tmp_path / "config.yaml"
    path.write_text(f"seed: 1\nbase:\n  enabled: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and "Traceback" not in message and "\n" not in message, message


@pytest.mark.parametrize(("text", "where"), [
    ("seed: 1\nbase:\n  enabled: 0b_\n", ", line 3, key 'base.enabled'"),   # bare ValueError: located by us
    ("distill:\n  temperature: 0x_\n", ", line 2, key 'distill.temperature'"),
    ("tasks:\n  builtin: [copy, !!float x]\n", ", line 2, key 'tasks.builtin[1]'"),
    ("x:\n  - {y: 0x_}\nseed: 0b_\n", ", line 3, key 'seed'"),   # PyYAML builds `seed` first: that one fails
    ("seed: 1\nname: 'unterminated\n", ", line 3"),                          # yaml's own problem_mark
    ("seed: 1\nseed: 2\n", ", line 2"),                                       # duplicate key
])
def test_yaml_parse_error_names_file_line_and_key(tmp_path, text, where):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}{where}: "), str(info.value)


@pytest.mark.parametrize("text", ["5\n", "- 1\n- 2\n", "distill:\n  temperature: 1" + "0" * 400 + "\n"])
def test_yaml_that_parses_but_cannot_merge_is_a_config_error_naming_the_file(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + re.escape(str(path))):
        load_config(str(path))


def test_yaml_file_that_is_not_utf8_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"name: \xff\n")
    with pytest.raises(ConfigError, match="^" + re.escape(str(path))):
        load_config(str(path))


def _nest(entries):
    nested = {}
    for key, value in entries.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return nested


def _raw_yaml(node, indent=""):
    """Block YAML with each value written as is (unquoted), so odd scalars reach the parser."""
    lines = []
    for key, value in node.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_raw_yaml(value, indent + "  ")] if value else [f"{indent}{key}: {{}}"]
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines


def _parsed(value):
    try:
        return yaml.safe_load(value) if value.strip() else value
    except Exception:  # noqa: BLE001 - PyYAML rejects some scalars (`0b_`): keep the text, safe_dump quotes it
        return value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.dictionaries(KEYS, VALUES, min_size=1, max_size=4), raw=st.booleans())
@example(entries={"base.enabled": "0b_"}, raw=True)
@example(entries={"base.enabled": "0b_"}, raw=False)  # yaml.safe_load("0b_") in this test itself raised
def test_any_yaml_file_loads_or_fails_with_a_config_error(tmp_path_factory, entries, raw):
    nested = _nest(entries)
    text = "\n".join(_raw_yaml(nested)) + "\n" if raw else yaml.safe_dump(
        _nest({key: _parsed(value) for key, value in entries.items()}))
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(text)
    try:
        assert isinstance(load_config(str(path)), PipelineConfig)
    except ConfigError as exc:
        assert str(path) in str(exc)  # the message names the file
