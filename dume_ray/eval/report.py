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

MODEL_ORDER = ["base", "experts", "student", "multitask"]


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def build_report(scores: dict[str, dict[str, float]], task_names: list[str], split: str,
                 settings: Optional[dict] = None, timings: Optional[dict] = None) -> dict:
    """Args:
        scores: {"base"|"experts"|"student"|"multitask"|...: {task: exact-match}}; "experts" holds, per task,
            the score of that task's own group expert.
    """
    models = [m for m in MODEL_ORDER if m in scores] + sorted(m for m in scores if m not in MODEL_ORDER)
    means = {m: _mean(scores[m].get(t) for t in task_names) for m in models}
    report = {"split": split, "tasks": task_names, "models": models, "scores": scores, "means": means,
              "settings": settings or {}, "timings": timings or {}}
    if "student" in means and "multitask" in means:
        report["student_minus_multitask"] = means["student"] - means["multitask"]
    if "student" in means and "experts" in means and means["experts"] > 0:
        report["student_pct_of_experts"] = 100.0 * means["student"] / means["experts"]
    return report


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
        verdict = "beats" if report["student_minus_multitask"] > 0 else "does not beat"
        lines.append(f"- The distilled student **{verdict}** the multitask baseline: "
                     f"{100 * report['student_minus_multitask']:+.1f} points of mean exact match.")
    if "student_pct_of_experts" in report:
        lines.append(f"- The student reaches {report['student_pct_of_experts']:.1f}% of its experts' mean.")
    if report["settings"]:
        lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in report["settings"].items()]
    if report.get("faults"):
        lines += ["", "## Faults survived", ""] + [f"- {k}: {v}" for k, v in report["faults"].items()]
    if report["timings"]:
        lines += ["", "## Stage wall times (s)", ""] + [f"- {k}: {v:.1f}" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"


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
