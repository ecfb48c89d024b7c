"""Quality benchmark: test exact-match of every model over several seeds, and the matched-compute check.

    python benchmarks/quality.py                                  # demo.yaml + dume.yaml, seeds 0 1 2
    python benchmarks/quality.py --seeds 0 1 2 --dume-seeds 0 --matched-seeds 0
    python benchmarks/quality.py --tiny                           # smoke setting, writes to a temp folder
    python benchmarks/quality.py --config configs/smollm2.yaml --extra --dume-config '' --matched-seeds \
        --runs-dir runs/bench-smollm2 --out benchmarks/results/quality_smollm2.json      # SmolLM2, its own DUME rows

For each seed S it runs the real pipeline, `python -m dume_ray run --config C seed=S name=bench-quality-sS
runs_dir=R` (the CLI skips stages already done, so an interrupted benchmark resumes), and reads the run's
`eval/report.json`. Seeds change model init and data order; the task data (tasks.seed) is the same.
- `--config` (default configs/demo.yaml, all-weights experts): multitask baseline, distilled student,
  experts, base. Its DUME MoE is ~0 (trunks drift apart, see README "DUME upcycling"), so by default the
  upcycle stage is switched off here and the DUME rows come from
- `--dume-config` (default configs/dume.yaml, MLP-only experts): DUME MoE, weight average, oracle, and that
  config's own student/multitask/experts, each row labelled with its config.
- Matched compute (`--matched-seeds`): the multitask baseline retrained with `distill.optim.steps` = student
  steps + the sum of every expert's steps (same batch size and model, so equal training FLOPs up to the
  teachers' scoring pass), on the same base and soft-target stream (the seed's run folders are linked),
  then scored in-process on the same split.
- Searched grouping: `--searched-groups` takes a grouping (e.g. from the search stage) as a YAML list and
  adds a student row trained with it; without it the row says "not available".

Writes benchmarks/results/quality.json (or --out) and prints the table (mean ± sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, cli, command_line, fmt_pm, markdown_table, mean_std, result_path, write_result  # noqa: E402

TINY_OVERRIDES = ["tasks.builtin=[copy,reverse]", "tasks.num_train=32", "tasks.num_test=8", "tasks.num_validation=4",
                  "base.optim.steps=2", "experts.optim.steps=2", "distill.optim.steps=2", "eval.max_new_tokens=4",
                  "upcycle.stats_examples_per_task=8"]


def run_cli(stage: str, config: str, overrides: list[str], log_path: str) -> None:
    """`python -m dume_ray <stage>` in this process, on one Ray kept up between calls (`common.cli`), output to a
    log; raises on failure."""
    cli([stage, "--config", config, *overrides], log_path, "quality")


def _done(stage_dir: str, config: str, overrides: list[str], stage: str) -> bool:
    """The stage already finished for exactly this config (its manifest hash matches; no Ray needed), so
    rerunning the benchmark does not pay for starting Ray just to skip every stage."""
    sys.path.insert(0, REPO)
    from dume_ray import manifest
    from dume_ray.config import load_config
    from dume_ray.stage_hashes import pipeline_hashes
    return manifest.is_done(stage_dir, pipeline_hashes(load_config(os.path.join(REPO, config), overrides))[stage])


def run_seed(config: str, seed: int, name: str, runs_dir: str, extra: list[str]) -> dict:
    """The whole pipeline for one seed; returns its eval report."""
    overrides = [f"seed={seed}", f"name={name}", f"runs_dir={runs_dir}", *extra]
    os.makedirs(runs_dir, exist_ok=True)
    if _done(os.path.join(runs_dir, name, "eval"), config, overrides, "eval"):
        print(f"[quality] {name}: finished already, reusing its report", flush=True)
    else:
        run_cli("run", config, overrides, os.path.join(runs_dir, f"{name}.log"))
    with open(os.path.join(runs_dir, name, "eval", "report.json")) as f:
        return json.load(f)


def run_matched(config: str, seed: int, source: str, runs_dir: str, extra: list[str]) -> dict:
    """Multitask baseline with student + all experts' steps, on the seed's own base/experts/soft targets."""
    sys.path.insert(0, REPO)
    from dume_ray.config import load_config
    cfg = load_config(os.path.join(REPO, config), [f"seed={seed}", *extra])
    steps = cfg.distill.optim.steps + cfg.experts.optim.steps * len(cfg.groups)
    name = f"{source}-matched"
    run_dir = os.path.join(runs_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    for stage in ("base", "experts"):  # reuse the seed's upstream stages (same hashes)
        link = os.path.join(run_dir, stage)
        if not os.path.islink(link):
            os.symlink(os.path.abspath(os.path.join(runs_dir, source, stage)), link)
    overrides = [f"seed={seed}", f"name={name}", f"runs_dir={runs_dir}", *extra, f"distill.optim.steps={steps}"]
    if not _done(os.path.join(run_dir, "multitask"), config, overrides, "multitask"):
        # its own soft-targets stage: the baseline's longer run reads more rows than the student's soft targets
        # hold (soft_targets.rows=read), so the rows it reads are scored (skipped when every row already was)
        run_cli("soft-targets", config, overrides, os.path.join(runs_dir, f"{name}-soft-targets.log"))
        run_cli("multitask", config, overrides, os.path.join(runs_dir, f"{name}.log"))
    scores = score_in_process(os.path.join(run_dir, "multitask", "model"), cfg)
    return {"steps": steps, "student_steps": cfg.distill.optim.steps,
            "expert_steps_total": cfg.experts.optim.steps * len(cfg.groups), "scores": scores}


def _matched_done(config: str, seed: int, runs_dir: str, extra: list[str]) -> bool:
    sys.path.insert(0, REPO)
    from dume_ray.config import load_config
    cfg = load_config(os.path.join(REPO, config), [f"seed={seed}", *extra])
    steps = cfg.distill.optim.steps + cfg.experts.optim.steps * len(cfg.groups)
    name = f"bench-quality-s{seed}-matched"
    return _done(os.path.join(runs_dir, name, "multitask"), config,
                 [f"seed={seed}", f"name={name}", f"runs_dir={runs_dir}", *extra, f"distill.optim.steps={steps}"], "multitask")


def score_in_process(model_dir: str, cfg) -> dict[str, float]:
    """Exact match on cfg.eval.split with the same pure function the eval stage uses."""
    import torch
    from dume_ray.model import load_model, load_tokenizer
    from dume_ray.tasks import load_tasks
    from dume_ray.training import evaluate_tasks
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(model_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    return evaluate_tasks(load_model(model_dir), tokenizer, tasks, cfg.eval.split, cfg.eval.max_new_tokens, cfg.eval.batch_size)


ROWS = [("multitask", "multitask baseline"), ("student", "distilled student"), ("experts", "experts (own group)"),
        ("dume", "DUME MoE (configured routing)"), ("oracle", "oracle routing"), ("weight_average", "weight average"),
        ("base", "base")]


def summarize(runs: dict[str, dict[int, dict]], matched: dict[int, dict], searched_note: str) -> tuple[str, dict]:
    """runs: {config label: {seed: report}} -> (markdown, summary dict)."""
    tasks = next(iter(next(iter(runs.values())).values()))["tasks"]
    header = ["model", "config", "seeds", "mean exact match", *tasks]
    rows, summary = [], {}
    for label, by_seed in runs.items():
        reports = list(by_seed.values())
        for key, title in ROWS:
            if not all(key in r["scores"] for r in reports):
                continue
            means = [r["means"][key] for r in reports]
            per_task = [[r["scores"][key].get(t) for r in reports] for t in tasks]
            rows.append([title, label, len(reports), fmt_pm(means), *(fmt_pm([v for v in vs if v is not None]) for vs in per_task)])
            summary[f"{label}:{key}"] = {"means": means, "per_task": dict(zip(tasks, per_task))}
        diffs = [r["means"]["student"] - r["means"]["multitask"] for r in reports if "student" in r["means"] and "multitask" in r["means"]]
        if diffs:
            per_task = [[r["scores"]["student"][t] - r["scores"]["multitask"][t] for r in reports] for t in tasks]
            rows.append(["**student − multitask**", label, len(diffs), fmt_pm(diffs), *(fmt_pm(v) for v in per_task)])
            summary[f"{label}:student_minus_multitask"] = {"per_seed": diffs, "mean_std": mean_std(diffs)}
    if matched:
        first_label = next(iter(runs))
        ms = list(matched.values())
        means = [sum(m["scores"].values()) / len(m["scores"]) for m in ms]
        steps = ms[0]["steps"]
        rows.append([f"multitask, matched compute ({steps} steps)", first_label, len(ms), fmt_pm(means),
                     *(fmt_pm([m["scores"][t] for m in ms]) for t in tasks)])
        student = [runs[first_label][s]["means"]["student"] - means[i] for i, s in enumerate(matched)]
        rows.append(["**student − matched multitask**", first_label, len(student), fmt_pm(student),
                     *(fmt_pm([runs[first_label][s]["scores"]["student"][t] - matched[s]["scores"][t] for s in matched]) for t in tasks)])
        summary["matched_compute"] = {"seeds": list(matched), "means": means, "student_minus_matched": student, "runs": matched}
    rows.append(["distilled student, searched grouping", "–", 0, searched_note, *(["–"] * len(tasks))])
    return markdown_table(header, rows), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--dume-config", default="configs/dume.yaml", help="'' to leave the DUME rows out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dume-overrides", nargs="*", default=None,
                        help="overrides of the DUME runs (default: experts.train_mlp_only=true upcycle.enabled=true)")
    parser.add_argument("--dume-seeds", type=int, nargs="*", default=None, help="default: --seeds")
    parser.add_argument("--matched-seeds", type=int, nargs="*", default=None, help="default: --seeds")
    parser.add_argument("--searched-groups", default=None, help="e.g. '[[copy,sort],[reverse],[shift],[add,sub]]'")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--only-finished", action="store_true",
                        help="tabulate the seeds (and matched runs) already finished; start no training")
    parser.add_argument("--tiny", action="store_true", help="smoke setting: tiny.yaml, 2 tasks, 2 steps, one seed")
    parser.add_argument("--out", default=None)
    parser.add_argument("--extra", nargs="*", default=["upcycle.enabled=false"],
                        help="overrides of --config's runs (default switches its upcycle off: the DUME rows come from "
                             "--dume-config); e.g. --extra with nothing keeps configs/smollm2.yaml's DUME MoE")
    args = parser.parse_args(argv)
    started = time.time()
    extra = list(args.extra)
    dume_extra = ["experts.train_mlp_only=true", "upcycle.enabled=true"] if args.dume_overrides is None else args.dume_overrides
    if args.tiny:
        args.config, args.dume_config, args.seeds = "configs/smoke/tiny.yaml", "", [0]
        extra, args.runs_dir = [*TINY_OVERRIDES, "upcycle.enabled=false"], os.path.join(os.path.dirname(result_path("quality", args.out, True)), "runs")
    dume_seeds = args.seeds if args.dume_seeds is None else args.dume_seeds
    matched_seeds = args.seeds if args.matched_seeds is None else args.matched_seeds
    runs_dir = os.path.abspath(args.runs_dir)
    label = os.path.basename(args.config)

    if args.only_finished:
        args.seeds = [s for s in args.seeds if _done(f"{runs_dir}/bench-quality-s{s}/eval", args.config, [f"seed={s}", f"name=bench-quality-s{s}", f"runs_dir={runs_dir}", *extra], "eval")]
        matched_seeds = [s for s in matched_seeds if s in args.seeds and _matched_done(args.config, s, runs_dir, extra)]
        dume_seeds = [s for s in dume_seeds if _done(f"{runs_dir}/bench-quality-dume-s{s}/eval", args.dume_config, [f"seed={s}", f"name=bench-quality-dume-s{s}", f"runs_dir={runs_dir}", *dume_extra], "eval")] if args.dume_config else []
        print(f"[quality] finished: seeds {args.seeds}, matched {matched_seeds}, dume {dume_seeds}", flush=True)
    runs = {label: {s: run_seed(args.config, s, f"bench-quality-s{s}", runs_dir, extra) for s in args.seeds}}
    matched = {s: run_matched(args.config, s, f"bench-quality-s{s}", runs_dir, extra) for s in matched_seeds if s in args.seeds}
    if args.searched_groups:
        runs[f"{label} + searched groups"] = {s: run_seed(args.config, s, f"bench-quality-searched-s{s}", runs_dir,
                                                          [*extra, f"experts.groups={args.searched_groups}"]) for s in args.seeds}
    if args.dume_config and dume_seeds:
        runs[os.path.basename(args.dume_config) + " (MLP-only experts)"] = {s: run_seed(args.dume_config, s, f"bench-quality-dume-s{s}", runs_dir, dume_extra)
                                                    for s in dume_seeds}
    note = "see the row above" if args.searched_groups else "not available (no search result given: --searched-groups)"
    table, summary = summarize(runs, matched, note)
    print("\n" + table, flush=True)
    write_result(result_path("quality", args.out, args.tiny), "quality", command_line(), started,
                 {"runs_dir": runs_dir, "summary": summary,
                  "reports": {lab: {str(s): r for s, r in by.items()} for lab, by in runs.items()}}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
