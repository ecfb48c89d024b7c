"""Does the search's proxy predict the full pipeline? Proxy score vs full score per task grouping, Spearman rho.

    python benchmarks/search_predicts.py                     # 4 demo tasks, 11 groupings, seeds 0 1 2
    python benchmarks/search_predicts.py --shard 1/3         # one of 3 processes sharing the cells (same files)
    python benchmarks/search_predicts.py --fidelities proxy --variant steps600 --proxy-set search.proxy_steps=600
    python benchmarks/search_predicts.py --fidelities        # only summarise the cells on disk into the JSON
    python benchmarks/search_predicts.py --tiny              # 2 tasks, a few steps, temp folder (smoke test)

For every grouping of `--tasks` (a subset of configs/demo.yaml's tasks) and seed, two scores on the VALIDATION
split (the test split is never read):

- **proxy**: what one `search` trial computes (configs/search.yaml: experts of `experts.optim`, cached per group,
  then `search.proxy_steps` steps of KD from the base), the student's mean validation exact match after the last
  report, at the default point T = distill.temperature, alpha = distill.alpha. Also kept: the student's validation
  loss and the experts' own validation exact match (other proxies one could use). `--variant NAME --proxy-set ...`
  measures a changed proxy as cells `proxy-NAME`.
- **full**: the pipeline's stages for that grouping with configs/demo.yaml's settings (base -> one expert per
  group -> top-k soft targets -> student with `distill.optim`), run IN-PROCESS with the same library pieces the
  Ray stages run (`training.train_loop` with `ce_step` for the base and experts, `teacher_scoring.score_rows` for
  soft targets, `kd_step` for the student; `search/proxy.py` wires them). It is the in-process equivalent of
  `python -m dume_ray run ... experts.groups=<grouping> eval.split=validation`'s student validation score, not
  that run itself: the data order differs (no Ray Data) and nothing runs in parallel.

`--space pairs` (default) measures the groupings whose groups have at most 2 tasks plus the single group: 11 of
the 15 groupings of 4 tasks, needing 11 distinct experts instead of 15. The full score of a grouping is its mean
over the seeds with every full cell measured (the "judge"). Spearman rho of each proxy seed against it, and of the
proxy's seed mean, with a one-sided permutation p-value (10,000 shuffles) and a bootstrap 95% interval over
groupings; one seed against another seed of the same fidelity is the noise ceiling.

Can the groupings be told apart at all? Per fidelity, over its seeds (each seed one block: its own base), a
two-way F of grouping x seed with a permutation p-value (each seed's scores shuffled over the groupings), the
residual std, and per grouping the std over seeds of (its score - the default's in the same seed): the noise
of one comparison with the default, from which `search.default_margin` is set. When the full score's F is
within noise, no proxy can rank the groupings the way the full pipeline does.

Last, the search at equal trial counts, replayed on these scores: per proxy seed, the "seeded" arm tries the
default grouping (one expert per task) and the groupings the gradient-affinity matrix (the search stage's
`compute_affinity` on the proxy's base) ranks best, the "random" arm the default and uniform draws (as Tune's
`tune.choice`); each arm picks its best trial by PROXY score and is judged by that grouping's FULL score. T and
alpha stay at the default and ASHA stops nothing, so this measures the groupings the arms propose, not Tune.
"+ margin rule" arms apply the search's own decision (search.default_margin of --proxy-config): the best trial
only if its proxy beats the default's by more than the margin, else the default.

Every (fidelity, seed, grouping) cell is a file under `<runs-dir>/cells/`, written when measured: a rerun resumes
and parallel shards never clash (experts and bases are cached per content hash with a file lock, as in a search).
Writes benchmarks/results/search_predicts.json (or --out) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, fmt_pm, markdown_table, mean_std, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
import torch  # noqa: E402

from dume_ray.config import PipelineConfig, load_config  # noqa: E402
from dume_ray.model import create_initial_model, load_model, load_tokenizer  # noqa: E402
from dume_ray.search.affinity import rank_groupings  # noqa: E402
from dume_ray.search.launch import compute_affinity  # noqa: E402  (imports Ray Tune; starts no cluster)
from dume_ray.search.partitions import decode, encode, iter_rgs, parse_readable, readable  # noqa: E402
from dume_ray.search.proxy import (cached_expert, expert_cache_key, grouping_soft_targets, proxy_distill,  # noqa: E402
                                   train_expert)
from dume_ray.stage_hashes import base_hash  # noqa: E402
from dume_ray.search.report import beats_by_margin  # noqa: E402
from dume_ray.tasks import encode_rows, load_tasks  # noqa: E402
from dume_ray.training import evaluate_tasks, make_optimizer, score_tasks  # noqa: E402

TINY = ["tasks.num_train=32", "tasks.num_validation=8", "tasks.num_test=8", "base.optim.steps=3",
        "experts.optim.steps=3", "distill.optim.steps=4", "search.proxy_steps=2", "search.report_every=1",
        "eval.max_new_tokens=4", "search.affinity_batches=1"]


def configs(args) -> dict[str, PipelineConfig]:
    """The two fidelities: the search trial's settings and the full pipeline's, on the same tasks."""
    tasks = f"tasks.builtin=[{','.join(args.tasks)}]"
    tiny = TINY if args.tiny else []
    return {"proxy": load_config(args.proxy_config, [tasks, *tiny, *args.proxy_set]),
            "full": load_config(args.full_config, [tasks, *tiny, *args.full_set])}


def in_process_base(cfg: PipelineConfig, cache_dir: str) -> tuple[str, str]:
    """The pipeline's `base` stage in-process: initial model, CE on every task's training rows with `base.optim`;
    cached under its stage hash. Returns (model folder, base hash)."""
    key = base_hash(cfg)

    def build(out: str) -> None:
        init = create_initial_model(cfg.model, cfg.seed, os.path.join(out, "init"), cfg.data)
        tokenizer = load_tokenizer(init)
        tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
        rows = encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len, {t: "base" for t in tasks})
        train_expert(load_model(init), tokenizer, rows, cfg.base.optim, cfg.seed, os.path.join(out, "model"), cfg.model.dtype)

    entry, _ = cached_expert(cache_dir, f"base-{key}", build)
    return os.path.join(entry, "model"), key


def grouping_cell(cfg: PipelineConfig, fidelity: str, base_dir: str, key: str, cache_dir: str, groups: list[list[str]],
                  expert_scores: dict) -> dict:
    """Experts of `groups` (cached per group), then the student from the base on their soft targets; its
    validation exact match and loss at each report step, and the experts' own validation exact match."""
    tokenizer = load_tokenizer(base_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    start = time.time()
    soft_rows, hits = grouping_soft_targets(cfg, base_dir, key, cache_dir, groups, tokenizer, tasks)
    expert_seconds = time.time() - start
    experts = {}
    for group in groups:  # each expert scored on its own group's tasks (as the report's "experts (own group)")
        entry = os.path.join(cache_dir, expert_cache_key(key, group, cfg))
        if entry not in expert_scores:
            expert_scores[entry] = evaluate_tasks(load_model(os.path.join(entry, "model")), tokenizer,
                                                  {t: tasks[t] for t in group}, "validation", cfg.eval.max_new_tokens)
        experts.update(expert_scores[entry])
    steps, every = (cfg.search.proxy_steps, cfg.search.report_every) if fidelity == "proxy" else (cfg.distill.optim.steps,) * 2
    optim = dataclasses.replace(cfg.distill.optim, steps=steps, warmup_steps=min(cfg.distill.optim.warmup_steps, steps))
    torch.manual_seed(cfg.seed)
    student = load_model(base_dir)
    optimizer, scheduler = make_optimizer(student, optim)
    reports = {}

    def report(step: int, metrics: dict) -> None:
        scores = score_tasks(student, tokenizer, tasks, "validation", cfg.eval.max_new_tokens)
        reports[step] = {"exact_match": _mean(scores["exact_match"]), "loss": _mean(scores["loss"]),
                         "per_task": scores["exact_match"]}
        student.train()

    proxy_distill(student, tokenizer, soft_rows, optim, optimizer, scheduler, top_k=min(cfg.soft_targets.top_k, len(tokenizer)),
                  alpha=cfg.distill.alpha, temperature=cfg.distill.temperature, divergence=cfg.distill.divergence,
                  jsd_beta=cfg.distill.jsd_beta, anneal=cfg.distill.anneal, seed=cfg.seed, start_step=0,
                  report_every=every, on_report=report)
    last = reports[max(reports)]
    return {"exact_match": last["exact_match"], "loss": last["loss"], "per_task": last["per_task"],
            "experts": _mean(experts), "experts_per_task": experts, "by_step": {str(s): r for s, r in sorted(reports.items())},
            "cache_hits": hits, "expert_seconds": round(expert_seconds, 1), "seconds": round(time.time() - start, 1)}


# ---- statistics: Spearman rho by ranks, permutation p-value, bootstrap interval -----------------------------

def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the ranks (nan when either side is constant)."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = sum((a - mx) ** 2 for a in rx) ** 0.5, sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def permutation_p(x: list[float], y: list[float], rounds: int = 10000, seed: int = 0) -> float:
    """One-sided p-value of rho >= observed under random pairings ((hits + 1) / (rounds + 1))."""
    observed, rng, y = spearman(x, y), random.Random(seed), list(y)
    if observed != observed:
        return float("nan")
    hits = 0
    for _ in range(rounds):
        rng.shuffle(y)
        hits += spearman(x, y) >= observed - 1e-12
    return (hits + 1) / (rounds + 1)


def bootstrap_interval(x: list[float], y: list[float], rounds: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of rho over groupings resampled with replacement."""
    rng, values = random.Random(seed), []
    for _ in range(rounds):
        idx = [rng.randrange(len(x)) for _ in x]
        rho = spearman([x[i] for i in idx], [y[i] for i in idx])
        if rho == rho:
            values.append(rho)
    values.sort()
    return [values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]] if values else []


def correlation(x: list[float], y: list[float]) -> dict:
    return {"rho": spearman(x, y), "p_permutation": permutation_p(x, y), "bootstrap_95": bootstrap_interval(x, y), "n": len(x)}


def grouping_f(table: list[list[float]]) -> float:
    """Two-way (grouping x seed, one value per cell) F of the groupings: mean square between groupings over
    the residual mean square. `table[s][g]`: seed s, grouping g. Seeds are blocks (one base per seed), so a seed
    that is better on every grouping adds nothing to F; inf when the residual is exactly 0."""
    n, k = len(table), len(table[0])
    grand = sum(map(sum, table)) / (n * k)
    g_mean = [sum(row[g] for row in table) / n for g in range(k)]
    s_mean = [sum(row) / k for row in table]
    ss_g = n * sum((m - grand) ** 2 for m in g_mean)
    ss_res = sum((table[s][g] - g_mean[g] - s_mean[s] + grand) ** 2 for s in range(n) for g in range(k))
    return (ss_g / (k - 1)) / (ss_res / ((k - 1) * (n - 1))) if ss_res > 0 else float("inf")


def separability(table: list[list[float]], labels: list[str], default: str, rounds: int = 10000, seed: int = 0) -> dict:
    """Do the groupings differ by more than the seed-to-seed spread? `table[s][g]` over >= 2 seeds, >= 2 groupings.

    F of `grouping_f` with a permutation p-value (each seed's scores shuffled over the groupings, 10,000 rounds,
    (hits + 1) / (rounds + 1)); the residual standard deviation; per grouping, the std over seeds of its score
    minus the default's in the same seed ("seed spread of a difference", the noise of one comparison with the
    default), and its root mean square over groupings; the range of the grouping means."""
    observed, rng = grouping_f(table), random.Random(seed)
    hits = 0
    for _ in range(rounds):
        shuffled = [rng.sample(row, len(row)) for row in table]
        hits += grouping_f(shuffled) >= observed - 1e-12
    n, k = len(table), len(labels)
    means = {g: sum(row[i] for row in table) / n for i, g in enumerate(labels)}
    d = labels.index(default) if default in labels else None
    diff_sd = ({g: mean_std([row[i] - row[d] for row in table])[1] for i, g in enumerate(labels) if i != d}
               if d is not None else {})
    residual_ms = (sum((table[s][g] - means[labels[g]] - sum(table[s]) / k + sum(map(sum, table)) / (n * k)) ** 2
                       for s in range(n) for g in range(k)) / ((k - 1) * (n - 1)))
    return {"seeds": n, "groupings": labels, "F": observed, "df": [k - 1, (k - 1) * (n - 1)],
            "p_permutation": (hits + 1) / (rounds + 1), "residual_sd": residual_ms ** 0.5,
            "grouping_means": means, "range_of_means": max(means.values()) - min(means.values()),
            "diff_vs_default_sd": diff_sd,
            "diff_vs_default_sd_rms": (sum(v * v for v in diff_sd.values()) / len(diff_sd)) ** 0.5 if diff_sd else None}


# ---- the search replayed on measured scores --------------------------------------------------------------------

def replay_search(space: list[str], default: str, seeded: list[str], proxy: dict, full: dict, trials: int,
                  seed: int, margin: float, draws: int = 2000) -> dict:
    """Best grouping (by proxy) among `trials` trials of each arm, and its full score. Seeded: default + the
    affinity ranking; random: default + uniform draws with replacement (one draw with `seed`, and the mean
    over `draws` draws, which removes the luck of one draw). "+ margin": the search's rule
    (`search.default_margin`, report.choose_winner): the best trial only if its proxy beats the default's by
    more than `margin`, else the default."""
    def best(tried: list[str], rule_margin: float = -1.0) -> str:
        top = max(tried, key=lambda g: (proxy[g], -space.index(g)))
        return top if rule_margin < 0 or beats_by_margin(proxy[top], proxy[default], rule_margin) else default

    tried = ([default] + [g for g in seeded if g != default])[:trials]
    chosen, ruled = best(tried), best(tried, margin)
    rng = random.Random(seed)
    one = best([default] + [rng.choice(space) for _ in range(trials - 1)])
    random_full, random_ruled = 0.0, 0.0
    for _ in range(draws):
        draw = [default] + [rng.choice(space) for _ in range(trials - 1)]
        random_full += full[best(draw)] / draws
        random_ruled += full[best(draw, margin)] / draws
    return {"seeded": {"grouping": chosen, "full": full[chosen], "proxy": proxy[chosen]},
            "seeded_margin": {"grouping": ruled, "full": full[ruled], "proxy": proxy[ruled]},
            "random": {"grouping": one, "full": full[one], "proxy": proxy[one]}, "random_expected_full": random_full,
            "random_margin_expected_full": random_ruled, "margin": margin,
            "oracle_full": max(full.values()), "default_full": full[default]}


def _fmt_rho(values: list[float]) -> str:
    """mean ± std of the defined values (rho is undefined, nan, when one side is constant)."""
    defined = [v for v in values if v == v]
    return fmt_pm(defined) + (f" ({len(values) - len(defined)} undefined)" if len(defined) < len(values) else "")


def _mean(scores: dict) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["reverse", "shift", "add", "sub"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--space", choices=["pairs", "all"], default="pairs", help="which groupings (see grouping_space)")
    parser.add_argument("--max-groupings", type=int, default=0, help="0 = every grouping of --space")
    parser.add_argument("--groupings", nargs="*", default=[], help="measure these groupings ('reverse+shift | add | sub') "
                        "instead of --space's")
    parser.add_argument("--trials", type=int, nargs="+", default=[2, 4, 6], help="trials per search arm")
    parser.add_argument("--proxy-config", default="configs/search.yaml")
    parser.add_argument("--full-config", default="configs/demo.yaml")
    parser.add_argument("--proxy-set", nargs="*", default=[], help="key=value overrides of the proxy's config")
    parser.add_argument("--full-set", nargs="*", default=[], help="key=value overrides of the full pipeline's config")
    parser.add_argument("--fidelities", nargs="*", default=["proxy", "full"], help="none: only summarise the cells on disk")
    parser.add_argument("--variant", default="", help="name of a changed proxy (with --proxy-set): its cells are "
                        "'proxy-<name>', it reuses the proxy's base and experts when its overrides leave them alone")
    parser.add_argument("--runs-dir", default="runs/search_predicts")
    parser.add_argument("--shard", default="0/1", help="i/n: measure every n-th grouping from the i-th (n processes share "
                        "the cells of a seed; cells and experts are files, so they never clash)")
    parser.add_argument("--reverse", action="store_true", help="measure the groupings last to first (a helper process)")
    parser.add_argument("--note", default="", help="free text kept in the JSON (how the cells were produced)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.tasks, args.seeds, args.space, args.max_groupings, args.trials = args.tasks[:2], args.seeds[:2], "all", 0, [2]
    started = time.time()
    out = result_path("search_predicts", args.out, args.tiny)
    runs_dir = os.path.join(os.path.dirname(out), "runs") if args.tiny else args.runs_dir
    base_cfgs = configs(args)
    names = base_cfgs["full"].tasks.names
    space = [encode(parse_readable(g), names) for g in args.groupings] or grouping_space(len(names), args.space, args.max_groupings)
    labels = [readable(decode(r, names)) for r in space]
    cells, affinity = read_cells(runs_dir), read_affinity(runs_dir, args.seeds)

    def save() -> dict:
        payload = summarise(args, base_cfgs, labels, cells, affinity)
        write_result(out, "search_predicts", command_line(), started, payload, payload["table"])
        return payload

    shard, shards = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(1)
    for seed in args.seeds:
        for kind in args.fidelities:
            cfg = dataclasses.replace(base_cfgs[kind], seed=seed)
            cache_dir = os.path.abspath(os.path.join(runs_dir, kind, "cache"))
            fidelity = f"proxy-{args.variant}" if kind == "proxy" and args.variant else kind
            if all((fidelity, seed, g) in cells for g in labels) and (fidelity != "proxy" or seed in affinity):
                continue
            base_dir, key = in_process_base(cfg, cache_dir)
            if fidelity == "proxy" and seed not in affinity and shard == 0:  # the search stage's own code
                matrix = compute_affinity(cfg, base_dir, os.path.join(runs_dir, f"affinity-s{seed}"))
                affinity[seed] = {"tasks": names, "matrix": matrix.tolist()}
            expert_scores: dict = {}
            cells.update(read_cells(runs_dir))  # what the other shards finished meanwhile
            for label in labels[shard::shards][::-1 if args.reverse else 1]:
                if (fidelity, seed, label) in cells:
                    continue
                cell = grouping_cell(cfg, kind, base_dir, key, cache_dir, parse_readable(label), expert_scores)
                cell["overrides"] = args.proxy_set if kind == "proxy" else args.full_set
                cells[(fidelity, seed, label)] = write_cell(runs_dir, fidelity, seed, label, cell)
                print(f"[search_predicts] {fidelity} seed {seed} {label}: student {cell['exact_match']:.3f} loss "
                      f"{cell['loss']:.3f} experts {cell['experts']:.3f} in {cell['seconds']:.0f} s", flush=True)
                save()
    cells.update(read_cells(runs_dir))
    affinity.update(read_affinity(runs_dir, [s for s in args.seeds if s not in affinity]))
    payload = save()
    print(payload["table"], flush=True)


def grouping_space(n: int, space: str, max_groupings: int) -> list[tuple]:
    """The groupings measured: every one ("all"), or ("pairs") those with groups of at most 2 tasks plus the
    single group (on 4 tasks: 11 of 15, with 11 distinct expert groups instead of 15); the default (one
    expert per task) is always in. `max_groupings` > 0 keeps the first ones (smoke runs)."""
    default = tuple(range(n))
    rgs = [r for r in iter_rgs(n, n) if space == "all" or max(r.count(g) for g in set(r)) <= 2 or max(r) == 0]
    if max_groupings:
        rgs = [r for r in rgs if r != default][:max_groupings - 1] + [default]
    return rgs


def cell_path(runs_dir: str, fidelity: str, seed: int, label: str) -> str:
    groups = label.replace(" | ", "__").replace("+", "-")
    return os.path.join(runs_dir, "cells", f"{fidelity}-s{seed}-{groups}.json")


def write_cell(runs_dir: str, fidelity: str, seed: int, label: str, cell: dict) -> dict:
    """One measured (fidelity, seed, grouping) as its own file: parallel runs (one per seed) never clash."""
    path = cell_path(runs_dir, fidelity, seed, label)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump({"key": [fidelity, seed, label], "value": cell}, f)
    os.replace(f"{path}.tmp", path)
    return cell


def read_cells(runs_dir: str) -> dict:
    cells = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, "cells", "*.json"))):
        with open(path) as f:
            record = json.load(f)
        cells[tuple(record["key"])] = record["value"]
    return cells


def read_affinity(runs_dir: str, seeds: list[int]) -> dict:
    """{seed: affinity.json} of the seeds whose matrix the search stage's code already wrote."""
    found = {}
    for seed in seeds:
        path = os.path.join(runs_dir, f"affinity-s{seed}", "affinity.json")
        if os.path.exists(path):
            with open(path) as f:
                found[seed] = json.load(f)
    return found


def summarise(args, cfgs: dict, labels: list[str], cells: dict, affinity: dict) -> dict:
    """Per grouping: proxy and full over seeds; rho of each candidate proxy against the full score; the replay.

    The full score of a grouping is its mean over the seeds whose full cells are all measured ("judge"); each
    proxy seed is correlated with it (and with the same seed's full score where that exists)."""
    def complete(fidelity: str) -> list[int]:
        return [s for s in sorted({k[1] for k in cells}) if all((fidelity, s, g) in cells for g in labels)]

    proxies = sorted({k[0] for k in cells if k[0].startswith("proxy")}, key=lambda f: (f != "proxy", f))
    full_seeds = complete("full")
    rows = []
    for g in labels:
        row = [g]
        for fidelity, field in [*((p, "exact_match") for p in proxies), ("proxy", "loss"), ("proxy", "experts"), ("full", "exact_match")]:
            row.append(fmt_pm([cells[(fidelity, s, g)][field] for s in complete(fidelity)]))
        rows.append(row)
    table = markdown_table(["grouping", *(f"{p} student EM" for p in proxies), "proxy student loss", "proxy experts EM",
                            "full student EM"], rows)
    payload = {"note": args.note, "tasks": cfgs["full"].tasks.names, "split": "validation", "seeds": args.seeds, "full_seeds": full_seeds,
               "proxy_seeds": {p: complete(p) for p in proxies}, "groupings": labels,
               "proxy_config": args.proxy_config, "full_config": args.full_config,
               "full_is": "in-process equivalent of the pipeline's base -> experts -> soft targets -> student stages "
                          "(same train_loop/ce_step/score_rows/kd_step, no Ray; data order differs from Ray Data's)",
               "settings": {"proxy": {"experts_steps": cfgs["proxy"].experts.optim.steps, "student_steps": cfgs["proxy"].search.proxy_steps,
                                      "num_train": cfgs["proxy"].tasks.num_train, "num_validation": cfgs["proxy"].tasks.num_validation},
                            "full": {"experts_steps": cfgs["full"].experts.optim.steps, "student_steps": cfgs["full"].distill.optim.steps,
                                     "num_train": cfgs["full"].tasks.num_train, "num_validation": cfgs["full"].tasks.num_validation},
                            "temperature": cfgs["full"].distill.temperature, "alpha": cfgs["full"].distill.alpha,
                            "proxy_variants": "proxy-<name> cells: the proxy with overrides (see their 'overrides' field)"}}
    default = readable([[t] for t in cfgs["full"].tasks.names])
    separable, sep_rows = {}, []
    for fidelity in ["full", *proxies]:  # can the groupings be told apart at all, by this score, over its seeds?
        seeds = sorted({k[1] for k in cells if k[0] == fidelity})
        common = [g for g in labels if all((fidelity, s, g) in cells for s in seeds)]
        if len(seeds) < 2 or len(common) < 2:
            continue
        sep = separability([[cells[(fidelity, s, g)]["exact_match"] for g in common] for s in seeds], common, default)
        separable[fidelity] = sep
        sep_rows.append([f"{fidelity} student EM", f"{len(seeds)} {seeds}", len(common), f"{sep['F']:.2f} ({sep['df'][0]}, {sep['df'][1]})",
                         f"{sep['p_permutation']:.3f}", sep["range_of_means"], sep["residual_sd"],
                         "–" if sep["diff_vs_default_sd_rms"] is None else f"{sep['diff_vs_default_sd_rms']:.3f}"])
    if sep_rows:
        table += "\n\n" + markdown_table(["do groupings differ beyond seed noise?", "seeds", "groupings", "F (df)",
                                           "p (permutation within seed)", "range of grouping means", "residual sd",
                                           "seed sd of (grouping - default), rms"], sep_rows)
    payload["separability"] = separable
    rankings: dict = {}
    if full_seeds:
        judge = {g: sum(cells[("full", s, g)]["exact_match"] for s in full_seeds) / len(full_seeds) for g in labels}
        candidates = {f"{p} student EM" + (" (the search's proxy)" if p == "proxy" else ""): (p, "exact_match", 1) for p in proxies}
        candidates.update({"proxy student -loss": ("proxy", "loss", -1), "proxy experts EM": ("proxy", "experts", 1),
                           "full experts EM": ("full", "experts", 1)})
        corr, corr_rows = {}, []
        for name, (fidelity, field, sign) in candidates.items():
            seeds = complete(fidelity)
            if not seeds:
                continue
            score = {s: [sign * cells[(fidelity, s, g)][field] for g in labels] for s in seeds}
            per_seed = [correlation(score[s], [judge[g] for g in labels]) for s in seeds]
            matched = [correlation(score[s], [cells[("full", s, g)]["exact_match"] for g in labels]) for s in seeds if s in full_seeds]
            means = correlation([sum(score[s][i] for s in seeds) / len(seeds) for i in range(len(labels))], [judge[g] for g in labels])
            corr[name] = {"seeds": seeds, "vs_judge_per_seed": per_seed, "vs_same_seed_full": matched, "seed_means_vs_judge": means}
            corr_rows.append([name, len(seeds), _fmt_rho([c["rho"] for c in per_seed]), " ".join(f"{c['p_permutation']:.3f}" for c in per_seed),
                              f"{means['rho']:.3f}", f"{means['p_permutation']:.3f}",
                              "[" + ", ".join(f"{v:.2f}" for v in means["bootstrap_95"]) + "]"])
        for fidelity in ("full", "proxy"):  # how well one seed's score ranks like another seed's (a noise ceiling)
            seeds = complete(fidelity)
            pairs = [spearman([cells[(fidelity, a, g)]["exact_match"] for g in labels], [cells[(fidelity, b, g)]["exact_match"] for g in labels])
                     for i, a in enumerate(seeds) for b in seeds[i + 1:]]
            corr[f"{fidelity}_seed_vs_seed"] = pairs
            if pairs:
                corr_rows.append([f"{fidelity} EM of another seed (vs that seed, not the judge)", len(seeds), _fmt_rho(pairs), "", "", "", ""])
        table += "\n\n" + markdown_table([f"predictor of the full student's val EM (judge: mean of seeds {full_seeds})", "seeds",
                                          "rho per seed", "p per seed", "rho of seed means", "p", "bootstrap 95%"], corr_rows)
        replays, replay_rows = {}, []
        names = cfgs["full"].tasks.names
        space = [encode(parse_readable(g), names) for g in labels]
        rankings = {s: [readable(decode(r, names)) for _, r in rank_groupings(torch.tensor(affinity[s]["matrix"]), len(space),
                                                                           candidates=space)] for s in complete("proxy") if s in affinity}
        margin = cfgs["proxy"].search.default_margin
        for trials in args.trials:
            per_seed = {s: replay_search(labels, default, rankings[s], {g: cells[("proxy", s, g)]["exact_match"] for g in labels},
                                         judge, trials, s, margin)
                        for s in rankings}
            replays[str(trials)] = per_seed
            if per_seed:
                v = list(per_seed.values())
                replay_rows.append([trials, len(v), fmt_pm([r["seeded"]["full"] for r in v]), fmt_pm([r["seeded_margin"]["full"] for r in v]),
                                    fmt_pm([r["random"]["full"] for r in v]), fmt_pm([r["random_expected_full"] for r in v]),
                                    fmt_pm([r["random_margin_expected_full"] for r in v]), fmt_pm([r["default_full"] for r in v]),
                                    fmt_pm([r["oracle_full"] for r in v])])
        table += "\n\n" + markdown_table(["trials per arm", "search seeds", "affinity-seeded: best's full EM",
                                           f"seeded + margin rule ({margin:g})", "random: best's full EM",
                                           "random, mean of 2000 draws", "random + margin rule, mean of draws",
                                           "default (1 expert/task)", "best of all groupings"], replay_rows)
        payload.update({"judge": judge, "correlations": corr, "replay": replays})
    payload.update({"table": table, "affinity": {str(s): a for s, a in sorted(affinity.items())},
                    "affinity_rankings": {str(s): r for s, r in sorted(rankings.items())},
                    "cells": [{"key": list(k), "value": v} for k, v in sorted(cells.items())]})
    return payload


if __name__ == "__main__":
    main()
