"""TeacherScorer: an expert turns a batch of encoded examples into top-k soft targets.

A plain callable class over dicts of numpy arrays, so Ray Data can run it on an actor pool
(`ds.map_batches(TeacherScorer, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=n))`, see
`soft_targets/launch.py`) and a unit test can call it directly on a tiny model. Full-vocabulary logits
never leave this class: per response token it keeps the top-k ids (uint16 where the vocabulary fits, else
int32), their log-probs (float16, or 8-bit codes with `soft_targets.logprob_bits=8`) and the log of the mass
outside the top k, in the schema of `data/soft_targets.py` (`targets_table`).

`score_rows` runs it in this process over a list of rows, for the loops without Ray Data (the search
proxy, benchmarks/end_to_end.py). `write_group_shards` is how an expert's training job scores its own
group (the rows the student reads, `data/student_rows.py`) at its end, on the model it holds
(`TeacherScorer.from_model`, no second load; `experts/worker.py`):
the same batches as `score_rows`, so the same bytes as the `soft_targets` stage's pool given the same
batch size. It sits below the stage packages (the expert stage uses it, and the soft_targets stage comes
after that one). Pure: no Ray here. Tested in tests/unit/test_model_and_training.py and
tests/unit/test_soft_targets_in_expert_job.py.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import torch

from dume_ray.data.encode import batch_rows, collate, to_columns
from dume_ray.data.soft_targets import rows_to_table, targets_table, validate_shards, write_shard
from dume_ray.manifest import atomic_dir
from dume_ray.model import load_model, load_tokenizer
from dume_ray.training import response_logits


class TeacherScorer:
    def __init__(self, model_dir: str, top_k: int, dtype: str = "float32", torch_threads: int = 0, device: str = "auto",
                 kl_max: float = 0.0, logprob_bits: int = 16):
        """`device`: "cuda" (the actor was given a GPU, `soft_targets.gpus_per_actor` > 0), "cpu", or "auto".
        `kl_max` > 0: adaptive k (`soft_targets.kl_max`, the format's `topk_counts` column). `logprob_bits`: 16 or
        8 (`soft_targets.logprob_bits`)."""
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("TeacherScorer: soft_targets.gpus_per_actor > 0 but this actor sees no CUDA device")
        self.device = torch.device(device)
        use_bf16 = dtype == "bfloat16" and self.device.type == "cuda"
        self.model = load_model(model_dir, torch.bfloat16 if use_bf16 else torch.float32).to(self.device).eval()
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        self.top_k, self.kl_max, self.logprob_bits = top_k, kl_max, logprob_bits

    @classmethod
    def from_model(cls, model: torch.nn.Module, pad_id: int, top_k: int, kl_max: float = 0.0,
                   logprob_bits: int = 16) -> "TeacherScorer":
        """A scorer on a model already in memory (an expert's job, at its end), on the model's own device."""
        scorer = cls.__new__(cls)
        scorer.model, scorer.pad_id, scorer.top_k, scorer.kl_max = model.eval(), pad_id, top_k, kl_max
        scorer.logprob_bits = logprob_bits
        scorer.device = next(model.parameters()).device
        return scorer

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = batch_rows(batch)
        inputs = collate(rows, self.pad_id)
        logits, _ = response_logits(self.model, {k: v.to(self.device) for k, v in inputs.items()})  # [n, v]
        logprobs = torch.log_softmax(logits, dim=-1)  # [n, v]
        rows = [{**row, "example_id": batch["example_id"][i], "task": batch["task"][i], "group": batch["group"][i]}
                for i, row in enumerate(rows)]
        return targets_table(rows, logprobs.cpu(), self.top_k, self.kl_max, self.logprob_bits)


def score_rows(model_dir: str | TeacherScorer, rows: list[dict], top_k: int, batch_size: int = 256,
               kl_max: float = 0.0, logprob_bits: int = 16) -> pa.Table:
    """The expert's soft targets for encoded `rows`, `batch_size` rows at a time, as one table in the
    schema of `data/soft_targets.py`: what the soft_targets stage's actor pool computes, in one process.
    `model_dir` may be a scorer already built (then `top_k`, `kl_max` and `logprob_bits` are its own)."""
    scorer = model_dir if isinstance(model_dir, TeacherScorer) else \
        TeacherScorer(model_dir, top_k, kl_max=kl_max, logprob_bits=logprob_bits)
    return pa.concat_tables([scorer(to_columns(rows[start:start + batch_size]))
                             for start in range(0, len(rows), batch_size)])


def write_group_shards(scorer: TeacherScorer, rows: list[dict], batch_size: int, shards_dir: str, vocab_size: int) -> dict:
    """Score `rows` (the expert group's training rows the student reads) and write them as that group's shards
    folder: one Parquet shard, validated (schema, ids, distributions, one row per example) before the folder is
    renamed into place; an empty shard when the student reads none of the group's rows.
    {"shards": folder, "rows": n, "bytes": size on disk}."""
    table = score_rows(scorer, rows, scorer.top_k, batch_size) if rows else \
        rows_to_table([], min(scorer.top_k, vocab_size), scorer.kl_max > 0, vocab_size, scorer.logprob_bits)
    k = int(table.schema.metadata[b"top_k"])
    with atomic_dir(shards_dir) as tmp:
        write_shard(table, os.path.join(tmp, "part-00000.parquet"))
        written = validate_shards(tmp, vocab_size, k, len(rows), adaptive=scorer.kl_max > 0,
                                  logprob_bits=scorer.logprob_bits)
    return {"shards": shards_dir, "rows": written,
            "bytes": sum(os.path.getsize(p) for p in glob.glob(os.path.join(shards_dir, "*.parquet")))}
