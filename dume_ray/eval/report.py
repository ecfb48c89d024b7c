"""The report: per-task held-out scores of every model, the student-vs-multitask verdict, a table and a chart.

`build_report(scores, groups, ...)` turns {model: {task: score}} into one dict (saved as report.json);
`render_markdown(report)` and `plot_report(report, path)` make report.md and the PNG. The expert column
scores each task with the expert of its own group, which is the bar the student is measured against.

Pure: no Ray here. Tested in tests/unit/test_report.py.
"""

from __future__ import annotations

import os

import math
from typing import Optional

MODEL_ORDER = ["base", "experts", "student", "multitask", "dume", "dume+", "oracle", "weight_average", "random"]
# What the DUME paper reports (Fanì & Ersoy 2026, arXiv 2603.29765), next to what we measure.
PAPER_CLAIM = "up to 97.6% of a dense expert in language modelling, 102.1% in reasoning"


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def build_report(scores: dict[str, dict[str, float]], task_names: list[str], split: str,
                 settings: Optional[dict] = None, timings: Optional[dict] = None, upcycle: Optional[dict] = None,
                 num_examples: Optional[dict[str, int]] = None, losses: Optional[dict[str, dict[str, float]]] = None) -> dict:
    """Args:
        scores: {"base"|"experts"|"student"|"multitask"|"dume"|"oracle"|...: {task: exact-match}}; "experts"
            holds, per task, the score of that task's own group expert.
        upcycle: the DUME section: {"variants": {label: {task: score}}, parameter counts, router settings}.
        num_examples: {task: examples scored}; gives the student − multitask difference its standard error.
        losses: {model: {task: mean cross-entropy per response token}}, the second metric (lower is better).
    """
    models = [m for m in MODEL_ORDER if m in scores] + sorted(m for m in scores if m not in MODEL_ORDER)
    means = {m: _mean(scores[m].get(t) for t in task_names) for m in models}
    report = {"split": split, "tasks": task_names, "models": models, "scores": scores, "means": means,
              "settings": settings or {}, "timings": timings or {}}
    if losses:
        report["losses"] = {m: losses[m] for m in models if losses.get(m)}
        report["loss_means"] = {m: _mean(v.get(t) for t in task_names) for m, v in report["losses"].items()}
    if "student" in means and "multitask" in means:
        report["student_minus_multitask"] = means["student"] - means["multitask"]
        if num_examples:
            report["student_minus_multitask_se"] = difference_standard_error(
                scores["student"], scores["multitask"], task_names, num_examples)
    if "student" in means and "experts" in means and means["experts"] > 0:
        report["student_pct_of_experts"] = 100.0 * means["student"] / means["experts"]
    if upcycle is not None:
        section = dict(upcycle)
        section["variant_means"] = {k: _mean(v.get(t) for t in task_names) for k, v in upcycle.get("variants", {}).items()}
        for ref in ("oracle", "experts"):
            if "dume" in means and means.get(ref, 0) > 0:
                section[f"dume_pct_of_{ref}"] = 100.0 * means["dume"] / means[ref]
        for rival in ("weight_average", "random"):
            if "dume" in means and rival in means:
                section[f"dume_beats_{rival}"] = means["dume"] > means[rival]
        section["paper_claim"] = PAPER_CLAIM
        report["upcycle"] = section
    return report


def provenance(manifests: dict[str, Optional[dict]], run_id: str) -> dict[str, dict]:
    """{stage folder: {"status", "run", "finished_at"[, "continues", "steps"]}} from each stage's manifest: "trained
    in this run" when the manifest was written by the run `run_id` (`manifest.RUN_ID`), else "reused" (a manifest
    from before run ids were recorded is an older run's too). A continued student names its parent's hash."""
    out = {}
    for stage, found in manifests.items():
        if not found:
            continue
        entry = {"status": "trained in this run" if found.get("run_id") == run_id else "reused",
                 "run": found.get("run_id"), "finished_at": found.get("finished_at")}
        if found.get("inputs", {}).get("continues"):
            entry["continues"] = found["inputs"]["continues"]
            entry["steps"] = found.get("metrics", {}).get("steps")
        out[stage] = entry
    return out


def difference_standard_error(a: dict[str, float], b: dict[str, float], task_names: list[str],
                              num_examples: dict[str, int]) -> float:
    """Standard error of mean(a) − mean(b), the means over tasks of exact-match rates, from test-set sampling
    alone (binomial per task, the two models' errors taken as independent). Seed-to-seed spread comes on top;
    `benchmarks/quality.py` measures it."""
    tasks = [t for t in task_names if t in a and t in b and num_examples.get(t)]
    if not tasks:
        return float("nan")
    variance = sum(p * (1 - p) / num_examples[t] for t in tasks for p in (a[t], b[t])) / len(tasks) ** 2
    return math.sqrt(variance)


def student_verdict(difference: float, standard_error: Optional[float]) -> str:
    """'beats' / 'does not beat' only when the difference is more than two standard errors from zero."""
    if standard_error is None or math.isnan(standard_error):
        return "beats" if difference > 0 else "does not beat"
    if difference > 2 * standard_error:
        return "beats"
    if difference < -2 * standard_error:
        return "does not beat"
    return "is within noise of"


def render_markdown(report: dict) -> str:
    models = report["models"]
    lines = [f"# dume_ray report ({report['split']} split, exact match)", "",
             "| task | " + " | ".join(models) + " | student − multitask |",
             "|---|" + "---|" * (len(models) + 1)]
    for task in report["tasks"] + ["**mean**"]:
        row = [report["means"][m] if task == "**mean**" else report["scores"][m].get(task) for m in models]
        diff = (row[models.index("student")] - row[models.index("multitask")]
                if "student" in models and "multitask" in models and None not in row else None)
        lines.append(f"| {task} | " + " | ".join(_fmt(v) for v in row) + f" | {_fmt(diff, signed=True)} |")
    lines.append("")
    if "student_minus_multitask" in report:
        se = report.get("student_minus_multitask_se")
        verdict = student_verdict(report["student_minus_multitask"], se)
        has_se = se is not None and not math.isnan(se)
        lines.append(f"- The distilled student **{verdict}** the multitask baseline: "
                     f"{100 * report['student_minus_multitask']:+.1f}" + (f" ± {100 * se:.1f}" if has_se else "")
                     + " points of mean exact match" + (
                         " (± one standard error of test-set sampling; a verdict either way needs more than two; "
                         "seed-to-seed spread comes on top, see benchmarks/quality.py)." if has_se else "."))
    if "student_pct_of_experts" in report:
        lines.append(f"- The student reaches {report['student_pct_of_experts']:.1f}% of its experts' mean.")
    if report.get("losses"):
        lines += _loss_markdown(report)
    if "upcycle" in report:
        lines += _upcycle_markdown(report)
    if report.get("provenance"):
        lines += _provenance_markdown(report["provenance"])
    if report["settings"]:
        lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in report["settings"].items()]
    if report.get("faults"):
        lines += ["", "## Faults survived", ""] + [f"- {k}: {v}" for k, v in report["faults"].items()]
    if report["timings"]:
        lines += ["", "## Stage wall times (s)", ""] + [f"- {k}: {v:.1f}" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"


def _provenance_markdown(stages: dict[str, dict]) -> list[str]:
    lines = ["", "## Reused or trained in this run", "", "| stage | status | run | finished |", "|---|---|---|---|"]
    for stage, p in stages.items():
        status = p["status"] + (f", continued from {p['continues']} for {p['steps']} steps" if p.get("continues") else "")
        lines.append(f"| {stage} | {status} | {p['run'] or '–'} | {p['finished_at'] or '–'} |")
    return lines


def _loss_markdown(report: dict) -> list[str]:
    """Response-token loss per task and model (lower is better); models without a causal score are left out."""
    models = list(report["losses"])
    lines = ["", f"## Response-token loss ({report['split']} split, mean cross-entropy per response token, lower is better)", "",
             "| task | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for task in report["tasks"] + ["**mean**"]:
        row = [report["loss_means"][m] if task == "**mean**" else report["losses"][m].get(task) for m in models]
        lines.append(f"| {task} | " + " | ".join(_fmt(v) for v in row) + " |")
    return lines


def _upcycle_markdown(report: dict) -> list[str]:
    """DUME: how much of oracle routing it keeps (vs the paper's claim), its rivals, variants and sizes."""
    up = report["upcycle"]
    lines = ["", "## DUME upcycling (training-free MoE of the experts)", ""]
    if "dume_pct_of_oracle" in up:
        lines.append(f"- DUME ({up['routing']} routing, {'unit-length' if up['normalize_columns'] else 'raw'} router "
                     f"columns, top-{up['top_k']}, λ={up['ridge_lambda']}) keeps **{up['dume_pct_of_oracle']:.1f}%** of "
                     f"oracle routing's mean" + (f" and {up['dume_pct_of_experts']:.1f}% of the dense experts'"
                                                 if "dume_pct_of_experts" in up else "")
                     + f". The paper claims {up['paper_claim']}.")
    for rival, name in (("weight_average", "weight averaging"), ("random", "random routing")):
        if f"dume_beats_{rival}" in up:
            lines.append(f"- DUME {'beats' if up[f'dume_beats_{rival}'] else '**does not beat**'} {name}.")
    mode = up.get("experts_mode") or ("MLP only" if up.get("experts_trained_mlp_only") else "all weights")
    lines.append(f"- Experts trained: {mode} (experts.train_mlp_only, experts.lora_rank); averaging the trunk is exact "
                 "only when the experts' non-MLP weights stay the base's (MLP only, or LoRA on the MLP).")
    if up.get("moe_parameters"):
        lines.append(f"- Parameters: MoE {up['moe_parameters']:,} in all, {up['moe_active_parameters_per_token']:,} active "
                     f"per token; student {_count(up.get('student_parameters'))}.")
    if up.get("variant_means"):
        lines += ["", "| DUME router | mean |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in up["variant_means"].items()]
    return lines


def _count(n) -> str:
    return f"{n:,}" if n else "–"


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def plot_report(report: dict, path: str) -> str:
    """Grouped bar chart: one group of bars per task (and the mean), one bar per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["tasks"] + ["mean"]
    models = report["models"]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    for i, model in enumerate(models):
        values = [report["scores"][model].get(t) or 0.0 for t in report["tasks"]] + [report["means"][model]]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"exact match ({report['split']})")
    ax.legend(ncol=len(models), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}"
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
