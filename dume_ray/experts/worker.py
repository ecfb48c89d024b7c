"""Ray Train worker for plain cross-entropy fine-tuning: the `base` and `experts` stages.

`train_fn_per_worker(config)` is what `TorchTrainer` runs on each worker. It gets plain data (a dict from
`experts/launch.py`) and runs `worker_utils.training_run` with the pure `training.ce_step` on its
Ray Data shard "train" of encoded rows: checkpoints through Ray Train, and on rank 0 the final model saved
with `save_pretrained` and scored on the validation split. An expert job given `config["soft_targets"]`
then scores its own group's training rows with the model it holds (`teacher_scoring.write_group_shards`)
into that group's soft-target shards, so the `soft_targets` stage has nothing left to load or score. The return value reaches the driver as
`Result.return_value` (and the stage's manifest metrics), with `node_id`: the Ray node rank 0 trained on.
"""

from __future__ import annotations

import ray

from dume_ray import storage
from dume_ray.config import OptimConfig, from_dict
from dume_ray.teacher_scoring import TeacherScorer, write_group_shards
from dume_ray.training import ce_step
from dume_ray.worker_utils import training_run


def train_fn_per_worker(config: dict) -> dict:
    optim = from_dict(OptimConfig, config["optim"])
    result = training_run(config, ce_step(optim.grad_clip, config["dtype"]),
                          after_save=score_soft_targets if config.get("soft_targets") else None)
    if result:  # rank 0: where it ran, so a multi-node run shows how its jobs spread (tests/cluster)
        result["node_id"] = ray.get_runtime_context().get_node_id()
    return result


def score_soft_targets(model, tokenizer, config: dict) -> dict:
    """The group's soft targets from the expert just trained: `config["soft_targets"]` holds its rows (the
    group's training rows in encoding order), top_k, kl_max, logprob_bits, batch_size and the shards folder."""
    st = config["soft_targets"]
    scorer = TeacherScorer.from_model(model, tokenizer.pad_token_id, st["top_k"], st.get("kl_max", 0.0),
                                      st.get("logprob_bits", 16))
    written = write_group_shards(scorer, st["rows"], st["batch_size"], st["shards_dir"], len(tokenizer))
    storage.push_path(st["shards_dir"])  # with a storage URI: the driver may be on another node
    return written
