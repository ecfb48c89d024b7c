"""The package's layers, checked on the source with `ast`: every module imports only from its own layer or
the ones below it, and no module uses another module's private (`_name`) names.

Layers, lowest first (a module may import from its own layer and every layer listed before it):

    foundation    config, manifest, resources, stage_hashes, dashboards, run_edit (a run's config with tasks
                  added/removed), config_reference (docs/configuration.md), storage (the run folder on a
                  storage URI, pyarrow.fs): schemas, files on disk and on storage, hashes
    data          data/ (tokenizer, encoding, batches, soft-target format), tasks/
    model         model.py (build/load/adapt Hugging Face models), losses.py (pure loss functions)
    training      training.py: the one training loop, its steps, evaluation, training state on disk;
                  teacher_scoring.py: an expert's soft targets (scored in its own job and by the stage)
    jobs          the Ray Train edge: worker_utils.py (worker side, around the training loop) and
                  training_jobs.py (driver side: a job's config, fit_concurrently)
    stages        one layer per stage package, in pipeline order: experts, upcycle, soft_targets, distill,
                  search, eval; a stage may use an earlier stage's public functions (distill reads the
                  soft targets' manifest, search trains the base), never a later one's; what several stages
                  share goes down a layer instead (training_jobs.py, manifest.require)
    cli           cli.py, __main__.py

A new module fails `test_every_module_has_a_layer` until it is placed here, and a new upward import or
private-name use fails with the file, line and import named.

Run: .venv/bin/python -m pytest tests/unit/test_layers.py -q
"""

from __future__ import annotations

import ast
import glob
import os
from typing import Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "dume_ray")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("dume_ray", "dume_ray.config", "dume_ray.manifest", "dume_ray.resources",
                    "dume_ray.stage_hashes", "dume_ray.dashboards", "dume_ray.run_edit", "dume_ray.config_reference",
                    "dume_ray.storage")),
    ("data", ("dume_ray.data", "dume_ray.tasks")),
    ("model", ("dume_ray.model", "dume_ray.losses")),
    ("training", ("dume_ray.training", "dume_ray.teacher_scoring")),
    ("jobs", ("dume_ray.worker_utils", "dume_ray.training_jobs")),
    ("stage experts", ("dume_ray.experts",)),
    ("stage upcycle", ("dume_ray.upcycle",)),
    ("stage soft_targets", ("dume_ray.soft_targets",)),
    ("stage distill", ("dume_ray.distill",)),
    ("stage search", ("dume_ray.search",)),
    ("stage eval", ("dume_ray.eval",)),
    ("cli", ("dume_ray.cli", "dume_ray.__main__")),
]


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


MODULES = {module_name(p): p for p in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))}
BENCHMARKS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.py")))


def layer_of(module: str) -> Optional[int]:
    """Index in LAYERS of the longest listed prefix of `module` (dume_ray.data.encode -> data); the bare
    package `dume_ray` matches only itself."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "dume_ray" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module of a (possibly relative) `from ... import`."""
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(tree: ast.AST, importer: str, is_package: bool = False) -> list[tuple[int, str, str]]:
    """(line, imported module, imported name or "") of every import at any depth; `from pkg import mod`
    counts as an import of the module pkg.mod when that is one of ours."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, importer, is_package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((node.lineno, submodule, "") if submodule in MODULES else (node.lineno, source, alias.name))
    return found


def upward_imports(path: str, importer: str) -> list[str]:
    own = layer_of(importer)
    problems = []
    for line, module, name in imports(_parse(path), importer, path.endswith("__init__.py")):
        target = layer_of(module) if module.split(".")[0] == "dume_ray" else None
        if target is not None and own is not None and target > own:
            what = f"from {module} import {name}" if name else f"import {module}"
            problems.append(f"{os.path.relpath(path, REPO)}:{line}: `{what}` ({LAYERS[own][0]} imports "
                            f"from the higher layer {LAYERS[target][0]})")
    return problems


def private_uses(path: str, importer: str) -> list[str]:
    """`from X import _name` of another module, and `mod._name` on a module of ours bound by an import."""
    tree = _parse(path)
    rel = os.path.relpath(path, REPO)
    problems, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, importer, path.endswith("__init__.py"))
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    module_aliases[alias.asname or alias.name] = submodule
                elif _is_private(alias.name) and source != importer:
                    problems.append(f"{rel}:{node.lineno}: `from {source} import {alias.name}` uses a private name")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                and _is_private(node.attr)):
            problems.append(f"{rel}:{node.lineno}: `{node.value.id}.{node.attr}` uses a private name of "
                            f"{module_aliases[node.value.id]}")
    return problems


# ---- the checker itself, on hand-written sources --------------------------------------------------------

def _write(tmp_path, source: str) -> str:
    path = tmp_path / "m.py"
    path.write_text(source)
    return str(path)


@pytest.mark.parametrize("importer, source, upward", [
    ("dume_ray.training", "from dume_ray.distill.losses import kd_loss", True),
    ("dume_ray.training", "def f():\n    import dume_ray.worker_utils", True),
    ("dume_ray.model", "from dume_ray import training", True),
    ("dume_ray.experts.launch", "from dume_ray.search.launch import run_search", True),
    ("dume_ray.training", "from dume_ray.losses import cross_entropy\nfrom dume_ray import manifest", False),
    ("dume_ray.distill.launch", "from dume_ray.soft_targets.launch import checked_soft_targets", False),
    ("dume_ray.distill.launch", "from .worker import train_fn_per_worker", False),
    ("dume_ray.data.encode", "import numpy, torch\nfrom ray import train", False),
])
def test_upward_import_detector(tmp_path, importer, source, upward):
    assert bool(upward_imports(_write(tmp_path, source), importer)) == upward


@pytest.mark.parametrize("source, private", [
    ("from dume_ray.experts.launch import _require", True),
    ("from dume_ray import manifest\nmanifest._tmp_name()", True),
    ("import dume_ray.manifest as m\nm._x", True),
    ("from dume_ray.manifest import require\nfrom __future__ import annotations", False),
    ("from dume_ray import manifest\nmanifest.__name__", False),
    ("class A:\n    def f(self):\n        return self._x", False),
])
def test_private_name_detector(tmp_path, source, private):
    assert bool(private_uses(_write(tmp_path, source), "dume_ray.other")) == private


def test_layer_of_takes_the_longest_prefix():
    names = [name for name, _ in LAYERS]
    assert names[layer_of("dume_ray.data.encode")] == "data"
    assert names[layer_of("dume_ray.losses")] == "model"
    assert names[layer_of("dume_ray")] == "foundation"
    assert layer_of("dume_ray_other") is None and layer_of("torch") is None


# ---- the package -----------------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced, f"modules with no layer (add them to LAYERS in tests/unit/test_layers.py): {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    problems = upward_imports(MODULES[module], module)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [*MODULES.values(), *BENCHMARKS], ids=lambda p: os.path.relpath(p, REPO))
def test_no_module_uses_another_modules_private_names(path):
    importer = module_name(path) if path.startswith(PACKAGE) else os.path.basename(path)[:-3]
    problems = private_uses(path, importer)
    assert not problems, "\n".join(problems)
