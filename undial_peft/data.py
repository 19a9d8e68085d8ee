"""Forget / retain data: read and validate rows, tokenise with prompt masking, pad into batches.

Accepted row shapes (one per row; a file may mix them):
  {"question": q, "answer": a} or {"prompt": q, "completion": a}: loss on the answer tokens only;
  {"text": t}: loss on every token.
Questions go through the tokenizer's chat template when it has one (``use_chat_template=False``
opts out; then the prompt is ``q + "\\n"``). The answer is counted WITHOUT an end-of-turn token:
pushing the end token down would teach the model to ramble, not to forget.

Truncation policy (``max_length`` tokens): the answer is kept whole and the prompt is cut on the
left; an answer longer than ``max_length - 1`` is cut on the right; text rows are cut on the right.
Exact duplicate rows are dropped with a warning (they would count twice).

>>> rows = read_examples([{"question": "Who wrote Hamlet?", "answer": "Shakespeare wrote Hamlet."}])
>>> rows[0].prompt, rows[0].answer
('Who wrote Hamlet?', 'Shakespeare wrote Hamlet.')
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from .loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

SHAPES = (("question", "answer"), ("prompt", "completion"))


class UndialDataError(ValueError):
    """Bad forget or retain data; the message names the row and the fix."""


@dataclass(frozen=True)
class Example:
    """One row: ``prompt`` is None for raw text, whose every token counts."""

    prompt: str | None
    answer: str


DataSource = str | Path | datasets.Dataset | Sequence[dict[str, Any]]


def _row_to_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise UndialDataError(f"{where}: expected a JSON object, got {type(row).__name__}. {_SHAPE_HINT}")
    for prompt_key, answer_key in SHAPES:
        if prompt_key in row or answer_key in row:
            return Example(_string(row, prompt_key, where), _string(row, answer_key, where))
    if "text" in row:
        return Example(None, _string(row, "text", where))
    raise UndialDataError(f"{where}: no known fields (got {sorted(row)}). {_SHAPE_HINT}")


_SHAPE_HINT = 'Use {"question", "answer"}, {"prompt", "completion"} or {"text"}.'


def _string(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise UndialDataError(f"{where}: field {key!r} is missing. {_SHAPE_HINT}")
    value = row[key]
    if not isinstance(value, str):
        raise UndialDataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise UndialDataError(f"{where}: field {key!r} is empty; remove the row or fill it in.")
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
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path.name} line {number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UndialDataError(f"{path.name} line {number}: invalid JSON ({err.msg}).") from None
            return
        loaders = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
        if path.suffix not in loaders:
            raise UndialDataError(f"{path}: unknown extension {path.suffix!r}; use .jsonl, .json, .csv or .parquet.")
        try:
            table = datasets.load_dataset(loaders[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for unreadable files
            raise UndialDataError(f"{path}: could not be read as {path.suffix} ({err}).") from None
        yield from ((f"{path.name} row {i + 1}", row) for i, row in enumerate(table))
        return
    if isinstance(source, Sequence):
        yield from ((f"row {i}", row) for i, row in enumerate(source))
        return
    raise UndialDataError(f"unsupported data source {type(source).__name__}; pass a path, a Dataset or a list of dicts.")


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


def data_sha256(examples: Sequence[Example]) -> str:
    """A digest of the rows, for manifests: identifies the data without storing any of it."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt, example.answer], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def prompt_ids(tokenizer: Any, question: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a question, ready for the answer to follow."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer(question + "\n", add_special_tokens=True).input_ids


def encode(tokenizer: Any, example: Example, max_length: int, use_chat_template: bool = True) -> dict[str, list[int]]:
    """Token ids and labels (-100 on the prompt) for one example, truncated by the stated policy.

    Raises `UndialDataError` when no answer token is left to count.
    """
    if example.prompt is None:
        ids = tokenizer(example.answer, add_special_tokens=True).input_ids[:max_length]
        if len(ids) < 2:
            raise UndialDataError("a text row has fewer than 2 tokens; nothing to learn from it.")
        return {"input_ids": ids, "labels": list(ids)}
    answer = tokenizer(example.answer, add_special_tokens=False).input_ids[: max_length - 1]
    if not answer:
        raise UndialDataError(f"answer {_short(example.answer)} has no tokens; remove the row.")
    prompt = prompt_ids(tokenizer, example.prompt, use_chat_template)[-(max_length - len(answer)) :]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def _short(text: str, width: int = 40) -> str:
    # Errors may be logged: show only the start of a row, never a whole forget item.
    return repr(text if len(text) <= width else text[:width] + "...")


def build_dataset(
    tokenizer: Any,
    forget: Sequence[Example],
    retain: Sequence[Example] | None = None,
    max_length: int = 512,
    use_chat_template: bool = True,
) -> datasets.Dataset:
    """Tokenised training set: one row per forget example, each paired with a retain example.

    Retain examples are cycled (row i gets retain[i % len(retain)]), so data-parallel sharding
    of the forget set shards the retain set with it.
    """

    def encode_all(examples: Sequence[Example], name: str) -> list[dict[str, list[int]]]:
        rows = []
        for i, example in enumerate(examples):
            try:
                rows.append(encode(tokenizer, example, max_length, use_chat_template))
            except UndialDataError as err:
                raise UndialDataError(f"{name} data, row {i}: {err}") from None
        return rows

    rows = encode_all(forget, "forget")
    if retain:
        kept = encode_all(retain, "retain")
        for i, row in enumerate(rows):
            row["retain_input_ids"] = kept[i % len(kept)]["input_ids"]
            row["retain_labels"] = kept[i % len(kept)]["labels"]
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

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self._pad([f["input_ids"] for f in features], [f["labels"] for f in features], "")
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
