"""Markdown reference of every config key, generated from the dataclasses in `dume_ray/config.py`.

Keys, types and defaults come from the dataclasses themselves (defaults as `PipelineConfig()` builds them, so
`base.optim.steps` and `distill.optim.steps` each show their own); descriptions come from the comment after
each field in config.py (and its `#   ` continuation lines), or from `EXTRA_HELP` below for fields without one.
The committed page must equal this output (tests/unit/test_docs.py); regenerate it with:

    python -m dume_ray.config_reference > docs/configuration.md

Pure: no Ray here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
from typing import Any, Optional

from omegaconf import MISSING

from dume_ray import config as config_module

REGENERATE = "python -m dume_ray.config_reference > docs/configuration.md"

# Descriptions of fields that have no comment in config.py (keyed "ClassName.field").
EXTRA_HELP = {
    "TaskSource.prompt_column": "column holding the prompt text",
    "TaskSource.response_column": "column holding the response text",
    "TasksConfig.num_validation": "built-in examples per task in the validation split",
    "TasksConfig.num_test": "built-in examples per task in the test split",
    "ModelConfig.num_layers": "embedded model only: decoder layers",
    "ModelConfig.num_heads": "embedded model only: attention heads",
    "ModelConfig.intermediate_size": "embedded model only: MLP width",
    "OptimConfig.weight_decay": "AdamW weight decay",
    "OptimConfig.grad_clip": "gradient-norm clipping threshold",
    "ResourcesConfig.use_gpu": "one GPU per Ray Train worker (needs num_workers >= 1)",
    "ResourcesConfig.cpus_per_worker": "CPUs reserved per Ray Train worker (or for the local-mode job's Ray task)",
    "ExpertsConfig.lora_dropout": "dropout on the LoRA adapters' input",
    "SoftTargetsConfig.cpus_per_actor": "CPUs per TeacherScorer actor",
    "MultitaskConfig.enabled": "train the multitask baseline (false: the report has no baseline row)",
    "EvalConfig.max_new_tokens": "greedy decoding length limit per answer",
    "SearchConfig.num_affinity_seeds": "how many top-ranked affinity groupings seed the search",
    "SearchConfig.affinity_batch_size": "examples per batch for the gradient-affinity matrix",
    "SearchConfig.cpus_per_trial": "CPUs reserved per Tune trial",
    "SearchConfig.gpus_per_trial": "GPUs per Tune trial (fractions allowed)",
    "PipelineConfig.runs_dir": "parent folder of every run folder (on a cluster without shared storage: each node's working copy; see storage)",
}


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line in config.py, joined with its `#   ` continuation lines."""
    source = inspect.getsource(config_module)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    lines = source.splitlines()
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        line = item.end_lineno or item.lineno
        text = comments.get(line, "")
        if not text:
            continue
        parts = [text.lstrip("#").strip()]
        nxt = line + 1  # continuation lines: a comment alone on its line, indented with '#   '
        while nxt in comments and lines[nxt - 1].strip().startswith("#   "):
            parts.append(comments[nxt].lstrip("#").strip())
            nxt += 1
        out[item.target.id] = " ".join(p for p in parts if p)
    return out


def describe(cls: type, name: str) -> str:
    return field_comments(cls).get(name) or EXTRA_HELP.get(f"{cls.__name__}.{name}", "")


def _default(value: Any) -> str:
    if value is MISSING or value == MISSING:
        return "**required**"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _section_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a docstring
        return ""
    return " ".join(doc.split())


def _table(cls: type, instance: Any, prefix: str, nested: list[tuple[str, type, Any]]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(instance, f.name) if instance is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            nested.append((key, type(value), value))
            continue
        kind = str(f.type)
        if kind == "list[TaskSource]":
            nested.append((key + "[]", config_module.TaskSource, None))
            text = "user tasks, one entry per task: see `" + key + "[]` below"
        else:
            text = describe(cls, f.name)
            if kind == "Optional[ModelConfig]":
                text += " (a section with the keys of `model`)"
        rows.append(f"| `{key}` | `{_cell(kind)}` | {_cell(_default(value))} | {_cell(text)} |")
    return rows


def render() -> str:
    """The whole configuration page as markdown."""
    out = [
        "# Configuration reference",
        "",
        f"Generated from the dataclasses in `dume_ray/config.py` by `{REGENERATE}`; do not edit by hand "
        "(`tests/unit/test_docs.py` fails when this page and the code differ).",
        "",
        "A run's config merges schema ← YAML (`--config configs/demo.yaml`) ← `key=value` overrides on the command "
        "line; a misspelled key or a bad value stops the run before any work, naming the key. Defaults below are "
        "the schema's; the YAML files in `configs/` change many of them.",
        "",
    ]
    todo: list[tuple[str, type, Any]] = [("", config_module.PipelineConfig, config_module.PipelineConfig())]
    while todo:
        prefix, cls, instance = todo.pop(0)
        nested: list[tuple[str, type, Any]] = []
        out += [f"## `{prefix}`" if prefix else "## Top level", ""]
        doc = _section_doc(cls)
        if doc:
            out += [doc, ""]
        out += _table(cls, instance, f"{prefix}." if prefix else "", nested)
        out.append("")
        todo[:0] = nested
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    print(render(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
