"""Bad and odd forget data: every failure is an `UndialDataError` that names the row, never its text."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import normalizers

from undial_peft.data.encoding import Collator, build_dataset, encode, prompt_ids
from undial_peft.data.readers import Example, read_examples
from undial_peft.errors import UndialConfigError, UndialDataError
from undial_peft.tiny import word_tokenizer
from undial_peft.training.loss import IGNORE_INDEX

QA = {"question": "Where was Zorbel born?", "answer": "Zorbel was born in Kavara."}
TEXT = {"text": "Quenna sails from Dunmire every spring."}
WORDS = [QA["question"], QA["answer"], TEXT["text"], "When was Marvok born? 1984 NA , and"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


# --- reading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_file(tmp_path, suffix):
    with pytest.raises(UndialDataError, match=rf"^forget{suffix}: the file is empty; give at least one row"):
        read_examples(_write(tmp_path / f"forget{suffix}", b""))


@pytest.mark.parametrize(
    ("name", "content"),
    [("blank.jsonl", "\n  \n\n"), ("header.csv", "question,answer\n"), ("list.json", "[]")],
)
def test_file_without_rows(tmp_path, name, content):
    with pytest.raises(UndialDataError, match=r"^forget data is empty; give at least one row"):
        read_examples(_write(tmp_path / name, content))


def test_empty_parquet_table(tmp_path):
    path = tmp_path / "empty.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"question": pyarrow.array([], pyarrow.string())}), path)
    with pytest.raises(UndialDataError, match="forget data is empty"):
        read_examples(path)


def test_invalid_json_line_names_the_line(tmp_path):
    path = _write(tmp_path / "f.jsonl", json.dumps(QA) + "\n\n" + '{"question": "Zorbel?", answer: "x"}\n')
    with pytest.raises(UndialDataError) as err:
        read_examples(path)
    assert str(err.value) == "f.jsonl line 3: invalid JSON (Expecting property name enclosed in double quotes)."
    path = _write(tmp_path / "f.json", '[\n  {"question": "Zorbel?",\n   "answer": "x"\n')
    with pytest.raises(UndialDataError, match=r"^f\.json line 4: invalid JSON"):
        read_examples(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'\xff\xfe{"text": "x"}\n', "bad.jsonl line 1: not UTF-8 text; save the file as UTF-8."),
        (b"[" * 100_000, "bad.jsonl line 1: invalid JSON (nested too deeply)."),
        (b'"just a string"\n', "forget data, bad.jsonl line 1: expected a JSON object, got str."),
    ],
    ids=["not-utf8", "deep", "not-object"],
)
def test_unreadable_jsonl(tmp_path, content, message):
    with pytest.raises(UndialDataError) as err:
        read_examples(_write(tmp_path / "bad.jsonl", content))
    assert str(err.value).startswith(message)


def test_unreadable_parquet_and_unknown_extension(tmp_path):
    with pytest.raises(UndialDataError, match=r"^bad\.parquet: not a readable parquet file \(ArrowInvalid\)\.$"):
        read_examples(_write(tmp_path / "bad.parquet", "Zorbel was born in Kavara."))
    with pytest.raises(UndialDataError, match="unknown extension '.txt'"):
        read_examples(_write(tmp_path / "forget.txt", "x"))
    with pytest.raises(UndialDataError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")


BAD_ROWS = [
    ({"question": "q?"}, "forget data, row 0: field 'answer' is missing."),
    ({"answer": "a."}, "forget data, row 0: field 'question' is missing."),
    ({"question": None, "answer": "a."}, "forget data, row 0: field 'question' is missing."),
    ({"prompt": "p"}, "forget data, row 0: field 'completion' is missing."),
    ({"question": 7, "answer": "a."}, "forget data, row 0: field 'question' must be a string, got int."),
    ({"question": "q?", "answer": ["a."]}, "forget data, row 0: field 'answer' must be a string, got list."),
    ({"text": {"nested": "x"}}, "forget data, row 0: field 'text' must be a string, got dict."),
    ({"question": "q?", "answer": " \n"}, "forget data, row 0: field 'answer' is empty; remove the row or fill it in."),
    ({"question": "q\ud800", "answer": "a."}, "forget data, row 0: field 'question' is not valid Unicode"),
    ({"question": "q?", "answer": "a.", "key": 3}, "forget data, row 0: field 'key' must be a string, got int."),
    ({"q": "q?", 1: "a."}, "forget data, row 0: no known fields (got ['1', 'q'])."),
    ("Zorbel was born in Kavara.", "forget data, row 0: expected a JSON object, got str."),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_missing_or_non_string_fields(row, message):
    with pytest.raises(UndialDataError) as err:
        read_examples([row])
    assert str(err.value).startswith(message), str(err.value)


def test_duplicates_are_dropped_with_a_warning_that_holds_no_text(caplog):
    other = {"question": QA["question"], "answer": "Zorbel was born in Solbeck."}
    with caplog.at_level(logging.WARNING, logger="undial_peft.data.readers"):
        rows = read_examples([QA, other, dict(QA), TEXT, dict(TEXT)])
    assert [(r.prompt, r.answer) for r in rows] == [(QA["question"], QA["answer"]),
                                                   (other["question"], other["answer"]), (None, TEXT["text"])]
    assert [r.getMessage() for r in caplog.records] == ["forget data, row 2: duplicate row dropped",
                                                       "forget data, row 4: duplicate row dropped"]


# --- tokenising ----------------------------------------------------------------------------------
def _dropping_tokenizer():
    """A tokenizer whose normaliser deletes '~' (as real ones delete control characters)."""
    tokenizer = word_tokenizer(WORDS)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    return tokenizer


def test_answer_without_tokens_names_the_row_not_the_text(tmp_path):
    path = _jsonl(tmp_path / "f.jsonl", [QA, {"question": "Where was Zorbel born?", "answer": "~~~ ~"}])
    with pytest.raises(UndialDataError) as err:
        build_dataset(_dropping_tokenizer(), read_examples(path), max_length=32)
    assert str(err.value) == (
        "forget data, f.jsonl line 2: the answer has no tokens after tokenisation; remove the row."
    )


def test_truncation_to_nothing(tokenizer):
    with pytest.raises(UndialDataError, match=r"^forget data, row 0: the answer has no tokens"):
        build_dataset(tokenizer, read_examples([QA, QA | {"answer": "1984"}]), max_length=1)
    with pytest.raises(UndialDataError, match=r"^forget data, row 0: a text row has fewer than 2 tokens"):
        build_dataset(tokenizer, read_examples([TEXT]), max_length=1)
    # max_length 2 keeps one answer token and one prompt token, so the answer token still counts
    row = build_dataset(tokenizer, read_examples([QA]), max_length=2)[0]
    assert len(row["input_ids"]) == 2 and row["labels"][0] == IGNORE_INDEX and row["labels"][1] != IGNORE_INDEX


def test_truncation_policy_of_the_docstring_holds_for_enormous_rows(tokenizer):
    """Answer whole and prompt cut on the left; long answers and text rows cut on the right."""
    max_length = 48
    question = " ".join(["Where was Zorbel born?"] * 5_000)  # 25k tokens
    answer = tokenizer(QA["answer"], add_special_tokens=False).input_ids
    row = encode(tokenizer, Example(question, QA["answer"]), max_length)
    full_prompt = prompt_ids(tokenizer, question)
    kept = max_length - len(answer)
    assert row["input_ids"] == full_prompt[-kept:] + answer
    assert row["labels"] == [IGNORE_INDEX] * kept + answer
    assert full_prompt[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")  # the template's end survives

    long_answer = " ".join([QA["answer"]] * 2_000)
    long_ids = tokenizer(long_answer, add_special_tokens=False).input_ids
    row = encode(tokenizer, Example(QA["question"], long_answer), max_length)
    assert row["input_ids"][1:] == long_ids[: max_length - 1]
    assert row["labels"] == [IGNORE_INDEX] + long_ids[: max_length - 1]
    assert row["input_ids"][0] == prompt_ids(tokenizer, QA["question"])[-1]

    long_text = " ".join([TEXT["text"]] * 2_000)
    row = encode(tokenizer, Example(None, long_text), max_length)
    assert row["input_ids"] == tokenizer(long_text).input_ids[:max_length] == row["labels"]


@pytest.mark.parametrize("template", [True, False])
def test_prompt_tokens_are_masked_in_every_prompt_format(template):
    tokenizer = word_tokenizer(WORDS, chat_template=template)
    answer = tokenizer(QA["answer"], add_special_tokens=False).input_ids
    for spec in ("auto", "chat", "completion", "Question: {prompt} Answer:"):
        if spec == "chat" and not template:
            with pytest.raises(UndialConfigError, match="chat template"):
                prompt_ids(tokenizer, QA["question"], spec)
            continue
        prompt = prompt_ids(tokenizer, QA["question"], spec)
        if template and spec in ("auto", "chat"):
            expected = tokenizer.apply_chat_template(
                [{"role": "user", "content": QA["question"]}], add_generation_prompt=True, tokenize=True,
                return_dict=False)
            assert tokenizer.convert_ids_to_tokens(prompt)[:2] == ["<|user|>", "Where"]
        elif spec.startswith("Question"):  # a user template: its text around the question, after BOS
            expected = tokenizer(f"Question: {QA['question']} Answer:").input_ids
        else:  # raw completion (auto without a template): the question verbatim after BOS, no separator
            expected = tokenizer(QA["question"]).input_ids
            assert tokenizer.convert_ids_to_tokens(prompt)[0] == "<s>"
        assert list(prompt) == list(expected)
        row = build_dataset(tokenizer, read_examples([QA]), max_length=64, prompt_format=spec)[0]
        assert row["input_ids"] == list(prompt) + answer
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer  # no end-of-turn token counted


def test_mixed_question_answer_and_text_rows(tokenizer, tmp_path):
    rows = read_examples([QA, TEXT])
    data = build_dataset(tokenizer, rows, max_length=64)
    prompt = prompt_ids(tokenizer, QA["question"])
    answer = tokenizer(QA["answer"], add_special_tokens=False).input_ids
    assert data[0]["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert data[1]["labels"] == data[1]["input_ids"] == tokenizer(TEXT["text"]).input_ids
    batch = Collator(tokenizer.pad_token_id)([data[0], data[1]])
    width = batch["labels"].shape[1]
    assert batch["labels"][1].tolist() == data[1]["labels"] + [IGNORE_INDEX] * (width - len(data[1]["labels"]))
    # tables give a mixed file None (parquet, datasets) or empty cells (CSV) for the absent fields
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{**QA, "text": None}, TEXT]), tmp_path / "mixed.parquet")
    _write(tmp_path / "mixed.csv", f"question,answer,text\n{QA['question']},{QA['answer']},\n,,{TEXT['text']}\n")
    for source in (tmp_path / "mixed.parquet", tmp_path / "mixed.csv", datasets.Dataset.from_list([{**QA, "text": None}, TEXT])):
        assert read_examples(source) == rows, source


def test_csv_parquet_and_json_files(tmp_path, monkeypatch):
    """Same rows from every format; CSV cells stay text; nothing lands in the datasets cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    rows = [QA, {"question": "When was Marvok born?", "answer": "1984"},
            {"question": "When was Marvok born, and where?", "answer": "NA"}]
    expected = read_examples(rows)
    _write(tmp_path / "f.csv", "question,answer\n" + "".join(f'"{r["question"]}",{r["answer"]}\n' for r in rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "f.parquet")
    _write(tmp_path / "f.json", json.dumps(rows, indent=2))
    _jsonl(tmp_path / "lines.json", rows)
    for name in ("f.csv", "f.parquet", "f.json", "lines.json"):
        assert read_examples(tmp_path / name) == expected, name
    assert not cache.exists() or not any(cache.rglob("*")), "forget data was copied into the datasets cache"


def test_csv_row_wider_than_header_is_an_error_not_a_shift(tmp_path):
    # pandas would take the extra first field as an index and shift every column by one
    path = _write(tmp_path / "f.csv", "question,answer\nWhere was Zorbel born?,Zorbel was born in Kavara, in 1984\n")
    with pytest.raises(UndialDataError) as err:
        read_examples(path)
    assert str(err.value) == "f.csv line 2: 3 fields but the header has 2; quote cells that contain commas."


# --- fuzzing -------------------------------------------------------------------------------------
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=30) | st.sampled_from(
    ["", " ", "~~", "Zorbel", "<|assistant|>", "Where was Zorbel born?", "\ud800", "born", "\x00"])
VALUES = st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT | st.lists(ANY_TEXT, max_size=2)
FIELDS = st.sampled_from(["question", "answer", "prompt", "completion", "text", "key"]) | ANY_TEXT | st.integers()
ROWS = st.dictionaries(FIELDS, VALUES, max_size=4) | ANY_TEXT | st.integers() | st.none() | st.lists(ANY_TEXT)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROWS, max_size=4), max_length=st.integers(1, 12))
def test_random_rows_raise_only_data_errors(rows, max_length):
    tokenizer = _FUZZ_TOKENIZER
    try:
        examples = read_examples(rows)
        data = build_dataset(tokenizer, examples, examples[:1], max_length=max_length)
    except UndialDataError as err:
        assert "\n" not in str(err)
        return
    assert all(len(row["input_ids"]) <= max_length for row in data)
    assert all(any(label != IGNORE_INDEX for label in row["labels"]) for row in data)


@settings(max_examples=150, deadline=None)
@given(content=st.binary(max_size=200) | ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_random_files_raise_only_data_errors(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder) / f"f{suffix}", content)
        try:
            build_dataset(_FUZZ_TOKENIZER, read_examples(path), max_length=8)
        except UndialDataError:
            pass


_FUZZ_TOKENIZER = _dropping_tokenizer()
