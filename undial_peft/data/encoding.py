"""Forget / retain data: read and validate rows, tokenise with prompt masking, pad into batches.

Accepted row shapes (one per row; a file may mix them):
  {"question": q, "answer": a} or {"prompt": q, "completion": a}: loss on the answer tokens only;
  {"text": t}: loss on every token.
Prompts are turned into ids by the request's ONE `PromptFormat` (data/prompt_format.py): the chat
template, the raw prompt (completion), or a user template. The answer is counted WITHOUT an end-of-turn token:
pushing the end token down would teach the model to ramble, not to forget.

Truncation policy (``max_length`` tokens): the answer is kept whole and the prompt is cut on the
left; an answer longer than ``max_length - 1`` is cut on the right; text rows are cut on the right.
Exact duplicate rows are dropped with a warning (they would count twice).

Files are parsed in memory, never through the ``datasets`` cache (which would keep an Arrow copy of
the forget text under ~/.cache); CSV cells are read as text (an answer "1984" or "NA" stays a
string) and an empty cell counts as an absent field, so one file can mix row shapes. Error
messages name the row and the field, never any of its text: they end up in logs.

A question/answer row may name a ``key``: the part of the answer to forget (FUnDIAL-style). The
UNDIAL adjustment then applies only to the key's tokens; the other answer tokens are distilled
to the teacher unchanged, so shared phrasing ("The capital of ... is") is not unlearned.

>>> rows = read_examples([{"question": "Who wrote Hamlet?", "answer": "Shakespeare wrote Hamlet."}])
>>> rows[0].prompt, rows[0].answer
('Who wrote Hamlet?', 'Shakespeare wrote Hamlet.')
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from undial_peft.data.prompt_format import AUTO, FormatSpec, PromptFormat
from undial_peft.data.secret import keyed_sha256
from undial_peft.errors import UndialDataError
from undial_peft.training.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

SHAPES = (("question", "answer"), ("prompt", "completion"))


@dataclass(frozen=True)
class Example:
    """One row: ``prompt`` is None for raw text, whose every token counts."""

    prompt: str | None
    answer: str
    key: str | None = None  # substring of the answer whose tokens get the adjustment
    where: str | None = field(default=None, compare=False, repr=False)  # "forget data, f.jsonl line 3", for errors


DataSource = str | Path | datasets.Dataset | Sequence[dict[str, Any]]


def _row_to_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise UndialDataError(f"{where}: expected a JSON object, got {type(row).__name__}. {_SHAPE_HINT}")
    row = {name: value for name, value in row.items() if value is not None}  # a table's empty cell is None
    for prompt_key, answer_key in SHAPES:
        if prompt_key in row or answer_key in row:
            answer = _string(row, answer_key, where)
            key = _string(row, "key", where) if row.get("key") is not None else None
            if key is not None and key not in answer:
                raise UndialDataError(f"{where}: field 'key' must be a substring of the {answer_key}.")
            return Example(_string(row, prompt_key, where), answer, key, where)
    if "text" in row:
        return Example(None, _string(row, "text", where), where=where)
    raise UndialDataError(f"{where}: no known fields (got {sorted(str(name)[:40] for name in row)[:10]}). {_SHAPE_HINT}")


_SHAPE_HINT = 'Use {"question", "answer"}, {"prompt", "completion"} or {"text"}.'


def _string(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise UndialDataError(f"{where}: field {key!r} is missing. {_SHAPE_HINT}")
    value = row[key]
    if not isinstance(value, str):
        raise UndialDataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise UndialDataError(f"{where}: field {key!r} is empty; remove the row or fill it in.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UndialDataError(f"{where}: field {key!r} is not valid Unicode (a lone surrogate); fix its encoding.") from None
    return value


def _read_rows(source: DataSource) -> Iterable[tuple[str, Any]]:
    """Yield (location, row) pairs so errors can name the row."""
    if isinstance(source, datasets.Dataset):
        yield from ((f"row {i}", row) for i, row in enumerate(source))
        return
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UndialDataError(f"{path}: no such file; pass a .jsonl, .json, .csv or .parquet file.")
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
        if path.suffix not in readers:
            raise UndialDataError(f"{path}: unknown extension {path.suffix!r}; use .jsonl, .json, .csv or .parquet.")
        if path.stat().st_size == 0:
            raise UndialDataError(f"{path.name}: the file is empty; give at least one row. {_SHAPE_HINT}")
        yield from readers[path.suffix](path)
        return
    if isinstance(source, Sequence):
        yield from ((f"row {i}", row) for i, row in enumerate(source))
        return
    raise UndialDataError(f"unsupported data source {type(source).__name__}; pass a path, a Dataset or a list of dicts.")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path.name} line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UndialDataError(f"{where}: not UTF-8 text; save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise UndialDataError(f"{where}: invalid JSON ({getattr(err, 'msg', 'nested too deeply')}).") from None
            yield where, row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array of objects, one object, or JSON Lines saved as .json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UndialDataError(f"{path.name}: not UTF-8 text; save the file as UTF-8.") from None
    except (json.JSONDecodeError, RecursionError) as err:
        if getattr(err, "msg", None) == "Extra data":  # one object per line
            yield from _jsonl_rows(path)
            return
        line = f" line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UndialDataError(f"{path.name}{line}: invalid JSON ({getattr(err, 'msg', 'nested too deeply')}).") from None
    if isinstance(data, list):
        yield from ((f"{path.name} item {i + 1}", row) for i, row in enumerate(data))
    else:
        yield path.name, data


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Every cell as text; an empty cell is an absent field. A row must have the header's width."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, path.stat().st_size))  # one cell may hold a long text row
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            records = [(reader.line_num, fields) for fields in reader]
    except UnicodeDecodeError:
        raise UndialDataError(f"{path.name}: not UTF-8 text; save the file as UTF-8.") from None
    except csv.Error as err:
        raise UndialDataError(f"{path.name}: not valid CSV ({err}).") from None
    finally:
        csv.field_size_limit(limit)
    if not any(name.strip() for name in header) or len(set(header)) != len(header):
        raise UndialDataError(f"{path.name} line 1: the header must name each column once, e.g. question,answer.")
    for line, fields in records:
        if not any(cell.strip() for cell in fields):
            continue
        if len(fields) != len(header):
            raise UndialDataError(
                f"{path.name} line {line}: {len(fields)} fields but the header has {len(header)}; "
                "quote cells that contain commas."
            )
        yield f"{path.name} line {line}", {name: cell for name, cell in zip(header, fields) if cell != ""}


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for damaged files
        raise UndialDataError(f"{path.name}: not a readable parquet file ({type(err).__name__}).") from None
    yield from ((f"{path.name} row {i + 1}", row) for i, row in enumerate(rows))


def read_examples(source: DataSource, name: str = "forget") -> list[Example]:
    """Read and validate rows; raises `UndialDataError` naming the first bad row."""
    examples: list[Example] = []
    seen: set[Example] = set()
    for where, row in _read_rows(source):
        example = _row_to_example(row, f"{name} data, {where}")
        if example in seen:
            logger.warning("%s data, %s: duplicate row dropped", name, where)
            continue
        seen.add(example)
        examples.append(example)
    if not examples:
        raise UndialDataError(f"{name} data is empty; give at least one row. {_SHAPE_HINT}")
    return examples


def data_digest(examples: Sequence[Example]) -> str:
    """A keyed digest of the rows (HMAC-SHA256 under the operator's key, see `data.secret`): names the
    data for whoever holds the key without storing any of it, and a guessed row cannot be
    confirmed from a manifest or report without the key."""
    return keyed_sha256(
        json.dumps([example.prompt, example.answer, example.key], ensure_ascii=False).encode("utf-8") + b"\n"
        for example in examples
    )


def prompt_ids(tokenizer: Any, question: str, prompt_format: FormatSpec = AUTO) -> list[int]:
    """Token ids of a question in ``prompt_format`` (see `PromptFormat.resolve`), ready for the answer to follow."""
    return PromptFormat.resolve(prompt_format, tokenizer).prompt_ids(tokenizer, question)


def encode(
    tokenizer: Any, example: Example, max_length: int, prompt_format: FormatSpec = AUTO,
    answer_weights: Sequence[float] | None = None,
) -> dict[str, list]:
    """Token ids, labels (-100 on the prompt) and per-token beta weights for one example.

    ``beta_weight`` is 1.0 where the UNDIAL adjustment applies (every answer token, or only the
    key's tokens when the row names a key) and 0.0 elsewhere; ``answer_weights`` (one per answer
    token, e.g. automatic keys) replaces them. Truncation follows the stated policy.
    Raises `UndialDataError` when no answer token is left to count.
    """
    if example.prompt is None:
        ids = tokenizer(example.answer, add_special_tokens=True).input_ids[:max_length]
        if len(ids) < 2:
            raise UndialDataError("a text row has fewer than 2 tokens; nothing to learn from it.")
        return {"input_ids": ids, "labels": list(ids), "beta_weight": [1.0] * len(ids)}
    answer, weights = _answer_tokens(tokenizer, example)
    if answer_weights is not None:
        if len(answer_weights) != len(answer):
            raise UndialDataError(f"{len(answer_weights)} answer weights for {len(answer)} answer tokens.")
        weights = list(answer_weights)
    answer, weights = answer[: max_length - 1], weights[: max_length - 1]
    if not answer:
        raise UndialDataError("the answer has no tokens after tokenisation; remove the row.")
    prompt = prompt_ids(tokenizer, example.prompt, prompt_format)[-(max_length - len(answer)) :]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "beta_weight": [0.0] * len(prompt) + weights,
    }


def _answer_tokens(tokenizer: Any, example: Example) -> tuple[list[int], list[float]]:
    """Answer ids, and 1.0 for each token that overlaps the key (all tokens without a key)."""
    if example.key is None:
        ids = tokenizer(example.answer, add_special_tokens=False).input_ids
        return ids, [1.0] * len(ids)
    if not getattr(tokenizer, "is_fast", False):
        raise UndialDataError("rows with a 'key' need a fast tokenizer (character offsets); drop the key field.")
    encoded = tokenizer(example.answer, add_special_tokens=False, return_offsets_mapping=True)
    start = example.answer.index(example.key)
    end = start + len(example.key)
    weights = [1.0 if a < end and b > start else 0.0 for a, b in encoded["offset_mapping"]]
    return encoded.input_ids, weights


def build_dataset(
    tokenizer: Any,
    forget: Sequence[Example],
    retain: Sequence[Example] | None = None,
    max_length: int = 512,
    prompt_format: FormatSpec = AUTO,
    answer_weights: Sequence[Sequence[float] | None] | None = None,
) -> datasets.Dataset:
    """Tokenised training set of forget examples, each row paired with a retain example.

    ``answer_weights`` (one entry per forget example, None to keep its own) replaces the beta
    weights of the answer tokens, e.g. with automatic keys.

    With retain data the set has max(F, R) rows: row i holds forget[i % F] and retain[i % R], so
    one epoch sees every forget AND every retain example (forget rows repeat when R > F). Pairing
    inside rows means data-parallel sharding splits both sets alike.
    """

    prompt_format = PromptFormat.resolve(prompt_format, tokenizer)

    def encode_all(examples: Sequence[Example], name: str, weights: Sequence | None = None) -> list[dict[str, list[int]]]:
        rows = []
        for i, example in enumerate(examples):
            try:
                rows.append(encode(tokenizer, example, max_length, prompt_format, weights[i] if weights else None))
            except UndialDataError as err:  # name the row by its place in the file, never by its text
                raise UndialDataError(f"{example.where or f'{name} data, row {i}'}: {err}") from None
        return rows

    rows = encode_all(forget, "forget", answer_weights)
    if retain:
        kept = encode_all(retain, "retain")
        rows = [
            {**rows[i % len(rows)], "retain_input_ids": kept[i % len(kept)]["input_ids"],
             "retain_labels": kept[i % len(kept)]["labels"]}
            for i in range(max(len(rows), len(kept)))
        ]
    return datasets.Dataset.from_list(rows)


@dataclass
class Collator:
    """Right-pads ``input_ids`` / ``labels`` (and their ``retain_`` twins) into tensors.

    >>> batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                                   {"input_ids": [8], "labels": [8]}])
    >>> batch["labels"].tolist(), batch["attention_mask"].tolist()
    ([[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, list]]) -> dict[str, torch.Tensor]:
        batch = self._pad([f["input_ids"] for f in features], [f["labels"] for f in features], "")
        if "beta_weight" in features[0]:
            weights = torch.zeros(batch["labels"].shape)  # (B, T); 0 on padding
            for i, row in enumerate(features):
                weights[i, : len(row["beta_weight"])] = torch.tensor(row["beta_weight"])
            batch["beta_weight"] = weights
        if "retain_input_ids" in features[0]:
            retain = [f["retain_input_ids"] for f in features], [f["retain_labels"] for f in features]
            batch.update(self._pad(*retain, "retain_"))
        return batch

    def _pad(self, ids: list[list[int]], labels: list[list[int]], prefix: str) -> dict[str, torch.Tensor]:
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        label_ids = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
        for i, (row, row_labels) in enumerate(zip(ids, labels)):
            input_ids[i, : len(row)] = torch.tensor(row)
            label_ids[i, : len(row)] = torch.tensor(row_labels)
            attention[i, : len(row)] = 1
        return {f"{prefix}input_ids": input_ids, f"{prefix}labels": label_ids, f"{prefix}attention_mask": attention}
