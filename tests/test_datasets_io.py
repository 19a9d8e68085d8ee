"""TOFU / MUSE names resolved from a local folder of fixtures in the hubs' own field names (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet
import pytest
import torch
from conftest import make_facts

from undial_peft.cli import main
from undial_peft.data.named import load_rows, parse_name
from undial_peft.errors import UndialDataError
from undial_peft.evals.report import UTILITY_COMPONENTS, evaluate
from undial_peft.models import load_model

FACTS = make_facts()


def _tofu_perturbed(facts: list[dict[str, str]]) -> list[dict]:
    """locuslab/TOFU ``*_perturbed`` rows: question, answer, paraphrased_answer, paraphrased_question,
    perturbed_answer (a list)."""
    rows = []
    for i, f in enumerate(facts):
        name, city = f["question"].split()[2], f["answer"].split()[-1].rstrip(".")
        others = [FACTS[(i + j) % len(FACTS)]["answer"].split()[-1].rstrip(".") for j in (1, 2, 3)]
        rows.append({
            "question": f["question"],
            "answer": f["answer"],
            "paraphrased_question": f"Where was {name} born ?",
            "paraphrased_answer": f"{name} was born in {city} .",
            "perturbed_answer": [f"{name} was born in {o}." for o in others],
        })
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-data")
    _write(root / "tofu" / "forget10.jsonl", [{"question": f["question"], "answer": f["answer"]} for f in FACTS[:4]])
    _write(root / "tofu" / "forget10_perturbed.jsonl", _tofu_perturbed(FACTS[:4]))
    _write(root / "tofu" / "holdout10.jsonl", [{"question": f["question"], "answer": f["answer"]} for f in FACTS[4:8]])
    _write(root / "tofu" / "retain_perturbed.jsonl", _tofu_perturbed(FACTS[8:12]))
    # real_authors / world_facts: no paraphrase, the answer is the true option among the perturbed ones
    for name, part in (("real_authors_perturbed", FACTS[12:14]), ("world_facts_perturbed", FACTS[14:16])):
        _write(root / "tofu" / f"{name}.jsonl",
               [{k: r[k] for k in ("question", "answer", "perturbed_answer")} for r in _tofu_perturbed(part)])
    # MUSE (muse-bench/MUSE-News): knowmem question/answer, verbmem prompt/gt, privleak text
    _write(root / "muse" / "news" / "knowmem" / "forget_qa.jsonl", [{"question": f["question"], "answer": f["answer"]} for f in FACTS[:3]])
    _write(root / "muse" / "news" / "knowmem" / "forget_qa_icl.jsonl", [{"question": f["question"], "answer": f["answer"]} for f in FACTS[12:14]])
    _write(root / "muse" / "news" / "verbmem" / "forget.jsonl", [{"prompt": f["question"], "gt": f["answer"]} for f in FACTS[:3]])
    _write(root / "muse" / "news" / "privleak" / "forget.jsonl", [{"text": f["answer"]} for f in FACTS[:4]])
    _write(root / "muse" / "news" / "privleak" / "holdout.jsonl", [{"text": f["answer"]} for f in FACTS[4:8]])
    return root


def test_names_parse_and_bad_names_say_the_valid_shapes():
    assert parse_name("muse:books/privleak/holdout").hub_path == "muse-bench/MUSE-Books"
    assert parse_name("tofu:world_facts_perturbed").hub_path == "locuslab/TOFU"
    for bad in ("tofu:", "muse:news/knowmem", "muse:wiki/knowmem/forget_qa", "tofu:a/b"):
        with pytest.raises(UndialDataError, match="expected tofu:<config>"):
            parse_name(bad)


def test_rows_come_back_in_our_field_names(data_dir):
    rows = load_rows("tofu:forget10_perturbed", data_dir)
    assert len(rows) == 4 and rows[0]["perturbed_answers"] == _tofu_perturbed(FACTS[:1])[0]["perturbed_answer"]
    assert rows[0]["paraphrased_question"] == "Where was Zorbel born ?"
    assert load_rows("tofu:world_facts_perturbed", data_dir)[1] == {
        "question": FACTS[15]["question"], "answer": FACTS[15]["answer"],
        "perturbed_answers": _tofu_perturbed(FACTS[14:16])[1]["perturbed_answer"]}
    assert load_rows("muse:news/verbmem/forget", data_dir)[0] == {
        "prompt": FACTS[0]["question"], "completion": FACTS[0]["answer"], "protocol": "muse_verbmem"}
    assert load_rows("muse:News/privleak/holdout", data_dir)[0] == {"text": FACTS[4]["answer"], "protocol": "muse_privleak"}
    assert load_rows("muse:news/knowmem/forget_qa", data_dir)[0] == {
        "question": FACTS[0]["question"], "answer": FACTS[0]["answer"], "protocol": "muse_knowmem",
        "few_shot": [{"question": f["question"], "answer": f["answer"]} for f in FACTS[12:14]]}


def test_local_files_leave_no_copy_in_the_datasets_cache(tmp_path, monkeypatch):
    """Local splits are parsed in memory: no Arrow copy of the text under the datasets cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    marker = "Ovrelind was born in Quastral."  # in no other fixture, so no earlier run can have cached it
    rows = [{"question": "Where was Ovrelind born?", "answer": marker}]
    _write(tmp_path / "tofu" / "forget01.jsonl", rows)
    (tmp_path / "tofu" / "forget05.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "muse" / "news" / "privleak").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"text": marker}]),
                                tmp_path / "muse" / "news" / "privleak" / "forget.parquet")
    assert load_rows("tofu:forget01", tmp_path) == rows == load_rows("tofu:forget05", tmp_path)
    assert load_rows("muse:news/privleak/forget", tmp_path)[0]["text"] == marker
    copies = [f for f in cache.rglob("*") if f.is_file() and marker.encode() in f.read_bytes()] if cache.exists() else []
    assert not copies, f"forget text copied into the datasets cache: {copies}"


def _spy_generate(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[list[int]], int]]:
    """Record, per `generate` call, each row's prompt ids (left padding removed) and max_new_tokens."""
    calls, real = [], model.generate

    def spy(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        calls.append(([row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)], max_new_tokens))
        return real(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_muse_verbmem_and_knowmem_prompt_as_muse_does(tiny_dir, data_dir, monkeypatch):
    """MUSE / open-unlearning: VerbMem continues the raw prompt (BOS, no chat template, no newline)
    for 128 tokens; KnowMem asks after the forget_qa_icl examples, for 32 tokens; neither takes
    evaluate's own max_new_tokens."""
    model, tokenizer = load_model(tiny_dir)
    calls = _spy_generate(model, monkeypatch)
    verbmem = load_rows("muse:news/verbmem/forget", data_dir)
    evaluate(model, tokenizer, verbmem, max_new_tokens=8)
    assert calls == [([tokenizer(f["question"]).input_ids for f in FACTS[:3]], 128)]
    calls.clear()
    evaluate(model, tokenizer, load_rows("muse:news/knowmem/forget_qa", data_dir), max_new_tokens=8)
    shots = "".join(f"Question: {f['question']}\nAnswer: {f['answer']}\n\n" for f in FACTS[12:14])
    expected = [f"{shots}Question: {f['question']}\nAnswer: " for f in FACTS[:3]]
    assert calls == [([tokenizer(text).input_ids for text in expected], 32)]
    # the exact strings (the word tokenizer above drops newlines), the scored tokens and the stop words
    from undial_peft.evals.items import PROTOCOLS, item_prompt, read_eval_items
    from undial_peft.evals.report import item_features
    from undial_peft.evals.scoring import cut_at_stop

    knowmem = read_eval_items(load_rows("muse:news/knowmem/forget_qa", data_dir))
    assert [item_prompt(it) for it in knowmem] == expected
    item = read_eval_items(verbmem)[0]
    assert item_prompt(item) == FACTS[0]["question"]
    full, prompt = tokenizer(f"{FACTS[0]['question']} {FACTS[0]['answer']}").input_ids, tokenizer(FACTS[0]["question"]).input_ids
    assert item_features(tokenizer, item, max_length=512, prompt_format="chat") == {
        "input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]}
    stop = PROTOCOLS["muse_knowmem"].stop
    assert cut_at_stop(" Kavara.\nQuestion: Where", stop) == "Kavara."
    assert cut_at_stop("\n\nKavara.", stop) == ""  # cut before stripping, as open-unlearning


def test_muse_privleak_scores_up_to_2048_text_tokens(tiny_dir, tmp_path, monkeypatch):
    """MUSE_MIA (open-unlearning): privleak texts are cut at 2048 tokens after BOS, not at evaluate's 512."""
    model, tokenizer = load_model(tiny_dir)
    long = " ".join([FACTS[0]["answer"]] * 500)  # 3,000 tokens
    _write(tmp_path / "muse" / "news" / "privleak" / "forget.jsonl", [{"text": long}, {"text": FACTS[1]["answer"]}])
    _write(tmp_path / "muse" / "news" / "privleak" / "holdout.jsonl", [{"text": f["answer"]} for f in FACTS[4:6]])
    widths, real = [], model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        widths.append(kwargs["input_ids"].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    evaluate(model, tokenizer, load_rows("muse:news/privleak/forget", tmp_path),
             holdout=load_rows("muse:news/privleak/holdout", tmp_path), generate=False)
    assert max(widths) == 1 + 2048


def test_missing_split_offline_says_where_to_put_it(data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UndialDataError) as err:
        load_rows("tofu:forget05", data_dir)
    message = str(err.value)
    assert str(data_dir / "tofu" / "forget05") + ".jsonl" in message and "--data-dir" in message
    assert "load_dataset('locuslab/TOFU', 'forget05', split='train')" in message
    monkeypatch.setenv("UNDIAL_DATA_DIR", str(data_dir))  # the environment variable instead of the argument
    assert len(load_rows("tofu:forget10")) == 4


def test_knowmem_without_its_icl_split_says_which_file_to_add(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write(tmp_path / "muse" / "news" / "knowmem" / "retain_qa.jsonl", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(UndialDataError, match="retain_qa_icl.jsonl"):
        load_rows("muse:news/knowmem/retain_qa", tmp_path)


def test_tofu_and_muse_fixtures_evaluate(tiny_dir, data_dir):
    model, tokenizer = load_model(tiny_dir)
    tofu = {k: load_rows(f"tofu:{v}", data_dir) for k, v in (
        ("forget", "forget10_perturbed"), ("holdout", "holdout10"), ("retain", "retain_perturbed"),
        ("real_authors", "real_authors_perturbed"), ("world_facts", "world_facts_perturbed"))}
    report = evaluate(model, tokenizer, **tofu, max_new_tokens=8)
    top = report["summary"]
    assert list(top["model_utility_components"]) == list(UTILITY_COMPONENTS) and 0 < top["model_utility"] <= 1
    assert len(report["splits"]["forget"]["items"]["truth_ratio"]) == 4 and "mia_auc" in top
    muse = evaluate(model, tokenizer, load_rows("muse:news/privleak/forget", data_dir),
                    holdout=load_rows("muse:news/privleak/holdout", data_dir), generate=False)
    assert set(muse["summary"]["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}


def test_cli_eval_and_forget_take_names(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach for the network
    out = tmp_path / "report.json"
    code = main(["eval", "--model", tiny_dir, "--forget", "tofu:forget10_perturbed", "--retain", "tofu:retain_perturbed",
                 "--data-dir", str(data_dir), "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["splits"]["forget"]["n_items"] == 4
    adapter = tmp_path / "req"
    code = main(["forget", "--model", tiny_dir, "--data", "tofu:forget10", "--data-dir", str(data_dir),
                 "--out", str(adapter), "--max-steps", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").is_file()
    code = main(["eval", "--model", tiny_dir, "--forget", "tofu:nope", "--data-dir", str(data_dir)])
    assert code == 2 and "tofu/nope.jsonl" in capsys.readouterr().err
