"""The search proxy's per-grouping pieces without Ray (`search/proxy.py`): the experts of a grouping and their
soft targets, cached per group, as a search trial and benchmarks/search_predicts.py use them.

Run: .venv/bin/python -m pytest tests/unit/test_search_proxy.py -q
"""

from __future__ import annotations

import os

from dume_ray import stage_hashes
from dume_ray.config import load_config
from dume_ray.model import load_tokenizer
from dume_ray.search.proxy import expert_cache_key, grouping_soft_targets
from dume_ray.tasks import load_tasks


def _cfg():
    return load_config("configs/search.yaml", ["tasks.builtin=[copy,reverse,add]", "tasks.num_train=8", "tasks.num_validation=2",
                                               "tasks.num_test=2", "experts.optim.steps=1", "experts.optim.batch_size=4",
                                               "soft_targets.top_k=4"])


def test_grouping_soft_targets_cover_every_task_once_and_reuse_cached_groups(tiny_model_dir, tmp_path):
    cfg, cache = _cfg(), str(tmp_path / "cache")
    tokenizer = load_tokenizer(tiny_model_dir)
    tasks = load_tasks(cfg.tasks)
    rows, hits = grouping_soft_targets(cfg, tiny_model_dir, "base0", cache, [["copy", "add"], ["reverse"]], tokenizer, tasks)
    assert hits == 0
    assert sorted(r["example_id"] for r in rows) == sorted(f"{t}/train/{i}" for t in ("copy", "reverse", "add") for i in range(8))
    assert {r["task"]: r["group"] for r in rows} == {"copy": "copy+add", "add": "copy+add", "reverse": "reverse"}
    # k teacher tokens per response position (the pipeline's soft-target schema)
    assert all(len(r["topk_ids"]) == len(r["topk_logprobs"]) == 4 * (len(r["input_ids"]) - r["response_start"]) for r in rows)

    # another grouping sharing the group [reverse]: that expert comes from the cache, the new group is trained
    _, hits = grouping_soft_targets(cfg, tiny_model_dir, "base0", cache, [["copy"], ["reverse"], ["add"]], tokenizer, tasks)
    assert hits == 1
    assert os.path.isdir(os.path.join(cache, expert_cache_key("base0", ["add", "copy"], cfg)))  # key: the sorted group
    # a different base never reuses an expert
    _, hits = grouping_soft_targets(cfg, tiny_model_dir, "base1", cache, [["reverse"]], tokenizer, tasks)
    assert hits == 0


def test_expert_cache_key_of_16_bit_soft_targets_is_the_one_before_the_format_key_refactor():
    """Computed at 7a98660, before `stage_hashes.logprob_format_key`: caches of 16-bit runs stay valid (8-bit
    keys moved once, from three loose values to the stage hash's one entry)."""
    cfg = load_config(None, ["tasks.builtin=[copy,reverse,add]"])
    assert expert_cache_key("base0", ["add", "copy"], cfg) == "69dfb3ee0c708a0b"


def test_a_new_8_bit_layout_moves_the_cache_key_and_the_stage_hash_together(monkeypatch):
    """One key for the 8-bit format: bumping its version invalidates cached proxy experts and the pipeline's
    soft targets alike, and neither at 16 bits."""
    def keys(bits: int) -> tuple[str, str]:
        cfg = load_config(None, ["tasks.builtin=[copy,reverse,add]", f"soft_targets.logprob_bits={bits}"])
        return expert_cache_key("base0", ["copy"], cfg), stage_hashes.pipeline_hashes(cfg)["soft_targets/copy"]

    before = {bits: keys(bits) for bits in (16, 8)}
    assert before[8][0] != before[16][0] and before[8][1] != before[16][1]
    monkeypatch.setattr(stage_hashes, "EIGHT_BIT_FORMAT", stage_hashes.EIGHT_BIT_FORMAT + 1)
    after = {bits: keys(bits) for bits in (16, 8)}
    assert after[16] == before[16]
    assert after[8][0] != before[8][0] and after[8][1] != before[8][1]
