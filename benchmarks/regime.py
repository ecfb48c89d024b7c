"""Regime map: distilled student, DUME MoE and multitask vs model capacity, number of tasks and budget, on TEST.

    nice -n 5 python benchmarks/regime.py                        # tiny model, widths 16 32 64 x tasks 2 4 6 x budgets 0.125 0.5 x 3 seeds
    python benchmarks/regime.py --widths 64 --seeds 0 --budgets 0.125     # a slice; the map fills over sittings
    python benchmarks/regime.py --model smollm2 --only smollm2 --seeds 2 1 0    # one model; another process may run the other
    nice -n 10 python benchmarks/regime.py --model smollm2       # SmolLM2 whole and cut to --keep-layers, 4 tasks, budgets 1/8 1/2
    nice -n 10 python benchmarks/regime.py --model smollm2 --only smollm2-L15 --budgets 0.125 --seeds 1 2   # a slice
    python benchmarks/regime.py --tiny                            # smoke setting, temp folder
    python benchmarks/regime.py --report-only --pipeline-report runs/.../eval/report.json   # rewrite JSON, table, PNG

One cell = (model, number of tasks n, budget b, seed), run IN THIS PROCESS (no Ray: the CLI pipeline costs minutes of
Ray start-up per stage) from the library's own pieces, with the settings of `--config` (configs/demo.yaml, whose
distillation T/alpha and DUME routing were chosen on validation: benchmarks/results/select_defaults_*.json):

1. base: the config's model (the tiny Llama at width w: hidden w, MLP 4w, 2 layers, 4 heads) trained with
   `ce_step` for `base.optim.steps` on ALL the config's tasks, once per (model, seed); every cell of that (model,
   seed) starts from it (a shared pretrained start, as SmolLM2 is; its cost is in no column). SmolLM2 has no base
   training (the pretrained model is the base).
2. experts: one per task, from the base, `ce_step` for b x `experts.optim.steps` (`search.proxy.train_expert`);
   their top-k soft targets on their task's training rows (`teacher_scoring.score_rows`). Both are cached on disk
   per (model, seed, steps, task) (`search.proxy.cached_expert`), so the cells with 2, 4 and all tasks share them.
3. per n (the first n tasks of TASK_ORDER): student = `kd_step` (alpha, T from the config) for S = b x
   `distill.optim.steps` on the n tasks' soft-target rows (`search.proxy.proxy_distill`); multitask at the student's
   budget = the same loop with alpha 0 for S steps; multitask at the whole budget = alpha 0 for S + n x E steps (the
   student's steps plus every expert's: the teachers' cost counted); DUME top-1 and top-2 = `upcycle.moe.build_moe`
   of the n experts, router solved from the statistics of each expert's training rows (`upcycle.router`), the
   config's routing.
4. each model's exact match on the TEST split (`training.evaluate_tasks`), mean over the n tasks; the experts' mean
   is each expert on its own task.

Each cell is written to the JSON as soon as it is measured (under a file lock, merged with what is there, so two
processes may fill disjoint slices); a rerun skips measured cells. Per (model, n, b): mean over seeds of every
model, and student − multitask for both compute columns as mean ± 95% t-interval half-width over seeds. Writes
benchmarks/results/regime.json and regime.png (a heatmap of both differences; only when matplotlib imports).
SmolLM2 (`--model smollm2`, configs/smollm2.yaml, no base training) has its own budgets and fewer rows
(SMOLLM2_BUDGETS, SMOLLM2_OVERRIDES, training rows per task = one pass of each expert: `smollm2_rows`; the reason is
in the JSON's `smollm2.choice`), the cut model run first. The JSON's `not_measured` lists every planned (model, tasks,
budget) with fewer than PLANNED_SEEDS measured (seeds measured/planned, the missing ones); its table rows say how
many seeds each mean is over.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, mean_std, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
TASK_ORDER = ["reverse", "add", "sort", "sub", "shift", "copy"]  # tasks 2 = reverse+add, 4 adds sort+sub, 6 = all
SMOLLM2_TASKS = ["reverse_words", "sort_words", "upper_words", "rotate_words"]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # two-sided 95%
TINY_OVERRIDES = ["tasks.num_train=32", "tasks.num_test=8", "tasks.num_validation=4", "base.optim.steps=2",
                  "experts.optim.steps=4", "distill.optim.steps=4", "eval.max_new_tokens=4",
                  "upcycle.stats_examples_per_task=8"]
WIDTHS, BUDGETS = [16, 32, 64], [0.125, 0.5]  # the map: 1/8 and 1/2 of demo.yaml's expert (800) and student (600) steps
# SmolLM2 (configs/smollm2.yaml: experts 40 steps, student 120, batch 8): two budgets and fewer rows, so that the
# whole model and its cut x 4 tasks x 3 seeds fit a shared 2-core machine. Training rows per task follow the budget
# (smollm2_overrides): each expert reads its rows once, as at 1/8.
SMOLLM2_BUDGETS = [0.125, 0.5]
SMOLLM2_OVERRIDES = ["tasks.num_test=20", "tasks.num_validation=4", "upcycle.stats_examples_per_task=16"]
PLANNED_SEEDS = [0, 1, 2]  # every cell of the map is planned with these seeds
SMOLLM2_CHOICE = (
    "budgets 1/8 and 1/2 of configs/smollm2.yaml's steps (1/8: experts 5 each, student and multitask 15, multitask "
    "at the whole budget 15 + 4 x 5 = 35; 1/2: experts 20, student and multitask 60, whole budget 60 + 4 x 20 = 140; "
    "batch 8) for both SmolLM2 models: a step costs ~1.5 s on 2 idle cores and this map runs at nice 10-19 on a "
    "2-core machine shared by 6 processes. Training rows per task = expert steps x batch (40 at 1/8, 160 at 1/2): "
    "each expert reads its task's rows exactly once, the student and multitask at the student's budget read 0.75 of "
    "an epoch of the 4 tasks' rows and multitask at the whole budget 1.75 epochs, the same at both budgets (with 40 "
    "rows at 1/2 the whole-budget multitask would loop 7 epochs and the experts 4, a memorisation regime rather than "
    "a larger budget). 20 test rows per task (80 per cell: one row = 1.25 points) keep generation inside the budget; "
    "max_new_tokens stays 12 (the upper-cased answers need it)")
REPRODUCE = ("tiny-h64", 6, 0.125, 0)  # the cell compared with the CLI pipeline run alike (--pipeline-report)
COLUMNS = ["experts", "student", "multitask_student_budget", "multitask_whole_budget", "dume_top1", "dume_top2"]


def smollm2_rows(cfg, budget: float) -> int:
    """Training rows per task of SmolLM2 at `budget`: one pass of each expert (its steps x batch)."""
    return with_steps(cfg.experts.optim, budget).steps * cfg.experts.optim.batch_size


def model_variants(args) -> list[tuple[str, list[str]]]:
    """[(label, config overrides)] of the models on the capacity axis."""
    if args.model == "smollm2":
        return [("smollm2", []), (f"smollm2-L{args.keep_layers}", [f"model.keep_layers={args.keep_layers}"])]
    return [(f"tiny-h{w}", [f"model.hidden_size={w}", f"model.intermediate_size={4 * w}"]) for w in args.widths]


def cell_key(model: str, n: int, budget: float, seed: int) -> str:
    return f"{model}|n{n}|b{budget:g}|s{seed}"


# ---------------------------------------------------------------------------------------------------------
# One (model, seed, budget): base and experts (cached on disk), then the cells of each task count.
# ---------------------------------------------------------------------------------------------------------

def with_steps(optim, factor: float):
    """`optim` with `steps` scaled by `factor` (at least 1 step; warm-up cut to fit)."""
    import dataclasses
    steps = max(1, round(optim.steps * factor))
    return dataclasses.replace(optim, steps=steps, warmup_steps=min(optim.warmup_steps, max(0, steps - 1)))


def train_base(cfg, cache: str, label: str) -> str:
    """The base of (model, seed): the pretrained model as it is, or the tiny model after `base.optim` on every task."""
    from dume_ray.model import create_initial_model, load_model, load_tokenizer
    from dume_ray.search.proxy import cached_expert, train_expert
    from dume_ray.tasks import encode_rows, load_tasks

    def build(out: str) -> None:
        init = create_initial_model(cfg.model, cfg.seed, f"{out}/init", cfg.data)
        if cfg.model.pretrained or not cfg.base.enabled:
            for name in os.listdir(init):
                os.replace(f"{init}/{name}", f"{out}/{name}")
            return
        tokenizer = load_tokenizer(init)
        tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
        rows = encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len, {n: "base" for n in tasks})
        train_expert(load_model(init), tokenizer, rows, cfg.base.optim, cfg.seed, out, cfg.model.dtype)

    base_dir, hit = cached_expert(cache, f"base-{label}-s{cfg.seed}-{cfg.base.optim.steps}", build)
    print(f"[regime] base {label} seed {cfg.seed}: {'cached' if hit else 'trained'}", flush=True)
    return base_dir


def train_experts(cfg, base_dir: str, cache: str, label: str, tasks: dict, optim) -> dict[str, str]:
    """{task: cache entry holding its expert (a HF folder) and the expert's soft targets on the task's rows}."""
    from dume_ray.model import expert_trainable, load_model, load_tokenizer, make_trainable
    from dume_ray.search.proxy import SOFT_TARGETS, cached_expert, score_soft_targets, train_expert
    from dume_ray.tasks import encode_rows
    tokenizer, experts = load_tokenizer(base_dir), {}
    for name in tasks:
        rows = encode_rows({name: tasks[name]}, tokenizer, "train", cfg.model.max_seq_len, {name: name})

        def build(out: str) -> None:
            model = make_trainable(load_model(base_dir), **expert_trainable(cfg.experts))
            train_expert(model, tokenizer, rows, optim, cfg.seed, out, cfg.model.dtype)
            score_soft_targets(out, rows, cfg.soft_targets.top_k, f"{out}/{SOFT_TARGETS}", cfg.soft_targets.batch_size)

        experts[name], hit = cached_expert(cache, f"expert-{label}-s{cfg.seed}-{optim.steps}-r{cfg.tasks.num_train}-{name}", build)
        print(f"[regime]   expert {name} ({optim.steps} steps): {'cached' if hit else 'trained'}", flush=True)
    return experts


def distill(cfg, base_dir: str, rows: list[dict], optim, alpha: float):
    """`proxy_distill` from the base: the student (alpha from the config) or multitask (alpha 0), for optim.steps."""
    import torch
    from dume_ray.model import load_model, load_tokenizer
    from dume_ray.search.proxy import proxy_distill
    from dume_ray.training import make_optimizer
    d = cfg.distill
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(base_dir), load_tokenizer(base_dir)
    optimizer, scheduler = make_optimizer(model, optim)
    proxy_distill(model, tokenizer, rows, optim, optimizer, scheduler, cfg.soft_targets.top_k, alpha, d.temperature,
                  d.divergence, d.jsd_beta, d.anneal, cfg.seed, start_step=0, report_every=optim.steps,
                  on_report=lambda step, metrics: None)
    return model


def dume(cfg, expert_dirs: dict[str, str], tokenizer, tasks: dict, top_ks: list[int]) -> dict[int, object]:
    """{top_k: DUME MoE of the experts (in `tasks` order)}: the router solved once from each expert's training rows."""
    from dume_ray.model import load_model
    from dume_ray.upcycle.moe import build_moe
    from dume_ray.upcycle.router import solve_router, stats_from_groups, task_router_stats
    up = cfg.upcycle
    experts = {name: load_model(expert_dirs[name]) for name in tasks}
    moes = {k: build_moe(experts, top_k=k, routing=up.routing) for k in top_ks if k <= len(experts)}
    parts = []
    for i, name in enumerate(tasks):  # the upcycle stage's statistics, one task a group
        stats = task_router_stats(moes[top_ks[0]], tokenizer, tasks, [name], i, len(tasks), up.stats_examples_per_task,
                                  up.batch_size, cfg.model.max_seq_len)
        parts.append((stats.gram, stats.cross[..., i], stats.tokens[i]))
    router = solve_router(stats_from_groups(parts), up.ridge_lambda, normalize_columns=up.normalize_columns)
    for moe in moes.values():
        moe.set_router(router)
    return moes


def run_group(cfg, label: str, budget: float, counts: list[int], task_order: list[str], cache: str, record) -> None:
    """Base and experts of (model, seed, budget), then one cell per task count in `counts`, each `record`ed."""
    import pyarrow.parquet as pq
    from dume_ray.model import load_model, load_tokenizer
    from dume_ray.search.proxy import SOFT_TARGETS
    from dume_ray.tasks import load_tasks
    from dume_ray.training import evaluate_tasks
    start = time.time()
    base_dir = train_base(cfg, cache, label)
    tokenizer = load_tokenizer(base_dir)
    all_tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    expert_optim, student_optim = with_steps(cfg.experts.optim, budget), with_steps(cfg.distill.optim, budget)
    ev = cfg.eval

    def score(model, tasks: dict) -> dict[str, float]:
        return evaluate_tasks(model, tokenizer, tasks, "test", ev.max_new_tokens, ev.batch_size)

    expert_scores: dict[str, float] = {}
    for n in counts:  # experts are trained as the task count grows (cached: the cells of 2, 4, 6 tasks share them)
        tasks = {name: all_tasks[name] for name in task_order[:n]}
        expert_dirs = train_experts(cfg, base_dir, cache, label, tasks, expert_optim)
        for name in tasks.keys() - expert_scores.keys():
            expert_scores.update(score(load_model(expert_dirs[name]), {name: tasks[name]}))
        rows = [row for name in tasks for row in pq.read_table(f"{expert_dirs[name]}/{SOFT_TARGETS}").to_pylist()]
        whole_optim = with_steps(student_optim, 1.0 + n * expert_optim.steps / student_optim.steps)
        per_task = {"experts": {name: expert_scores[name] for name in tasks},
                    "student": score(distill(cfg, base_dir, rows, student_optim, cfg.distill.alpha), tasks),
                    "multitask_student_budget": score(distill(cfg, base_dir, rows, student_optim, 0.0), tasks),
                    "multitask_whole_budget": score(distill(cfg, base_dir, rows, whole_optim, 0.0), tasks)}
        for k, moe in dume(cfg, expert_dirs, tokenizer, tasks, [1, 2]).items():
            per_task[f"dume_top{k}"] = score(moe, tasks)
        cell = {"model": label, "tasks": n, "task_names": list(tasks), "budget": budget, "seed": cfg.seed,
                "train_rows_per_task": cfg.tasks.num_train, "steps": {"base": 0 if cfg.model.pretrained else cfg.base.optim.steps, "expert_each": expert_optim.steps,
                          "student": student_optim.steps, "multitask_student_budget": student_optim.steps,
                          "multitask_whole_budget": whole_optim.steps},
                "test": {col: statistics.fmean(v.values()) for col, v in per_task.items()}, "per_task": per_task,
                "seconds": round(time.time() - start, 1)}  # since the previous cell (the first: base and experts too)
        print(f"[regime] {cell_key(label, n, budget, cfg.seed)}: " + ", ".join(f"{c} {v:.3f}" for c, v in cell["test"].items())
              + f" ({cell['seconds']:.0f} s)", flush=True)
        record(cell)
        start = time.time()


# ---------------------------------------------------------------------------------------------------------
# Summary: per (model, n, budget) over seeds; the goal check; the heatmap.
# ---------------------------------------------------------------------------------------------------------

def interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width (nan below 2 values)."""
    m, s = mean_std(values)
    return m, (T_975[len(values) - 1] * s / len(values) ** 0.5 if len(values) > 1 else float("nan"))


def fmt_ci(values: list[float], scale: float = 100.0) -> str:
    if len(values) < 2:
        return f"{values[0] * scale:+.1f} (1 seed)" if values else "–"
    m, h = interval(values)
    return f"{m * scale:+.1f} ± {h * scale:.1f}"


def summarise(cells: dict, variants: list[tuple[str, list[int], list[float]]], seeds: list[int]) -> dict:
    """Per (model, task count, budget): means over seeds, both differences with their intervals; the table.
    `variants`: [(model, its task counts, its budgets)]."""
    rows, groups = [], []
    for model, counts, budgets in variants:
        for budget in budgets:
            for n in counts:
                measured = [cells[k] for s in seeds if (k := cell_key(model, n, budget, s)) in cells]
                if not measured:
                    groups.append({"model": model, "tasks": n, "budget": budget, "seeds": 0, "measured": False})
                    rows.append([model, n, f"{budget:g}", "–", 0, "not measured", *["–"] * (len(COLUMNS) + 1)])
                    continue
                test = {col: [c["test"][col] for c in measured if col in c["test"]] for col in COLUMNS}
                diffs = {f"student_minus_{col}": [c["test"]["student"] - c["test"][col] for c in measured]
                         for col in ("multitask_student_budget", "multitask_whole_budget")}
                group = {"model": model, "tasks": n, "budget": budget, "seeds": len(measured), "measured": True,
                         "steps": measured[0]["steps"], "mean": {col: mean_std(v)[0] for col, v in test.items() if v}}
                for name, values in diffs.items():
                    m, h = interval(values)
                    group[name] = {"mean": m, "ci95_half_width": h, "values": values,
                                   "clear_of_zero": bool(len(values) > 1 and abs(m) > h)}
                groups.append(group)
                rows.append([model, n, f"{budget:g}", f"{measured[0]['steps']['expert_each']}/{measured[0]['steps']['student']}"
                             f"/{measured[0]['steps']['multitask_whole_budget']}", len(measured),
                             *[f"{100 * group['mean'][c]:.1f}" if c in group["mean"] else "–" for c in COLUMNS],
                             fmt_ci(diffs["student_minus_multitask_student_budget"]),
                             fmt_ci(diffs["student_minus_multitask_whole_budget"])])
    header = ["model", "tasks", "budget", "steps expert/student/mt-whole", "seeds", "experts", "student", "mt (student budget)",
              "mt (whole budget)", "DUME top-1", "DUME top-2", "student − mt (student budget)", "student − mt (whole budget)"]
    table = markdown_table(header, rows) + ("\n\nexact match on test, %, mean over seeds; differences in points, "
                                            "mean ± 95% t-interval half-width over seeds")
    return {"table": table, "groups": groups, "goal": goal(groups)}


def not_measured(cells: dict, plan: list[tuple[str, list[int], list[float]]], planned_seeds: list[int]) -> list[dict]:
    """Every planned (model, task count, budget) with fewer than the planned seeds measured, and which seeds lack.
    `plan`: [(model, its task counts, its budgets)], as `summarise` takes it."""
    missing = []
    for model, counts, budgets in plan:
        for budget in budgets:
            for n in counts:
                lacking = [s for s in planned_seeds if cell_key(model, n, budget, s) not in cells]
                if lacking:
                    missing.append({"model": model, "tasks": n, "budget": budget,
                                    "seeds_measured": len(planned_seeds) - len(lacking),
                                    "seeds_planned": len(planned_seeds), "missing_seeds": lacking})
    return missing


def goal(groups: list[dict]) -> dict:
    """Issue 14's goal: a regime (3+ seeds) where the student beats multitask at the whole budget by >= 5 points
    with the 95% interval clear of zero; else how the difference moves along each axis."""
    measured = [g for g in groups if g["measured"] and g["seeds"] >= 3]
    wins = [g for g in measured if g["student_minus_multitask_whole_budget"]["mean"] >= 0.05
            and g["student_minus_multitask_whole_budget"]["mean"] - g["student_minus_multitask_whole_budget"]["ci95_half_width"] > 0]
    best = max(measured, key=lambda g: g["student_minus_multitask_whole_budget"]["mean"], default=None)
    trend = {}
    for axis in ("model", "tasks", "budget"):
        by: dict = {}
        for g in measured:
            by.setdefault(g[axis], []).append(g["student_minus_multitask_whole_budget"]["mean"])
        trend[axis] = {str(k): statistics.fmean(v) for k, v in by.items()}
    return {"found": [{k: g[k] for k in ("model", "tasks", "budget")} for g in wins],
            "best_whole_budget": best and {k: best[k] for k in ("model", "tasks", "budget", "student_minus_multitask_whole_budget")},
            "mean_student_minus_multitask_whole_budget_by_axis": trend,
            "cells_with_3_seeds": len(measured)}


def reproduction(cells: dict, previous: dict | None, report_path: str | None) -> dict | None:
    """The in-process cell REPRODUCE beside the CLI pipeline (on Ray) run with the same settings and seed
    (`python -m dume_ray run --config configs/demo.yaml seed=0 experts.optim.steps=100 distill.optim.steps=75
    upcycle.score_all_routings=false`): its eval/report.json given with --pipeline-report, or kept from the JSON."""
    if report_path:
        with open(report_path) as f:
            report = json.load(f)
        means = report["means"]
        pipeline = {"source": report_path, "split": report["split"], "settings": report["settings"],
                    "test": {"experts": means["experts"], "student": means["student"],
                             "multitask_student_budget": means["multitask"], "dume_top1": means.get("dume")},
                    "per_task": {k: report["scores"][k] for k in ("experts", "student", "multitask", "dume") if k in report["scores"]}}
    elif previous and previous.get("pipeline"):
        pipeline = previous["pipeline"]
    else:
        return None
    cell = cells.get(cell_key(*REPRODUCE))
    return {"cell": cell_key(*REPRODUCE), "pipeline": pipeline,
            "in_process": {col: cell["test"][col] for col in pipeline["test"]} if cell else None,
            "note": "same config, steps and seed; the pipeline streams batches through Ray Data (another data order, "
                    "another base), so only agreement within the map's spread over seeds is expected"}


def png_relative(path: str | None) -> str | None:
    """The PNG's path as the JSON records it: relative to the repository when inside it (the JSON is committed)."""
    if path is None or not os.path.abspath(path).startswith(REPO + os.sep):
        return path
    return os.path.relpath(os.path.abspath(path), REPO)


def heatmap(groups: list[dict], path: str) -> str | None:
    """Two panels (student − multitask at the student's / the whole budget), rows = model, columns = (budget, tasks)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[regime] matplotlib not importable: no PNG", flush=True)
        return None
    models = list(dict.fromkeys(g["model"] for g in groups))
    cols = list(dict.fromkeys((g["budget"], g["tasks"]) for g in groups))
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.25 * len(cols) * 2, 1.2 + 0.7 * len(models)), squeeze=False)
    for ax, (name, title) in zip(axes[0], (("student_minus_multitask_student_budget", "student − multitask, student's budget"),
                                           ("student_minus_multitask_whole_budget", "student − multitask, whole budget"))):
        grid = [[float("nan")] * len(cols) for _ in models]
        for g in groups:
            i, j = models.index(g["model"]), cols.index((g["budget"], g["tasks"]))
            if not g["measured"]:
                ax.text(j, i, "not\nmeasured", ha="center", va="center", fontsize=6, color="grey")
                continue
            grid[i][j] = 100 * g[name]["mean"]
            spread = f"±{100 * g[name]['ci95_half_width']:.1f}" if g["seeds"] > 1 else "no interval"
            ax.text(j, i, f"{100 * g[name]['mean']:+.1f}\n{spread}\nn={g['seeds']}", ha="center", va="center", fontsize=7)
        ax.imshow(grid, cmap="RdBu", vmin=-60, vmax=60, aspect="auto")
        ax.set_xticks(range(len(cols)), [f"b{b:g}\n{n} tasks" for b, n in cols], fontsize=7)
        ax.set_yticks(range(len(models)), models, fontsize=8)
        ax.set_title(f"{title} (points)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock beside `path`: processes filling disjoint slices of the map write the JSON in turn."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_cells(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {cell_key(c["model"], c["tasks"], c["budget"], c["seed"]): c for c in json.load(f).get("cells", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="default configs/demo.yaml (configs/smollm2.yaml with --model smollm2)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS, help="tiny model hidden sizes")
    parser.add_argument("--keep-layers", type=int, default=15, help="SmolLM2's truncated variant (of 30 layers)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these models (e.g. smollm2-L15): two "
                        "processes may fill disjoint slices of the map")
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts (default 2 4 6; SmolLM2: 4)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="factors on the config's expert and student steps (default 0.125 0.5; SmolLM2: 0.125)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value config overrides")
    parser.add_argument("--cache", default=os.path.join(REPO, "runs", "regime-cache"), help="bases and experts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--pipeline-report", default=None, help="eval/report.json of the pipeline run of REPRODUCE")
    parser.add_argument("--report-only", action="store_true", help="rewrite the JSON, table and PNG from the cached cells")
    args = parser.parse_args()
    started = time.time()
    from dume_ray.config import ConfigError, load_config
    import torch
    torch.set_num_threads(args.threads)
    smol = args.model == "smollm2"
    config = args.config or ("configs/smollm2.yaml" if smol else "configs/demo.yaml")
    task_order = SMOLLM2_TASKS if smol else TASK_ORDER
    counts = args.tasks or ([4] if smol else [2, 4, len(TASK_ORDER)])
    args.budgets = args.budgets or (SMOLLM2_BUDGETS if smol else BUDGETS)
    if args.tiny:
        args.widths, args.seeds, args.budgets, counts = [16], [0], [1.0], [2]
        args.keep_layers = 2
    variants = model_variants(args)[-1:] if args.tiny and smol else model_variants(args)  # tiny SmolLM2: the cut one
    labels, variants = [v[0] for v in variants], [v for v in variants if not args.only or v[0] in args.only]
    overrides = [*(TINY_OVERRIDES if args.tiny else SMOLLM2_OVERRIDES if smol else [])]
    try:  # every setting checked before any work
        if any(not 2 <= n <= len(task_order) for n in counts):
            raise ConfigError(f"--tasks: each count must be in [2, {len(task_order)}], got {counts}")
        if args.only and set(args.only) - set(labels):
            raise ConfigError(f"--only: unknown model(s) {sorted(set(args.only) - set(labels))}, choose from {labels}")
        if any(b <= 0 for b in args.budgets):
            raise ConfigError(f"--budgets: each factor must be > 0, got {args.budgets}")
        cfgs = {}
        for label, extra in variants:
            for s in args.seeds:
                common = [*extra, f"seed={s}", f"tasks.builtin=[{','.join(task_order)}]", *args.set]
                for b in args.budgets:  # SmolLM2's training rows follow the budget (a --set tasks.num_train wins)
                    rows = [f"tasks.num_train={smollm2_rows(load_config(config, [*overrides, *common]), b)}"] if smol and not args.tiny else []
                    cfgs[(label, s, b)] = load_config(config, [*overrides, *rows, *common])
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    out = result_path("regime", args.out, args.tiny)
    cache = os.path.join(os.path.dirname(out), "cache") if args.tiny else args.cache
    png = os.path.splitext(out)[0] + ".png"
    planned_seeds = args.seeds if args.tiny else PLANNED_SEEDS
    smol_labels = [label for label, _ in model_variants(argparse.Namespace(**{**vars(args), "model": "smollm2"}))]

    def map_labels(cells: dict) -> list[str]:
        """The whole map whichever slice this process runs: every width measured or planned, then SmolLM2."""
        if args.tiny:
            return [label for label, _ in variants]
        widths = set(WIDTHS) | set(args.widths) | {int(c["model"][6:]) for c in cells.values() if c["model"].startswith("tiny-h")}
        return [f"tiny-h{w}" for w in sorted(widths)] + smol_labels

    def save(cells: dict) -> dict:
        previous = {}
        if os.path.exists(out):
            with open(out) as f:
                previous = json.load(f)
        seeds = sorted({c["seed"] for c in cells.values()} | set(args.seeds))

        def row_axes(m: str) -> tuple[list[int], list[float]]:
            """The map's task counts and budgets of model m (other budgets' cells stay in "cells" only)."""
            if args.tiny:
                return counts, args.budgets
            family = m.startswith("smollm2")
            return ([4], SMOLLM2_BUDGETS) if family else ([2, 4, len(TASK_ORDER)], BUDGETS)

        plan = [(m, *row_axes(m)) for m in map_labels(cells)]
        summary = summarise(cells, plan, seeds)
        first = cfgs[next(iter(cfgs))]
        mine = {"config": config, "settings": {"temperature": first.distill.temperature, "alpha": first.distill.alpha,
                                               "routing": first.upcycle.routing}}
        tiny_rows = previous if smol and "config" in previous else mine  # each family's config from its own runs
        smol_rows = mine if smol else {k: v for k, v in previous.get("smollm2", {}).items() if k in mine}
        payload = {"config": tiny_rows["config"], "settings": tiny_rows["settings"],
                   "task_order": {"tiny": TASK_ORDER, "smollm2": SMOLLM2_TASKS}, "split": "test",
                   "budgets_meaning": "factor on the config's experts.optim.steps and distill.optim.steps",
                   "smollm2": {**smol_rows, "budgets": SMOLLM2_BUDGETS, "overrides": [*SMOLLM2_OVERRIDES, "tasks.num_train=<expert steps x batch>"],
                               "keep_layers": args.keep_layers, "choice": SMOLLM2_CHOICE},
                   **summary, "reproduction": reproduction(cells, previous.get("reproduction"), args.pipeline_report),
                   "planned_seeds": planned_seeds,
                   "not_measured": not_measured(cells, plan, planned_seeds), "png": png_relative(heatmap(summary["groups"], png)),
                   "cells": [cells[k] for k in sorted(cells)]}
        write_result(out, "regime", command_line(), started, payload, payload["table"])
        return payload

    def record(cell: dict) -> None:
        with locked(out):
            cells = read_cells(out)
            cells[cell_key(cell["model"], cell["tasks"], cell["budget"], cell["seed"])] = cell
            save(cells)

    for budget in [] if args.report_only else args.budgets:  # the smaller budget first everywhere: an interrupted map still has whole rows
        for label, _ in variants[::-1] if smol else variants:  # SmolLM2: the cut model (half the cost) first
            for seed in args.seeds:
                done = read_cells(out)
                todo = [n for n in counts if cell_key(label, n, budget, seed) not in done]
                if todo:
                    run_group(cfgs[(label, seed, budget)], label, budget, todo, task_order, cache, record)
    with locked(out):
        payload = save(read_cells(out))
    print(payload["table"], flush=True)
    for g in payload["not_measured"]:
        print(f"not measured: {g['model']} {g['tasks']} tasks budget {g['budget']:g}: {g['seeds_measured']}/"
              f"{g['seeds_planned']} seeds (missing {' '.join(map(str, g['missing_seeds']))})", flush=True)


if __name__ == "__main__":
    main()
