"""The README and docs/ pages say only what the repository can back: links resolve, configs load, commands exist,
numbers cite a benchmark JSON, and the configuration reference equals what the code generates.

    .venv/bin/python -m pytest -q tests/unit/test_docs.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dume_ray.config import load_config
from dume_ray.config_reference import REGENERATE, render

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
DOC_PAGES = [p for p in PAGES if p.parent.name == "docs"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A numeric claim: a spread, a percentage, a score like 0.53, points, or a timing/size with its unit.
CLAIM = re.compile(r"±|\d\s*%|\b\d+\.\d+\b|\bpoints\b|\b\d+(\.\d+)?\s?(s|min|GB|MB)\b")
NOT_A_CLAIM = re.compile(r"Python \d+\.\d+|arXiv \d+\.\d+")
FRAGMENT = re.compile(r"^# fragment: merges onto (\S+)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", _prose(page.read_text()), re.M)}


def test_docs_pages_exist():
    names = {p.name for p in DOC_PAGES}
    for name in ("architecture.md", "configuration.md", "real-models.md", "tasks-and-data.md", "search.md",
                 "upcycling.md", "cluster.md", "failure-and-resume.md", "results.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_link_resolves_inside_the_repository(page):
    for target in LINK.findall(_prose(page.read_text())):
        assert not re.match(r"[a-z]+:", target), f"{_rel(page)}: link {target} leaves the repository"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{_rel(page)}: link {target} points outside the repository"
        assert resolved.exists(), f"{_rel(page)}: link {target} names a file that does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{_rel(page)}: link {target}: no heading #{anchor} in {path}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_mentioned_exists(page):
    paths = re.findall(r"(?<![\w/.<])((?:configs|cluster|scripts|benchmarks|tests|dume_ray|docs)/[\w./-]+\.(?:yaml|sh|py|json|md))",
                       page.read_text())
    missing = sorted({p for p in paths if not (ROOT / p).exists()})
    assert not missing, f"{_rel(page)} names files that do not exist: {missing}"


def _yaml_blocks():
    for page in PAGES:
        for i, m in enumerate(b for b in FENCE.finditer(page.read_text()) if b.group(1) == "yaml"):
            yield pytest.param(m.group(2), id=f"{_rel(page)}-yaml{i}")


@pytest.mark.parametrize("block", list(_yaml_blocks()))
def test_every_yaml_block_loads_as_a_config(block, tmp_path):
    """A block is a whole config (schema defaults fill the rest), or starts with
    `# fragment: merges onto configs/X.yaml` and loads merged onto that file."""
    path = tmp_path / "block.yaml"
    fragment = FRAGMENT.match(block)
    if fragment:
        base = OmegaConf.load(ROOT / fragment.group(1))
        OmegaConf.save(OmegaConf.merge(base, OmegaConf.create(block)), path)
    else:
        path.write_text(block)
    load_config(str(path))


def test_readme_your_model_your_data_example_is_what_it_says(tmp_path):
    blocks = [m.group(2) for m in FENCE.finditer((ROOT / "README.md").read_text()) if m.group(1) == "yaml"]
    assert len(blocks) == 1, "README: expected one yaml block, the 'your model, your data' example"
    path = tmp_path / "mine.yaml"
    path.write_text(blocks[0])
    cfg = load_config(str(path))
    assert cfg.model.pretrained and cfg.data.chat_template and not cfg.base.enabled
    assert cfg.tasks.builtin == [] and [s.source for s in cfg.tasks.sources] == ["jsonl", "csv"]
    assert all(set(s.data_files) == {"train", "validation", "test"} for s in cfg.tasks.sources)
    assert len(blocks[0].splitlines()) <= 25, "README: keep the example short"


def _commands() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"sub": set(), "module": set(), "script": set()}
    for page in PAGES:
        text = page.read_text()
        found["sub"] |= {(s, _rel(page)) for s in re.findall(r"python -m dume_ray ([a-z][\w+-]*)", text)}
        found["module"] |= {(s, _rel(page)) for s in re.findall(r"python -m dume_ray\.(\w+)", text)}
        found["script"] |= {(s, _rel(page)) for s in re.findall(r"(?:bash|python) ((?:scripts|benchmarks)/[\w./-]+)", text)}
    return found


def test_every_script_and_module_mentioned_exists():
    found = _commands()
    for script, page in sorted(found["script"]):
        assert (ROOT / script).exists(), f"{page}: command names {script}, which does not exist"
    for module, page in sorted(found["module"]):
        assert (ROOT / "dume_ray" / f"{module}.py").exists(), f"{page}: python -m dume_ray.{module}: no such module"


def test_every_subcommand_mentioned_exists():
    subs = sorted({s for s, _ in _commands()["sub"]})
    assert "run" in subs
    for sub in subs:
        done = subprocess.run([sys.executable, "-m", "dume_ray", sub, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        pages = sorted(p for s, p in _commands()["sub"] if s == sub)
        assert done.returncode == 0, f"{pages}: `python -m dume_ray {sub}` is not a subcommand: {done.stderr[-300:]}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; keep it <= 150 and move the rest to docs/"


def _paragraphs(text: str) -> list[str]:
    """Paragraphs and list items of a page's prose (a bullet is its own paragraph)."""
    blocks = re.split(r"\n\s*\n|\n(?=\s*[-*] )", _prose(text))
    return [b.strip() for b in blocks if b.strip()]


def test_every_number_in_the_readme_cites_a_benchmark_json():
    results = re.compile(r"\]\((?:\./)?benchmarks/results/[\w.-]+\.json\)")
    for para in _paragraphs((ROOT / "README.md").read_text()):
        if para.startswith("|"):
            continue  # the documentation table: no numbers
        if CLAIM.search(NOT_A_CLAIM.sub("", para)):
            assert results.search(para), f"README: a number without its benchmarks/results/*.json link: {para[:200]!r}"


def test_every_results_table_cites_its_json():
    text = _prose((ROOT / "docs" / "results.md").read_text())
    paragraphs = re.split(r"\n\s*\n", text)
    for i, para in enumerate(paragraphs):
        if para.lstrip().startswith("|"):
            before = paragraphs[i - 1] if i else ""
            assert re.search(r"\]\(\.\./benchmarks/results/[\w.-]+\.json\)", before), \
                f"docs/results.md: table {para.splitlines()[0][:80]!r} is not preceded by a link to its JSON"


def test_configuration_reference_is_generated_from_the_code():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), f"docs/configuration.md differs from dume_ray/config.py; regenerate it: {REGENERATE}"


def test_configuration_reference_lists_every_key_of_the_demo_config():
    page = (ROOT / "docs" / "configuration.md").read_text()
    flat = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "demo.yaml"))

    def keys(node, prefix=""):
        for k, v in node.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    for key in keys(flat):
        assert f"`{key}`" in page, f"docs/configuration.md lacks `{key}` (used in configs/demo.yaml)"
