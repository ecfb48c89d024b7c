"""An expert's job scores its group's soft targets at its end, on the model it holds
(`experts/worker.score_soft_targets`), instead of the `soft_targets` stage loading the saved expert again on an
actor pool (`TeacherScorer(model_dir)` over Ray Data numpy batches). Both must give the same rows, bit for bit.
No Ray: the two scoring paths are called directly on the same weights and rows.

Run: .venv/bin/python -m pytest tests/unit/test_soft_targets_in_expert_job.py -q
"""

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dume_ray.data.soft_targets import SoftTargetError, write_shard
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.experts.worker import score_soft_targets
from dume_ray.model import load_tokenizer
from dume_ray.tasks import encode_rows
from dume_ray.tasks.builtin import make_builtin_task
from dume_ray.teacher_scoring import TeacherScorer

TOP_K, BATCH = 4, 8


def _rows(n: int = 20) -> list[dict]:
    tasks = {"copy": make_builtin_task("copy", 0, n, 4, 4), "reverse": make_builtin_task("reverse", 0, n, 4, 4)}
    return encode_rows(tasks, build_char_tokenizer(), "train", 32, {"copy": "g", "reverse": "g"})


def _ray_data_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """What `map_batches(batch_format="numpy")` hands the stage's TeacherScorer actors."""
    batch = {k: np.empty(len(rows), dtype=object) for k in ("example_id", "task", "group", "input_ids")}
    for i, r in enumerate(rows):
        for k in ("example_id", "task", "group"):
            batch[k][i] = r[k]
        batch["input_ids"][i] = np.asarray(r["input_ids"], dtype=np.int64)
    batch["response_start"] = np.array([r["response_start"] for r in rows], dtype=np.int64)
    return batch


@pytest.mark.parametrize("logprob_bits,kl_max", [(16, 0.0), (8, 0.0), (8, 0.3)])
def test_the_expert_job_writes_the_same_soft_targets_as_the_stage(stand_in_expert, tiny_model_dir, tmp_path,
                                                                   logprob_bits, kl_max):
    expert_dir = str(tmp_path / "expert")
    model, rows = stand_in_expert(expert_dir), _rows()
    tokenizer = load_tokenizer(expert_dir)
    config = {"soft_targets": {"rows": rows, "top_k": TOP_K, "kl_max": kl_max, "logprob_bits": logprob_bits,
                               "batch_size": BATCH, "shards_dir": str(tmp_path / "shards")}}

    written = score_soft_targets(model, tokenizer, config)  # the job's path: the model in memory

    assert written["rows"] == len(rows) == 40 and written["bytes"] > 0
    in_job = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(str(tmp_path / "shards" / "*.parquet")))])
    # the stage's path: the saved expert loaded again
    stage = TeacherScorer(expert_dir, top_k=TOP_K, kl_max=kl_max, logprob_bits=logprob_bits)
    write_shard(pa.concat_tables([stage(_ray_data_batch(rows[i:i + BATCH])) for i in range(0, len(rows), BATCH)]),
                str(tmp_path / "stage.parquet"))
    by_stage = pq.read_table(tmp_path / "stage.parquet")  # as the stage's shards are read back by the student
    assert in_job.schema.equals(by_stage.schema, check_metadata=True)
    assert in_job.schema.field("topk_ids").type == pa.list_(pa.uint16())  # the char vocabulary fits
    want = pa.uint8() if logprob_bits == 8 else pa.float16()
    assert in_job.schema.field("topk_logprobs").type == pa.list_(want)
    assert in_job.to_pylist() == by_stage.to_pylist()  # every id, stored log-prob (or code) and tail, exactly
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "shards"))
    assert not any(name.startswith(".shards") for name in os.listdir(tmp_path))  # no temp folder left behind


def test_a_bad_shard_never_lands_in_the_group_folder(stand_in_expert, tiny_model_dir, tmp_path, monkeypatch):
    """The shards are validated in a temp folder before the rename: a scorer gone wrong leaves no shards."""
    import dume_ray.teacher_scoring as scoring

    expert_dir = str(tmp_path / "expert")
    model = stand_in_expert(expert_dir)
    monkeypatch.setattr(scoring, "validate_shards", lambda *a, **k: (_ for _ in ()).throw(SoftTargetError("bad shard")))
    config = {"soft_targets": {"rows": _rows(4), "top_k": TOP_K, "batch_size": BATCH, "shards_dir": str(tmp_path / "shards")}}
    with pytest.raises(SoftTargetError, match="bad shard"):
        score_soft_targets(model, load_tokenizer(expert_dir), config)
    assert not (tmp_path / "shards").exists()
