"""Your own model and data, through the config keys README documents: a Hugging Face model + tokenizer saved
with `save_pretrained` in a folder is the base by path (same weights; its tokenizer encodes the rows), and
JSONL/Parquet task files with your own column names are the tasks; so are a `DatasetDict.save_to_disk` folder
and a folder laid out like a Hub dataset repo (data/train-00000-of-00001.parquet, train.jsonl + README.md),
row for row. Bad input (missing model folder, missing column, split or folder) stops with an error naming the
folder, split and column, the CLI before Ray starts. The
shipped real-work config (Hub model, bf16, GPUs) loads and validates without downloading anything.

    .venv/bin/python -m pytest -q tests/unit/test_user_model_and_data.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from dume_ray.cli import preflight
from dume_ray.config import load_config
from dume_ray.model import create_initial_model, load_tokenizer
from dume_ray.tasks import encode_rows, load_tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL = os.path.join(REPO, "configs", "real", "qwen2.5-0.5b.yaml")
SPLITS = ("train", "validation", "test")


def write_user_data(root) -> dict:
    """qa.jsonl files with columns question/answer and rev.parquet files with text/target, per split."""
    files = {"qa": {}, "rev": {}}
    for split, n in zip(SPLITS, (12, 4, 4)):
        qa = root / f"qa_{split}.jsonl"
        qa.write_text("".join(json.dumps({"question": f"q{i} ab", "answer": f"a{i}", "id": i}) + "\n" for i in range(n)))
        rev = root / f"rev_{split}.parquet"
        pq.write_table(pa.table({"text": [f"abc{i}" for i in range(n)], "target": [f"{i}cba" for i in range(n)]}), rev)
        files["qa"][split], files["rev"][split] = str(qa), str(rev)
    return files


def user_config(tmp_path, model_dir: str, files: dict) -> str:
    """The README's 'Your own model' / 'Your own tasks' keys, as a user would write them."""
    text = f"""
name: mine
runs_dir: {tmp_path / 'runs'}
model: {{name_or_path: {model_dir}, max_seq_len: 32}}
base: {{enabled: false}}
tasks:
  builtin: []
  sources:
    - name: qa
      source: jsonl
      data_files: {json.dumps(files['qa'])}
      prompt_column: question
      response_column: answer
    - name: rev
      source: parquet
      data_files: {json.dumps(files['rev'])}
      prompt_column: text
      response_column: target
"""
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


def _cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "dume_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_saved_model_folder_is_the_base_and_user_files_are_the_tasks(tmp_path, tiny_model_dir):
    cfg = load_config(user_config(tmp_path, tiny_model_dir, write_user_data(tmp_path)))
    preflight(cfg)  # tokenizer from the folder, every split of every task encoded
    tasks = load_tasks(cfg.tasks)
    assert list(tasks) == ["qa", "rev"] and cfg.groups == {"qa": ["qa"], "rev": ["rev"]}
    assert (tasks["qa"].examples("train")[3].prompt, tasks["qa"].examples("train")[3].response) == ("q3 ab", "a3")
    assert tasks["rev"].examples("test")[1].response == "1cba"

    init_dir = create_initial_model(cfg.model, cfg.seed, str(tmp_path / "init"))  # what `base` does with base.enabled=false
    original, copied = (AutoModelForCausalLM.from_pretrained(d) for d in (tiny_model_dir, init_dir))
    assert all((a == b).all() for a, b in zip(original.state_dict().values(), copied.state_dict().values()))
    tokenizer = load_tokenizer(init_dir)
    rows = encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len, {"qa": "qa", "rev": "rev"})
    assert len(rows) == 24 and {r["task"] for r in rows} == {"qa", "rev"}
    # the rows are the user's columns, tokenized by the model folder's own tokenizer
    pairs = {(tokenizer.decode(r["input_ids"][:r["response_start"]], skip_special_tokens=True),
              tokenizer.decode(r["input_ids"][r["response_start"]:], skip_special_tokens=True)) for r in rows}
    assert ("q3 ab", "a3") in pairs and ("abc5", "5cba") in pairs


def test_cli_rejects_a_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_model"
    result = _cli("base", f"runs_dir={tmp_path}", f"model.name_or_path={missing}", cwd=tmp_path)
    assert result.returncode == 2 and f"no model folder at '{missing}'" in result.stderr


def test_cli_rejects_data_missing_the_configured_column_naming_it(tmp_path, tiny_model_dir):
    config = user_config(tmp_path, tiny_model_dir, write_user_data(tmp_path))
    with open(config) as f:
        text = f.read().replace("response_column: answer", "response_column: reply")
    with open(config, "w") as f:
        f.write(text)
    result = _cli("experts", "--config", config, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "'reply'" in result.stderr and "qa_train.jsonl" in result.stderr and "answer" in result.stderr


def test_real_config_asks_for_hub_model_bf16_and_gpus_per_stage():
    cfg = load_config(REAL)  # no download: loading a config touches no model or data
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B" and cfg.model.dtype == "bfloat16"
    assert cfg.experts.resources.use_gpu and cfg.experts.resources.num_workers >= 2
    assert cfg.distill.resources.use_gpu and 0 < cfg.soft_targets.gpus_per_actor < 1
    assert not cfg.base.enabled and not cfg.tasks.builtin
    assert {(s.source, s.prompt_column != "prompt") for s in cfg.tasks.sources} == {("jsonl", True), ("parquet", True)}


@pytest.mark.parametrize("override", ["model.dtype=float16", "experts.resources.num_workers=0"])
def test_real_config_with_bad_gpu_settings_is_rejected(override):
    with pytest.raises(ValueError):
        load_config(REAL, [override])


# ---- user data from a `datasets` folder: DatasetDict.save_to_disk, and a folder laid out like a Hub repo ----------

def _rows(split: str, n: int) -> dict:
    return {"question": [f"{split} q{i}" for i in range(n)], "answer": [f"{split} a{i}" for i in range(n)],
            "id": list(range(n))}


def _folder_config(tmp_path, model_dir: str, folder, extra: str = "", response: str = "answer") -> str:
    path = tmp_path / "folder.yaml"
    path.write_text(f"""
model: {{name_or_path: {model_dir}, max_seq_len: 32}}
base: {{enabled: false}}
tasks:
  builtin: []
  sources:
    - {{name: qa, source: {folder}, prompt_column: question, response_column: {response}{extra}}}
""")
    return str(path)


def _assert_loaded_as_written(cfg, splits: dict[str, str]) -> None:
    """Every split holds exactly the rows written to the dataset's split `splits[split]`, in order."""
    preflight(cfg)  # what the CLI runs before any stage: every split of every task encoded with the model's tokenizer
    task = load_tasks(cfg.tasks)["qa"]
    for split, written in splits.items():
        expected = _rows(written, {"train": 6}.get(written, 3))
        assert [e.prompt for e in task.examples(split)] == expected["question"], split
        assert [e.response for e in task.examples(split)] == expected["answer"], split


def test_user_data_from_a_save_to_disk_folder_with_its_own_split_names(tmp_path, tiny_model_dir):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({s: datasets.Dataset.from_dict(_rows(s, 6 if s == "train" else 3))
                          for s in ("train", "heldout", "test")}).save_to_disk(str(folder))
    cfg = load_config(_folder_config(tmp_path, tiny_model_dir, folder, ", hub_splits: {validation: heldout}"))
    _assert_loaded_as_written(cfg, {"train": "train", "validation": "heldout", "test": "test"})


@pytest.mark.parametrize("layout", ["data/{split}-00000-of-00001.parquet", "{split}.jsonl", "data/{split}.csv"])
def test_user_data_from_a_folder_laid_out_like_a_hub_dataset_repo(tmp_path, tiny_model_dir, layout):
    import datasets

    folder = tmp_path / "repo"
    for split in ("train", "validation", "test"):
        path = folder / layout.format(split=split)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = datasets.Dataset.from_dict(_rows(split, 6 if split == "train" else 3))
        {"parquet": table.to_parquet, "jsonl": table.to_json, "csv": table.to_csv}[path.suffix[1:]](str(path))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# qa\nQuestions and answers.\n")
    cfg = load_config(_folder_config(tmp_path, tiny_model_dir, folder))
    _assert_loaded_as_written(cfg, {s: s for s in ("train", "validation", "test")})


def _load_error(tmp_path, model_dir, folder, extra="", response="answer"):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_tasks(load_config(_folder_config(tmp_path, model_dir, folder, extra, response)).tasks)
    return str(info.value)


def test_save_to_disk_folder_errors_name_the_folder_and_what_is_missing(tmp_path, tiny_model_dir):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_dict(_rows("train", 3)).save_to_disk(str(single))
    message = _load_error(tmp_path, tiny_model_dir, single)
    assert str(single) in message and "single Dataset" in message and "DatasetDict" in message

    two = tmp_path / "two_splits"
    datasets.DatasetDict({s: datasets.Dataset.from_dict(_rows(s, 3)) for s in ("train", "test")}).save_to_disk(str(two))
    message = _load_error(tmp_path, tiny_model_dir, two)
    assert str(two) in message and "validation (looked for 'validation')" in message and "['train', 'test']" in message

    message = _load_error(tmp_path, tiny_model_dir, two, ", hub_splits: {validation: test}", "reply")
    assert "'reply'" in message and f"split 'train' of '{two}'" in message and "'answer'" in message


def test_hub_style_folder_errors_name_the_folder_split_and_column(tmp_path, tiny_model_dir):
    missing = tmp_path / "no_such_folder"
    assert f"dataset folder '{missing}' does not exist" in _load_error(tmp_path, tiny_model_dir, missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"dataset folder '{empty}' is empty" in _load_error(tmp_path, tiny_model_dir, empty)

    folder = tmp_path / "repo"
    folder.mkdir()
    for split in ("train", "dev", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n"
                                                       for i in range(3)))
    message = _load_error(tmp_path, tiny_model_dir, folder, response="reply")  # dev.jsonl is the validation split
    assert f"of '{folder}' has no column 'reply'" in message and "'answer'" in message
    message = _load_error(tmp_path, tiny_model_dir, folder, ", hub_splits: {validation: heldout}")
    assert str(folder) in message and "validation (looked for 'heldout')" in message


def test_preflight_reads_the_finished_base_tokenizer_not_the_model_source_again(tmp_path, tiny_model_dir, monkeypatch):
    from dume_ray import cli, model
    from dume_ray.manifest import mark_done
    from dume_ray.stage_hashes import base_hash
    cfg = load_config(user_config(tmp_path, tiny_model_dir, write_user_data(tmp_path)), [f"runs_dir={tmp_path}/runs"])
    calls = []
    source = model.load_source_tokenizer
    monkeypatch.setattr(model, "load_source_tokenizer", lambda *a: calls.append(a) or source(*a))
    preflight(cfg)
    assert len(calls) == 1  # no base yet: the model source's tokenizer (a GGUF file is parsed here)
    base_model = create_initial_model(cfg.model, cfg.seed, f"{cfg.run_dir}/base/model", cfg.data)
    mark_done(f"{cfg.run_dir}/base", base_hash(cfg), {"model": base_model})
    before = len(calls)
    preflight(cfg)
    assert len(calls) == before  # the finished base's copy
    assert cli.preflight_tokenizer(cfg).get_vocab() == source(cfg.model, cfg.data).get_vocab()
    mark_done(f"{cfg.run_dir}/base", "another-config", {"model": base_model})
    preflight(cfg)
    assert len(calls) == before + 1  # a base of another config is not this run's: the source again


def test_preflight_warns_when_the_generation_cap_cuts_answers(tmp_path, tiny_model_dir, capsys):
    from dume_ray.cli import answers_cut_by_generation_cap
    files = write_user_data(tmp_path)
    config = user_config(tmp_path, tiny_model_dir, files)
    cfg = load_config(config, [f"runs_dir={tmp_path}/runs"])
    tokenizer = load_tokenizer(tiny_model_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    group_of = {t: g for g, names in cfg.groups.items() for t in names}
    rows = {s: encode_rows(tasks, tokenizer, s, cfg.model.max_seq_len, group_of) for s in ("validation", "test")}
    lengths: dict = {}  # (task, split) -> its longest answer
    for s in rows:
        for r in rows[s]:
            lengths[r["task"], s] = max(lengths.get((r["task"], s), 0), len(r["input_ids"]) - r["response_start"] - 1)
    longest = max(lengths.values())
    assert answers_cut_by_generation_cap(rows, longest) == {}  # an answer of exactly the cap still fits
    cut = answers_cut_by_generation_cap(rows, longest - 1)
    assert cut and all(c["longest"] == longest and c["rows"] >= 1 for c in cut.values())
    assert set(cut) == {f"{t}/{s}" for (t, s), n in lengths.items() if n == longest}
    preflight(load_config(config, [f"runs_dir={tmp_path}/runs", f"eval.max_new_tokens={longest - 1}"]))
    assert f"set eval.max_new_tokens={longest} to score them all" in capsys.readouterr().out
    preflight(load_config(config, [f"runs_dir={tmp_path}/runs", f"eval.max_new_tokens={longest}"]))
    assert "warning: eval.max_new_tokens" not in capsys.readouterr().out
