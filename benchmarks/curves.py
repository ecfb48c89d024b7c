"""Learning curves, teacher schedules and a two-skill task, trained in one process (issue 14, items 7 and 8).

    python benchmarks/curves.py                              # configs/demo.yaml, seeds 0 1 2, both parts
    python benchmarks/curves.py --parts two_skill            # one part (curves = learning curves + schedules)
    python benchmarks/curves.py --seeds 0 --out F0 ...; python benchmarks/curves.py --merge F0 F1 F2   # seeds apart
    python benchmarks/curves.py --tiny                       # minutes on the loaded 2-core machine, temp folder
    nice -n 5 python benchmarks/curves.py --parts two_skill --config configs/smollm2.yaml --threads 1 --seeds 0 \
        --out benchmarks/results/curves_two_skill_smollm2.json   # two_skill on SmolLM2-135M, ~10-15 min a seed

The pipeline's stages run here as plain loops, without Ray (as the search proxy does, `search/proxy.py`): a base
from the embedded model (CE on every training task), one expert per group (`proxy.train_expert`), its top-k soft
targets (`proxy.score_soft_targets`), then the student (`training.kd_step`, alpha = distill.alpha) and the
multitask baseline (the same loop with alpha = 0), each from the base, with the config's optim, through
`training.train_loop`. Three parts, per seed (one base and one set of experts per seed and suite):

* curves: validation exact match and loss (mean over tasks) of student and multitask every `--every` steps on
  the demo suite; the steps each takes to reach the multitask's final validation exact match (first sampled
  step at or above it, or "not reached"); one PNG of both curves (mean ± std over seeds).
* schedules: the student with distill.teacher_schedule interleaved (the curves' student), sequential and
  annealed (`data.encode.stream_order`), same budget; validation chooses (the default stays interleaved unless
  another schedule is better by more than the spread over seeds), test is reported.
* two_skill: the word tasks reverse_words and upper_words, each with its own expert, and reverse_upper, which
  needs both skills at once and which NO model trains on (base, experts, student and multitask see only the two
  single-skill tasks): do the student, the DUME MoE (top-1 and top-2: both experts' MLPs mixed per token) and the
  multitask baseline combine the two skills? Test split. A control multitask that does train on reverse_upper
  (gold labels, same steps) says whether the model can learn the task at all. On a pretrained model
  (`configs/smollm2.yaml`) the model as loaded is the base (no base training, as `base.enabled: false`), the experts
  are trained as the config says (MLP only there), and the steps are cut to TWO_SKILL_PRETRAINED (why: its
  comment); every generation may run to the longest answer of the three tasks (`answer_room`).

The in-process stream differs from the pipeline's in one way: each epoch gets a new order (seed + epoch),
where the pipeline keeps one order and shuffles locally within four batches. Results: benchmarks/results/
curves.json (per seed cells, kept as they finish, so an interrupted run resumes or a later sitting adds seeds;
a rerun refuses a JSON measured with another config or other overrides) and curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, fmt_pm, markdown_table, mean_std, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
import torch  # noqa: E402

from dume_ray.config import config_hash, load_config  # noqa: E402
from dume_ray.data.encode import answer_tokens, scheduled_batches  # noqa: E402
from dume_ray.model import create_initial_model, expert_trainable, load_model, load_tokenizer, make_trainable  # noqa: E402
from dume_ray.search.proxy import (cached_expert, expert_cache_key, read_soft_targets, score_soft_targets,  # noqa: E402
                                  train_expert)
from dume_ray.stage_hashes import base_hash  # noqa: E402
from dume_ray.tasks import encode_rows, load_tasks  # noqa: E402
from dume_ray.training import evaluate_tasks, kd_step, make_optimizer, score_tasks, train_loop  # noqa: E402
from regime import dume  # noqa: E402  (the DUME MoE of the experts, router solved in process)

SCHEDULES = ("interleaved", "sequential", "annealed")
SINGLE_SKILLS, TWO_SKILL = ("reverse_words", "upper_words"), "reverse_upper"
TWO_SKILL_TASKS = f"tasks.builtin=[{','.join(SINGLE_SKILLS)},{TWO_SKILL}]"
TWO_SKILL_EMBEDDED = ["model.max_seq_len=112", "eval.max_new_tokens=36"]  # the character model: one token a letter
# A pretrained model (configs/smollm2.yaml: 240 training rows a task, batch 8, 50 test rows a task) in about a
# quarter of an hour a seed on one thread: each expert 30 steps = one pass over its task's 240 rows (SmolLM2's
# experts reach 0.5-0.8 on reverse_words at 20-40 steps); student and multitask 60 = one pass over the two tasks'
# 480 rows, so each task's rows are read as often as by its expert; the control multitask gets the same 60 steps
# over three tasks (2/3 of a pass). 240 training steps (10 min at 2.5 s a step; the pipeline's SmolLM2 run measured
# 2.6 s a step for experts with scoring and 3.2 for the student: eval_share.json) plus 7 models x 150 test
# generations of <= 13 tokens (about 3 min: that run's eval made 1,200 of <= 12 in 161 s).
TWO_SKILL_PRETRAINED = ["experts.optim.steps=30", "distill.optim.steps=60"]
TINY_OVERRIDES = ["tasks.builtin=[copy,reverse]", "tasks.num_train=32", "tasks.num_validation=4", "tasks.num_test=4", "base.optim.steps=2",
                  "experts.optim.steps=2", "distill.optim.steps=4", "eval.max_new_tokens=4",
                  "upcycle.stats_examples_per_task=8"]


def mean(scores: dict) -> float:
    return sum(scores.values()) / len(scores)


# ---------------------------------------------------------------------------------------------------------
# The stages, in process
# ---------------------------------------------------------------------------------------------------------

def prepare(cfg, work: str, groups: dict[str, list[str]]) -> dict:
    """Base, one expert per group and its soft targets, under `work` (reused when there, keyed by the settings
    that shape them: `base_key`, `search.proxy.expert_cache_key`, so an entry trained under other overrides is
    never reused): the pipeline's base, experts and soft_targets stages as plain loops. The base trains on the
    groups' tasks only; a pretrained model (or `base.enabled: false`) is the base as loaded, as in the pipeline."""
    init_dir = create_initial_model(cfg.model, cfg.seed, os.path.join(work, "init"), cfg.data)
    tokenizer = load_tokenizer(init_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    trained = {t: tasks[t] for names in groups.values() for t in names}

    def train_base(out: str) -> None:
        rows = encode_rows(trained, tokenizer, "train", cfg.model.max_seq_len, {t: "base" for t in trained})
        train_expert(load_model(init_dir), tokenizer, rows, cfg.base.optim, cfg.seed, out, cfg.model.dtype)

    as_loaded = cfg.model.pretrained or not cfg.base.enabled
    base = base_key(cfg, list(trained), as_loaded)
    base_dir = init_dir if as_loaded else cached_expert(work, f"base-{base}", train_base)[0]
    expert_dirs, soft_rows = {}, []
    for group, names in groups.items():
        rows = encode_rows({t: tasks[t] for t in names}, tokenizer, "train", cfg.model.max_seq_len, {t: group for t in names})

        def train_group(out: str) -> None:
            model = make_trainable(load_model(base_dir), **expert_trainable(cfg.experts))
            train_expert(model, tokenizer, rows, cfg.experts.optim, cfg.seed, os.path.join(out, "model"), cfg.model.dtype)
            score_soft_targets(os.path.join(out, "model"), rows, cfg.soft_targets.top_k, os.path.join(out, "soft.parquet"),
                               cfg.soft_targets.batch_size, kl_max=cfg.soft_targets.kl_max,
                               logprob_bits=cfg.soft_targets.logprob_bits)

        entry, _ = cached_expert(work, f"expert-{group}-{expert_cache_key(base, names, cfg)}", train_group)
        expert_dirs[group] = os.path.join(entry, "model")
        soft_rows += read_soft_targets(os.path.join(entry, "soft.parquet"))
    return {"tokenizer": tokenizer, "tasks": tasks, "base_dir": base_dir, "expert_dirs": expert_dirs,
            "soft_rows": soft_rows, "groups": list(groups), "base_steps": 0 if as_loaded else cfg.base.optim.steps}


def base_key(cfg, tasks: list[str], as_loaded: bool) -> str:
    """What `prepare`'s base depends on: the pipeline's base hash (`stage_hashes.base_hash`: model, data, seed,
    base.optim, the tasks' data) of a base trained on `tasks`, or of the model as loaded, and the tasks' order
    (the order of its training rows)."""
    as_run = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, enabled=not as_loaded, tasks=list(tasks)))
    return config_hash("curves-base", base_hash(as_run), list(tasks))


def train_student(cfg, prep: dict, alpha: float, schedule: str, every: int, eval_tasks: dict,
                  rows: list[dict] | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Student (alpha = distill.alpha) or multitask (alpha = 0) from the base on the soft-target rows in
    `schedule` order; validation exact match and loss (means over `eval_tasks`) at step 0, every `every`
    steps and at the end. Returns (model, curve)."""
    d, tokenizer = cfg.distill, prep["tokenizer"]
    torch.manual_seed(cfg.seed)
    model = load_model(prep["base_dir"])
    optimizer, scheduler = make_optimizer(model, d.optim)
    rows = rows if rows is not None else prep["soft_rows"]
    batches = scheduled_batches(rows, d.optim.batch_size, cfg.seed, schedule, prep["groups"], d.optim.steps * d.optim.batch_size)
    train_step = kd_step(d.optim.grad_clip, min(cfg.soft_targets.top_k, len(tokenizer)), alpha, d.optim.steps,
                         d.anneal and alpha > 0, d.temperature, d.divergence, d.jsd_beta, cfg.model.dtype)
    curve = []

    def point(step: int, metrics: dict) -> None:
        scores = score_tasks(model, tokenizer, eval_tasks, "validation", cfg.eval.max_new_tokens, cfg.eval.batch_size)
        curve.append({"step": step, "exact_match": mean(scores["exact_match"]), "loss": mean(scores["loss"]),
                      "per_task": scores["exact_match"], "train_loss": metrics.get("loss")})

    if every:
        point(0, {})
    train_loop(model, optimizer, scheduler, batches, train_step, tokenizer.pad_token_id, start_step=0,
               total_steps=d.optim.steps, checkpoint_every=every, on_checkpoint=point)
    return model, curve


def test_scores(model, cfg, tokenizer, tasks: dict) -> dict[str, float]:
    return evaluate_tasks(model, tokenizer, tasks, "test", cfg.eval.max_new_tokens, cfg.eval.batch_size)


# ---------------------------------------------------------------------------------------------------------
# The three parts, one seed each
# ---------------------------------------------------------------------------------------------------------

def curves_and_schedules(cfg, work: str, every: int, schedules: list[str]) -> dict:
    """Part curves (student interleaved + multitask, validation every `every` steps) and part schedules (the
    student with each of `schedules`); final validation and test of each model."""
    prep = prepare(cfg, work, {t: [t] for t in cfg.tasks.names})
    tasks, tokenizer, cell = prep["tasks"], prep["tokenizer"], {}
    for label, alpha, schedule in [("multitask", 0.0, "interleaved"), *(("student/" + s, cfg.distill.alpha, s) for s in schedules)]:
        start = time.time()
        model, curve = train_student(cfg, prep, alpha, schedule, every, tasks)
        cell[label] = {"curve": curve, "validation": curve[-1]["exact_match"], "validation_loss": curve[-1]["loss"],
                       "test": mean(test_scores(model, cfg, tokenizer, tasks)), "seconds": round(time.time() - start, 1)}
        print(f"[curves] seed {cfg.seed} {label}: validation {cell[label]['validation']:.3f}, test {cell[label]['test']:.3f} "
              f"({cell[label]['seconds']:.0f} s)", flush=True)
    return cell


def two_skill(cfg, work: str, control: bool) -> dict:
    """Part two_skill: experts for reverse_words and upper_words; every trained model sees only those two tasks;
    test exact match of each model on the two and on reverse_upper. Generations may run to `answer_room`."""
    prep = prepare(cfg, work, {t: [t] for t in SINGLE_SKILLS})
    tasks, tokenizer = prep["tasks"], prep["tokenizer"]
    max_new_tokens = max(cfg.eval.max_new_tokens, answer_room(tasks, tokenizer, cfg.model.max_seq_len))
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=max_new_tokens))
    cell = {"settings": {"max_new_tokens": max_new_tokens, "base_steps": prep["base_steps"],
                         "expert_steps": cfg.experts.optim.steps, "student_steps": cfg.distill.optim.steps,
                         "test_rows": {t: len(task.examples("test")) for t, task in tasks.items()}}}
    seen = {t: tasks[t] for t in SINGLE_SKILLS}

    def record(label: str, model, start: float) -> None:
        cell[label] = {"test": test_scores(model, cfg, tokenizer, tasks), "seconds": round(time.time() - start, 1)}
        print(f"[two_skill] seed {cfg.seed} {label}: test {cell[label]['test']}", flush=True)

    for group, path in prep["expert_dirs"].items():
        record(f"expert/{group}", load_model(path), time.time())
    start = time.time()
    for k, moe in dume(cfg, prep["expert_dirs"], tokenizer, seen, [1, 2]).items():
        record(f"dume_top{k}", moe, start)
    for label, alpha in (("student", cfg.distill.alpha), ("multitask", 0.0)):
        start = time.time()
        record(label, train_student(cfg, prep, alpha, "interleaved", 0, seen)[0], start)
    if control:  # learnability: the multitask loop on all three tasks' gold rows (alpha = 0: no teacher term)
        start = time.time()
        k = min(cfg.soft_targets.top_k, len(tokenizer))
        rows = [{**r, **_no_targets(r, k)} for r in encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len,
                                                                 {t: t for t in tasks})]
        control_prep = {**prep, "groups": list(tasks)}
        record("multitask_trained_on_reverse_upper",
               train_student(cfg, control_prep, 0.0, "interleaved", 0, tasks, rows=rows)[0], start)
    return cell


def answer_room(tasks: dict, tokenizer, max_seq_len: int) -> int:
    """Tokens a generation needs for the longest answer of any split of `tasks` (`data.encode.answer_tokens`, the
    preflight's rule: eos not counted, an answer of exactly max_new_tokens tokens matches): a smaller
    eval.max_new_tokens would cut correct answers (SmolLM2 spends up to 13 tokens on 5 upper-cased words). Encodes
    every split as the pipeline does, so an example longer than model.max_seq_len fails here as in the preflight
    (tasks.too_long=error)."""
    return max(answer_tokens(row) for name, task in tasks.items() for split in task.splits
               for row in encode_rows({name: task}, tokenizer, split, max_seq_len, {name: name}))


def _no_targets(row: dict, k: int) -> dict:
    """Zero top-k columns for a gold-only row (alpha = 0 weighs the KD term 0, but the batch carries one
    ignored target per response token)."""
    n = len(row["input_ids"]) - row["response_start"]
    return {"topk_ids": [0] * (n * k), "topk_logprobs": [0.0] * (n * k), "tail_logmass": [0.0] * n}


# ---------------------------------------------------------------------------------------------------------
# Driver, summary, plot
# ---------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["curves", "two_skill"], choices=["curves", "two_skill"],
                        help="curves = learning curves + teacher schedules (one set of experts); two_skill")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--every", type=int, default=50, help="validation every this many steps")
    parser.add_argument("--no-control", action="store_true", help="two_skill without the multitask trained on reverse_upper")
    parser.add_argument("--work-dir", default="runs/curves")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--merge", nargs="*", default=[], help="only merge the cells of these result JSONs into --out")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:  # one seed, two of the schedules, 4 new tokens (two_skill: answer_room): minutes on 2 loaded cores
        args.seeds, args.every, args.schedules = args.seeds[:1], 4, ["interleaved", "annealed"]
    started = time.time()
    out = result_path("curves", args.out, args.tiny)
    work_root = os.path.join(os.path.dirname(out), "runs") if args.tiny else args.work_dir
    overrides = [*(TINY_OVERRIDES if args.tiny else []), *args.set]
    try:  # bad input fails here, before any work
        pretrained = load_config(args.config, overrides).model.pretrained
        part_overrides = {"curves": overrides, "two_skill": two_skill_overrides(pretrained, args.tiny, args.set)}
        configs = {part: load_config(args.config, o) for part, o in part_overrides.items()}
    except ValueError as exc:  # ConfigError, or a value the config's checks refuse
        sys.exit(f"error: {args.config}: {exc}")
    previous = [json.load(open(path)) for path in args.merge or ([out] if os.path.exists(out) and not args.tiny else [])]
    cells = {(c["part"], c["seed"]): c["values"] for record in previous for c in record.get("cells", [])}
    for record in previous:  # cells of one JSON are measured alike (a record older than part_overrides has none)
        if (record.get("overrides", overrides) != overrides or record.get("config", args.config) != args.config
                or record.get("part_overrides", part_overrides) != part_overrides):
            sys.exit(f"error: {args.merge or out} was measured with config {record.get('config')} and overrides "
                     f"{record.get('part_overrides', record.get('overrides'))}, not {args.config} and {part_overrides}")

    def save() -> dict:
        payload = {**summarise(args, cells, configs, out), "overrides": overrides, "part_overrides": part_overrides}
        if args.merge:  # where each merged cell was measured
            payload["merged_from"] = [{k: record.get(k) for k in ("command", "started_utc", "finished_utc", "wall_seconds",
                                                                  "git_commit", "machine")} for record in previous]
        write_result(out, "curves", command_line(), started, payload, payload["table"])
        return payload

    for seed in args.seeds if not args.merge else []:
        for part in args.parts:
            if (part, seed) in cells:
                continue
            cfg = load_config(args.config, [*part_overrides[part], f"seed={seed}"])
            work = os.path.join(work_root, f"{cfg.name}-{part}-s{seed}")
            start = time.time()
            cells[(part, seed)] = (curves_and_schedules(cfg, work, args.every, args.schedules) if part == "curves"
                                   else two_skill(cfg, work, not args.no_control))
            print(f"[curves] {part} seed {seed} done in {time.time() - start:.0f} s", flush=True)
            save()
            shutil.rmtree(work, ignore_errors=True)  # models are not kept; the JSON holds every number
    print(save()["table"], flush=True)


def two_skill_overrides(pretrained: bool, tiny: bool, user: list[str]) -> list[str]:
    """Part two_skill's overrides, a later one winning: a pretrained model's budget (not with --tiny), --tiny's,
    the three word tasks, the character model's sequence room, then the user's --set."""
    return [*(TWO_SKILL_PRETRAINED if pretrained and not tiny else []), *(TINY_OVERRIDES if tiny else []),
            TWO_SKILL_TASKS, *([] if pretrained else TWO_SKILL_EMBEDDED), *user]


def steps_to_reach(curve: list[dict], target: float):
    """First sampled step whose validation exact match is >= target, or None."""
    return next((p["step"] for p in curve if p["exact_match"] >= target - 1e-12), None)


def summarise(args, cells: dict, configs: dict, out: str) -> dict:
    payload, tables = {"config": args.config, "seeds": sorted({s for _, s in cells}), "every": args.every,
                       "cells": [{"part": p, "seed": s, "values": v} for (p, s), v in sorted(cells.items())]}, []
    curve_cells = {s: v for (p, s), v in cells.items() if p == "curves"}
    if curve_cells:
        reach, rows = {}, []
        for s, cell in sorted(curve_cells.items()):
            target = cell["multitask"]["validation"]
            reach[s] = {label: steps_to_reach(cell[label]["curve"], target) for label in ("student/interleaved", "multitask")}
        for label in ("student/interleaved", "multitask"):
            steps = [reach[s][label] for s in sorted(reach)]
            got = [x for x in steps if x is not None]
            rows.append([label.split("/")[0], len(steps), fmt_pm([c[label]["validation"] for c in curve_cells.values()]),
                         fmt_pm([c[label]["test"] for c in curve_cells.values()]),
                         ", ".join("not reached" if x is None else str(x) for x in steps),
                         fmt_pm(got, digits=0) if len(got) == len(steps) else "–"])
        tables.append(markdown_table(["model", "seeds", "final validation", "test",
                                      "steps to reach the multitask's final validation (per seed)", "mean ± std"], rows))
        payload["steps_to_reach_multitask_final"] = {str(s): r for s, r in reach.items()}
        payload["plot"] = plot(curve_cells, os.path.splitext(out)[0] + ".png", configs["curves"].distill.optim.steps)
        schedules = [s for s in SCHEDULES if all(f"student/{s}" in c for c in curve_cells.values())]
        validation = {s: [c[f"student/{s}"]["validation"] for c in curve_cells.values()] for s in schedules}
        if validation:
            chosen = choose_schedule(validation)
            rows = [[s, len(validation[s]), fmt_pm(validation[s]), fmt_pm([c[f"student/{s}"]["test"] for c in curve_cells.values()]),
                     fmt_pm([c[f"student/{s}"]["validation_loss"] for c in curve_cells.values()])] for s in schedules]
            tables.append(markdown_table(["teacher schedule", "seeds", "student validation", "student test",
                                          "validation loss"], rows) + f"\n\nchosen on validation: {chosen}")
            payload["schedule_chosen"] = chosen
    two = {s: v for (p, s), v in cells.items() if p == "two_skill"}
    if two:
        labels = [label for label in next(iter(two.values())) if label != "settings" and all(label in c for c in two.values())]
        tasks = [*SINGLE_SKILLS, TWO_SKILL]
        rows = [[label, len(two), *(fmt_pm([c[label]["test"][t] for c in two.values()]) for t in tasks)] for label in labels]
        settings = {json.dumps(c.get("settings"), sort_keys=True) for c in two.values()}  # older cells have none
        tables.append(markdown_table(["model (test exact match)", "seeds", *tasks], rows)
                      + "".join(f"\n\nsettings: {x}" for x in sorted(settings) if x != "null"))
    payload["table"] = "\n\n".join(tables)
    return payload


def choose_schedule(validation: dict[str, list[float]]) -> str:
    """The best validation mean, unless interleaved (the default) is within the larger of the two spreads."""
    stats = {s: mean_std(v) for s, v in validation.items()}
    best = max(stats, key=lambda s: stats[s][0])
    if "interleaved" in stats and stats[best][0] - stats["interleaved"][0] <= max(stats[best][1], stats["interleaved"][1]):
        return "interleaved"
    return best


def plot(curve_cells: dict, path: str, steps: int) -> str | None:
    """Validation exact match and loss of student and multitask against steps (mean ± std over seeds)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[curves] matplotlib not importable: no PNG", flush=True)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, name in (("student/interleaved", "student (KD)"), ("multitask", "multitask")):
        curves = [c[label]["curve"] for c in curve_cells.values()]
        x = [p["step"] for p in curves[0]]
        for ax, key in zip(axes, ("exact_match", "loss")):
            stats = [mean_std([c[i][key] for c in curves]) for i in range(len(x))]
            m, sd = [a for a, _ in stats], [b for _, b in stats]
            ax.plot(x, m, label=name)
            ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
    axes[0].set(xlabel="step", ylabel="validation exact match (mean over tasks)", xlim=(0, steps))
    axes[1].set(xlabel="step", ylabel="validation loss per response token", xlim=(0, steps), yscale="log")
    axes[0].legend()
    fig.suptitle(f"student vs multitask, mean ± std over {len(curve_cells)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.relpath(path, REPO)


if __name__ == "__main__":
    main()
