"""Every benchmark script runs end to end with `--tiny` and writes its JSON (never into benchmarks/results/).

Run: .venv/bin/python -m pytest tests/smoke/test_benchmarks.py -q -m smoke

The benchmarks themselves are not run by CI (minutes to tens of minutes); this keeps them working.
`quality`, `end_to_end`, `eval_share` and `smollm2_stages` start the real pipeline (Ray) on a 2-task, 2-step setting
(`smollm2_stages --tiny` on the tiny embedded model, not SmolLM2).

The scripts that drive the pipeline through `common.cli` (the CLI in their own process, on one Ray they keep up)
run here in the test's process (`runpy`, as `__main__`, with their own argv and the repository as working
directory) on the session's Ray (`ray_session`): `common.start_ray` finds Ray up and uses it, as every call of
theirs but the first does anyway, and the test saves a Python start, the imports and a Ray start per script.
`add_task` stays a subprocess, so `start_ray` starting Ray itself is still run.

Every script runs with one torch thread in its own process (OMP_NUM_THREADS=1 for the subprocesses,
`torch.set_num_threads(1)` around the in-process ones), as the unit tests do: the tiny models gain nothing from a
second thread, and two threads per process on 2 cores that the other pytest worker and Ray also use mostly wait
for each other (`curves --tiny`, load average 10: its two parts took 11 s with one thread, 89 s with two under
cProfile). The Ray workers set their own threads.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def _results_snapshot() -> dict:
    if not os.path.isdir(RESULTS):
        return {}
    return {f: os.path.getmtime(os.path.join(RESULTS, f)) for f in os.listdir(RESULTS)}


@pytest.mark.smoke
@pytest.mark.parametrize("script", ["storage", "stream_cost", "scaling", "quality", "end_to_end", "select_defaults",
                                    "on_policy", "add_task", "search_predicts", "curves", "regime", "soft_rows",
                                    "smollm2_stages", "eval_share"])
def test_benchmark_runs_tiny_and_writes_json(script, tmp_path, request, capsys, monkeypatch):
    before = _results_snapshot()
    out = tmp_path / f"{script}.json"
    path = os.path.join(REPO, "benchmarks", f"{script}.py")
    if script in IN_PROCESS:
        request.getfixturevalue("ray_session")
        proc = _run_in_process(path, ["--tiny", "--out", str(out)], capsys, monkeypatch)
    else:
        proc = subprocess.run([sys.executable, path, "--tiny", "--out", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=900, env={**os.environ, **ONE_THREAD})  # minutes on a loaded 2-core machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"].startswith(script) and record["table"] and record["machine"]["cpu_count"]
    assert "|" in proc.stdout or "skipped" in proc.stdout  # the table (or the skip line) is printed
    assert _results_snapshot() == before  # tiny runs never touch the committed results


IN_PROCESS = {"select_defaults", "on_policy", "quality", "soft_rows", "smollm2_stages"}  # their stages run through common.cli
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_in_process(path: str, args: list[str], capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`python PATH ARGS` in this process, from the repository: its exit status (SystemExit's, 0 if it returns,
    1 and the traceback on stderr if it raises) and what it printed."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [path, *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ and the repository first
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a `python -m dume_ray` it starts starts its own Ray, as from a shell
    import torch
    threads, environ, modules = torch.get_num_threads(), dict(os.environ), set(sys.modules)
    capsys.readouterr()
    rc, error = 0, ""
    try:
        torch.set_num_threads(1)
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        error = "" if isinstance(exit_.code, int) or exit_.code is None else str(exit_.code)
    except Exception:  # noqa: BLE001 - reported as a failed command, with its traceback
        import traceback
        rc, error = 1, traceback.format_exc()
    finally:  # what the script set (QUIET_ENV, HF_HUB_OFFLINE, ...) and imported (benchmarks/common's load at
        torch.set_num_threads(threads)  # start) must not reach the next test
        os.environ.clear()
        os.environ.update(environ)
        for name in set(sys.modules) - modules:
            if getattr(sys.modules[name], "__file__", None) and os.path.dirname(sys.modules[name].__file__) == os.path.join(REPO, "benchmarks"):
                del sys.modules[name]
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([sys.executable, path, *args], rc, captured.out, captured.err + error)


def test_tiny_runs_without_out_go_to_a_temp_folder():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from common import result_path
    assert not result_path("quality", None, tiny=True).startswith(RESULTS)
    assert result_path("quality", None, tiny=False) == os.path.join(RESULTS, "quality.json")


def test_storage_kl_base_rule_identities():
    """The kl_base rule: a base equal to the teacher keeps nothing; a uniform base is the uniform tail, so it keeps
    what the pipeline's kept_counts keeps; the kept tokens + base-shaped tail are within the bound (exact values) where the cap did not stop it."""
    import torch
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from storage import adaptive_counts, adaptive_kl, kept_counts_base
    from dume_ray.data.soft_targets import kept_counts
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(4 * torch.randn(64, 500, generator=g), -1)  # [n, V], peaked: KL(p ‖ uniform) > 0.05
    base = torch.log_softmax(torch.randn(64, 500, generator=g), -1)
    assert kept_counts_base(teacher, teacher, 32, 0.05).eq(0).all()
    uniform = torch.full_like(teacher, -torch.log(torch.tensor(500.0)).item())
    assert torch.equal(kept_counts_base(teacher, uniform, 32, 0.05), kept_counts(teacher, 32, 0.05))
    values, ids, counts, tail = adaptive_counts(teacher, 32, ("kl_base", 0.05), ref_logprobs=base)
    below = counts < 32  # positions that met the bound before the cap
    assert below.sum() > 10 and counts[below].float().mean() > 1
    kl, _ = adaptive_kl(teacher[below], ids[below], counts[below], values[below], tail[below], base[below])
    assert kl <= 0.05 + 1e-6


def test_regime_lists_every_planned_cell_short_of_its_seeds():
    """regime.json's `not_measured`: a planned (model, tasks, budget) with 0 < seeds < planned is listed too, with
    the seeds it lacks; a complete one is not; cells outside the plan change nothing (pure function, no training)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from regime import PLANNED_SEEDS, SMOLLM2_BUDGETS, cell_key, not_measured
    assert 0.5 in SMOLLM2_BUDGETS and 0.125 in SMOLLM2_BUDGETS  # the SmolLM2 plan holds budget 1/2
    cells = {cell_key(m, 4, b, s): {} for m, b, seeds in [("smollm2", 0.125, [0, 1, 2]), ("smollm2-L15", 0.125, [0]),
                                                          ("smollm2", 0.5, [1]), ("smollm2", 1.0, [0])] for s in seeds}
    plan = [(m, [4], SMOLLM2_BUDGETS) for m in ("smollm2", "smollm2-L15")]
    missing = {(g["model"], g["tasks"], g["budget"]): g for g in not_measured(cells, plan, [0, 1, 2])}
    assert set(missing) == {("smollm2", 4, 0.5), ("smollm2-L15", 4, 0.125), ("smollm2-L15", 4, 0.5)}
    assert missing[("smollm2-L15", 4, 0.125)] == {"model": "smollm2-L15", "tasks": 4, "budget": 0.125,
                                                "seeds_measured": 1, "seeds_planned": 3, "missing_seeds": [1, 2]}
    assert missing[("smollm2", 4, 0.5)]["missing_seeds"] == [0, 2]
    assert missing[("smollm2-L15", 4, 0.5)]["seeds_measured"] == 0
    assert [g["budget"] for g in not_measured(cells, plan[:1], PLANNED_SEEDS)] == [0.5]  # the map's own plan of seeds


def test_curves_answer_room_fits_the_longest_answer_of_any_split():
    """`answer_room` (two_skill's generation cap) = tokens of the longest answer in any split of any task, eos not
    counted (`data.encode.answer_tokens`, the preflight's rule: an answer of exactly max_new_tokens tokens is
    matched, tests/unit/test_model_and_training.py), so eval.max_new_tokens never cuts a correct answer (pure
    function; a word-counting tokenizer)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from curves import answer_room
    from dume_ray.tasks.base import Example, Task
    from dume_ray.tasks.words import make_word_task

    class Words:  # one token a word; no chat template, so prompts are bos + words and answers end with eos
        bos_token_id, eos_token_id = "<s>", "</s>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": text.split()}
    tasks = {n: make_word_task(n, 0, 20, 5, 5) for n in ("reverse_words", "reverse_upper")}
    longest = max(len(e.response.split()) for t in tasks.values() for split in t.splits.values() for e in split)
    assert 3 <= longest <= 5 and answer_room(tasks, Words(), 64) == longest
    short = [Example("p\n", "a b")]  # a longer answer in the test split alone still counts
    tasks["t"] = Task("t", {"train": short, "validation": short, "test": [Example("p\n", " ".join("x" * 9))]})
    assert answer_room(tasks, Words(), 64) == 9


def test_curves_reuses_a_base_or_expert_only_under_the_settings_that_shaped_it(tmp_path, monkeypatch):
    """`prepare`'s cache under one work folder (a cell interrupted and resumed, maybe with other --set overrides):
    an unchanged config hits every entry; a changed expert setting trains new experts on the cached base; a
    changed base setting trains a new base and new experts; a student setting trains nothing. A stub trainer
    (records what it trains) stands in for training; the tiny model and the tasks are real."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import curves
    from dume_ray.config import load_config
    trained: list[str] = []

    def fake_train(model, tokenizer, rows, optim, seed, out, dtype="float32"):
        os.makedirs(out, exist_ok=True)
        trained.append("expert" if os.path.basename(out) == "model" else "base")

    monkeypatch.setattr(curves, "train_expert", fake_train)
    monkeypatch.setattr(curves, "score_soft_targets", lambda model_dir, rows, k, path, batch_size, **fmt: open(path, "w").close())
    monkeypatch.setattr(curves, "read_soft_targets", lambda path: [])
    monkeypatch.setattr(curves, "load_model", lambda path: None)
    monkeypatch.setattr(curves, "make_trainable", lambda model, **trainable: model)
    work, groups = str(tmp_path / "work"), {"copy": ["copy"], "reverse": ["reverse"]}

    def prepare(*overrides: str) -> tuple[list[str], str]:
        trained.clear()
        prep = curves.prepare(load_config(os.path.join(REPO, "configs", "demo.yaml"), [*curves.TINY_OVERRIDES, *overrides]),
                              work, groups)
        return sorted(trained), prep["base_dir"]

    first, base_dir = prepare()
    assert first == ["base", "expert", "expert"]
    assert prepare() == ([], base_dir)                                                     # unchanged: all cached
    assert prepare("experts.optim.lr=0.01") == (["expert", "expert"], base_dir)            # experts only
    assert prepare("experts.train_mlp_only=true")[0] == ["expert", "expert"]
    changed_base, other_base = prepare("base.optim.lr=0.01")
    assert changed_base == ["base", "expert", "expert"] and other_base != base_dir          # and their experts
    assert prepare("distill.optim.steps=7") == ([], base_dir)                              # the student's: nothing
    assert prepare("experts.optim.lr=0.01") == ([], base_dir)                              # the earlier override, cached


def test_curves_two_skill_overrides_pretrained_budget_then_tiny_then_the_users_set():
    """On a pretrained config the part gets TWO_SKILL_PRETRAINED's steps and the config's own sequence room; --tiny's
    steps replace the budget; --set wins over both; the embedded model gets the character lengths instead."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from curves import SINGLE_SKILLS, TWO_SKILL, two_skill_overrides
    from dume_ray.config import load_config
    smol, demo = os.path.join(REPO, "configs", "smollm2.yaml"), os.path.join(REPO, "configs", "demo.yaml")
    cfg = load_config(smol, two_skill_overrides(True, False, []))
    assert cfg.tasks.names == [*SINGLE_SKILLS, TWO_SKILL] and not cfg.base.enabled
    assert (cfg.experts.optim.steps, cfg.distill.optim.steps, cfg.model.max_seq_len) == (30, 60, 48)
    assert cfg.experts.train_mlp_only and cfg.upcycle.routing == "prompt"  # the experts and DUME as the config says
    tiny = load_config(smol, two_skill_overrides(True, True, ["distill.optim.steps=3"]))
    assert (tiny.experts.optim.steps, tiny.distill.optim.steps, tiny.tasks.names[-1]) == (2, 3, TWO_SKILL)
    embedded = load_config(demo, two_skill_overrides(False, False, []))
    assert (embedded.model.max_seq_len, embedded.eval.max_new_tokens, embedded.distill.optim.steps) == (112, 36, 600)
