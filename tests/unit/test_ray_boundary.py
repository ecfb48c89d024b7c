"""Architecture rules checked on the source with `ast`: Ray is imported only by the Ray-facing modules
(worker.py, launch.py, cli.py, worker_utils.py, training_jobs.py), and every module has a docstring.

Run: cd /work/main && .venv/bin/python -m pytest tests/unit/test_ray_boundary.py -q
"""

from __future__ import annotations

import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "dume_ray")
RAY_FACING = {"worker.py", "launch.py", "cli.py", "worker_utils.py", "training_jobs.py"}
MODULES = sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))
RAY_FREE = [p for p in MODULES if os.path.basename(p) not in RAY_FACING]
# Empty `__init__.py` package markers hold no code to document; every other module needs a docstring.
DOCUMENTED = [p for p in MODULES if not (os.path.basename(p) == "__init__.py" and os.path.getsize(p) == 0)]


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def _parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def ray_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every `import ray[.x]` / `from ray[.x] import ...`, at any depth (functions too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name == "ray" or a.name.startswith("ray.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ray" or node.module.startswith("ray."):
                found.append((node.lineno, node.module))
    return found


def test_package_sources_are_found():
    names = {os.path.basename(p) for p in MODULES}
    assert {"config.py", "training.py", "cli.py", "worker.py"} <= names


@pytest.mark.parametrize("source, expected", [
    ("import ray", ["ray"]),
    ("import os, ray.train as rt", ["ray.train"]),
    ("from ray.train import ScalingConfig", ["ray.train"]),
    ("from ray import data", ["ray"]),
    ("def f():\n    import ray.data", ["ray.data"]),
    ("import rayon\nfrom raytrace import x\nfrom . import ray", []),
])
def test_ray_import_detector_finds_exactly_ray_imports(source, expected):
    assert [m for _, m in ray_imports(ast.parse(source))] == expected


def test_pure_modules_exist_besides_ray_facing_ones():
    assert len(RAY_FREE) >= 10 and any(p.endswith("training.py") for p in RAY_FREE)


@pytest.mark.parametrize("path", RAY_FREE, ids=_rel)
def test_ray_is_imported_only_by_ray_facing_modules(path):
    found = ray_imports(_parse(path))
    assert not found, f"{_rel(path)} imports Ray ({found}); only {sorted(RAY_FACING)} may"


@pytest.mark.parametrize("path", DOCUMENTED, ids=_rel)
def test_every_non_empty_module_has_a_docstring(path):
    assert ast.get_docstring(_parse(path)), f"{_rel(path)} has no module docstring"
