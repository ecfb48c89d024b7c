"""The search's outputs for people and for the pipeline: report.md, and best.yaml for `grouping=from_search`.

`summarize_trials(result_grid)` turns Tune's results into plain rows in trial order; `choose_winner` applies
the search's rule: the best searched trial (best `val_mean` among trials that ran every report, i.e. were not
stopped early by ASHA, so fidelities are not mixed) wins only if it beats the default point (one expert per
task at distill.temperature/alpha) by more than `search.default_margin`, else the default stays, because the
proxy's seed-to-seed spread is as large as its differences between groupings (docs/search.md). `write_report`
writes `best.yaml` and a markdown report: the rule and its outcome, the affinity matrix, the seeds, every
trial, and the best score after N trials, seeded vs random.

Pure: no Ray import (a ResultGrid is only iterated). `choose_winner`: tests/unit/test_search_report.py; the
rest through tests/integration/test_search.py.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import yaml

from dume_ray.config import PipelineConfig
from dume_ray.search.partitions import RGS, decode, readable


def summarize_trials(grid: Iterable, max_reports: int) -> list[dict]:
    """One row per trial, in the order Tune created them (trial ids end in a running index)."""
    rows = []
    for result in grid:
        metrics, config = result.metrics or {}, result.config or {}
        trial_id = metrics.get("trial_id") or os.path.basename(str(result.path)).removeprefix("trial_")
        reports = int(metrics.get("training_iteration", 0))
        rows.append({"trial_id": trial_id, "grouping": config.get("grouping"),
                     "temperature": float(config.get("temperature", float("nan"))),
                     "alpha": float(config.get("alpha", float("nan"))), "val_mean": metrics.get("val_mean"),
                     "reports": reports, "completed": reports >= max_reports and result.error is None,
                     "cache_hits": metrics.get("cache_hits"), "cache_misses": metrics.get("cache_misses"),
                     "seconds": metrics.get("trial_seconds"), "error": str(result.error)[:200] if result.error else None})
    return sorted(rows, key=lambda r: _index(r["trial_id"]))


def best_after(rows: list[dict]) -> list[Optional[float]]:
    """Best completed-trial val_mean among the first N trials, for N = 1 .. len(rows)."""
    out, best = [], None
    for r in rows:
        if r["completed"] and r["val_mean"] is not None:
            best = r["val_mean"] if best is None else max(best, r["val_mean"])
        out.append(best)
    return out


def beats_by_margin(score: float, default_score: float, margin: float) -> bool:
    """`score` beats the default's by MORE than `margin`. Scores are multiples of 1/(tasks x rows), so a
    difference equal to the margin comes out as 0.020000000000000018 in floats; 1e-9 keeps that a tie."""
    return score - default_score > margin + 1e-9


def choose_winner(trials: dict[str, list[dict]], default: dict, margin: float) -> dict:
    """The search's decision: the default point unless the best searched trial beats it by more than `margin`.

    `trials`: rows of `summarize_trials` per arm; `default`: {"grouping", "temperature", "alpha"} of the default
    point. Only completed trials count when any completed (ASHA-stopped ones are of lower fidelity). Returns {"winner": row, "arm": arm
    of the winner, "kept_default": bool, "reason": one line, "best_searched": row or None (best non-default
    trial), "best_searched_arm", "default": row or None (the default's best completed run), "margin"}. Without a
    measured default (search.include_default=false, or it failed) the best searched trial wins and the reason
    says that the rule was not applied.

    Raises:
        RuntimeError: when no trial reported a score.
    """
    scored = [(arm, r) for arm, rows in trials.items() for r in rows if r["val_mean"] is not None]
    if not scored:
        errors = [r["error"] for rows in trials.values() for r in rows if r["error"]]
        raise RuntimeError(f"search: no trial reported a validation score; first errors: {errors[:3]}")
    pool = [(arm, r) for arm, r in scored if r["completed"]] or scored
    defaults = ([(arm, r) for arm, r in pool if _is_default(r, default)]
                or [(arm, r) for arm, r in scored if _is_default(r, default)])  # ASHA stopped it: its best report
    searched = [(arm, r) for arm, r in pool if not _is_default(r, default)]
    base_arm, base = max(defaults, key=lambda c: c[1]["val_mean"]) if defaults else (None, None)
    best_arm, best = max(searched, key=lambda c: c[1]["val_mean"]) if searched else (None, None)
    if base is None:
        keep, reason = False, "the default point was not measured (search.include_default=false or it failed): the best trial wins, no margin rule"
    elif best is None:
        keep, reason = True, "no searched trial besides the default point"
    else:
        gain = best["val_mean"] - base["val_mean"]
        keep = not beats_by_margin(best["val_mean"], base["val_mean"], margin)
        reason = (f"best searched trial {'-' if gain < 0 else '+'}{abs(gain):.3f} vs the default, "
                  f"{'not more than' if keep else 'more than'} search.default_margin = {margin:g}: "
                  + ("the default stays" if keep else "the searched trial replaces the default"))
    arm, winner = (base_arm, base) if keep else (best_arm, best)
    return {"winner": winner, "arm": arm, "kept_default": keep, "reason": reason, "best_searched": best,
            "best_searched_arm": best_arm, "default": base, "margin": margin}


def write_report(cfg: PipelineConfig, stage_dir: str, trials: dict[str, list[dict]], matrix: torch.Tensor,
                 seeds: list[RGS], seconds: dict[str, float], default: dict) -> dict:
    """Write best.yaml + report.md; returns the winner as written to best.yaml."""
    names = cfg.tasks.names
    choice = choose_winner(trials, default, cfg.search.default_margin)
    winner, searched = choice["winner"], choice["best_searched"]
    default_score = round(choice["default"]["val_mean"], 4) if choice["default"] else None
    groups = [g.split("+") for g in winner["grouping"].split(" | ")]
    best = {"grouping": winner["grouping"], "groups": groups, "temperature": winner["temperature"],
            "alpha": winner["alpha"], "val_mean": round(winner["val_mean"], 4), "default_val_mean": default_score,
            "kept_default": choice["kept_default"], "default_margin": choice["margin"], "rule": choice["reason"],
            "best_searched": ({"grouping": searched["grouping"], "temperature": searched["temperature"],
                               "alpha": searched["alpha"], "val_mean": round(searched["val_mean"], 4),
                               "arm": choice["best_searched_arm"], "trial_id": searched["trial_id"]} if searched else None),
            "arm": choice["arm"], "trial_id": winner["trial_id"], "search_run": cfg.name, "tasks": names}
    with open(f"{stage_dir}/best.yaml", "w") as f:
        f.write("# Winner of `python -m dume_ray search`; used by `python -m dume_ray run ... grouping=from_search`\n")
        yaml.safe_dump(best, f, sort_keys=False)
    with open(f"{stage_dir}/report.md", "w") as f:
        f.write(_markdown(cfg, trials, matrix, seeds, seconds, best))
    return best


def _markdown(cfg, trials, matrix, seeds, seconds, best) -> str:
    names, s = cfg.tasks.names, cfg.search
    lines = [f"# Search report: {cfg.name}", "",
             f"Budget per arm: {s.num_samples} trials, proxy distillation {s.proxy_steps} steps (validation every "
             f"{s.report_every}), experts {cfg.experts.optim.steps} steps; ASHA grace {s.grace_period} reports, "
             f"reduction factor {s.reduction_factor:g}. Scores: mean exact-match on the **validation** split.", "",
             "## Winner", "",
             f"Rule: a searched trial replaces the default point (one expert per task at T = {cfg.distill.temperature:.3g}, "
             f"α = {cfg.distill.alpha:.3g}) only when its val mean beats the default's by more than `search.default_margin` "
             f"= {s.default_margin:g}, the proxy's seed-to-seed spread (docs/search.md). Here: {best['rule']}.", "",
             f"| | grouping | T | α | val mean |", "|---|---|---|---|---|",
             f"| **winner** ({'default' if best['kept_default'] else 'searched'}) | {_cell(best['grouping'])} | "
             f"{best['temperature']:.3g} | {best['alpha']:.3g} | {best['val_mean']:.3f} |",
             _searched_row(best["best_searched"]),
             f"| default (one expert per task) | {_cell(' | '.join(names))} | {cfg.distill.temperature:.3g} | {cfg.distill.alpha:.3g} | "
             + (f"{best['default_val_mean']:.3f} |" if best['default_val_mean'] is not None else "not run |"), "",
             "## Gradient affinity on the base", "",
             "Cosine of per-task gradients (negative = gradient conflict); heatmap: `affinity.png`.", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{v:+.2f}" for v in row) + " |" for t, row in zip(names, matrix.tolist())]
    lines += ["", "Groupings the matrix ranks best (seeds of the `seeded` arm): "
              + "; ".join(f"`{readable(decode(r, names))}`" for r in seeds), ""]
    if len(trials) > 1:
        lines += ["## Best score after N trials", "", "| N | " + " | ".join(trials) + " |", "|---" * (len(trials) + 1) + "|"]
        curves = {arm: best_after(rows) for arm, rows in trials.items()}
        for n in range(max(len(c) for c in curves.values())):
            cells = [(f"{c[n]:.3f}" if n < len(c) and c[n] is not None else "–") for c in curves.values()]
            lines.append(f"| {n + 1} | " + " | ".join(cells) + " |")
        lines += [""]
    for arm, rows in trials.items():
        trial_seconds = sum(r["seconds"] or 0 for r in rows)
        lines += [f"## Trials: {arm} ({trial_seconds:.0f} s of trial time; fit() of this invocation "
                  f"{seconds.get(arm, 0):.0f} s, ~0 when restored from a finished experiment)", "",
                  "| # | grouping | T | α | val mean | reports | stopped early | experts cached/trained |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(rows, 1):
            score = f"{r['val_mean']:.3f}" if r["val_mean"] is not None else f"error: {r['error']}"
            lines.append(f"| {i} | {_cell(r['grouping'])} | {r['temperature']:.3g} | {r['alpha']:.3g} | {score} | {r['reports']} | "
                         f"{'no' if r['completed'] else 'yes'} | {r['cache_hits']}/{r['cache_misses']} |")
        lines += [""]
    return "\n".join(lines)


def _searched_row(searched: Optional[dict]) -> str:
    if searched is None:
        return "| best searched | none besides the default | | | |"
    return (f"| best searched | {_cell(searched['grouping'])} | {searched['temperature']:.3g} | {searched['alpha']:.3g} | "
            f"{searched['val_mean']:.3f} |")


def _cell(text: str) -> str:
    """A grouping inside a markdown table cell: its '|' separators must not split the cell."""
    return str(text).replace("|", "\\|")


def _is_default(row: dict, default: dict) -> bool:
    return (row["grouping"] == default["grouping"] and abs(row["temperature"] - default["temperature"]) < 1e-9
            and abs(row["alpha"] - default["alpha"]) < 1e-9)


def _index(trial_id: str) -> int:
    tail = str(trial_id).rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0
