"""Tokenise rows in the request's prompt format with prompt masking, and pad them into batches.

Prompts are turned into ids by the request's ONE `PromptFormat` (data/prompt_format.py): the chat
template, the raw prompt (completion), or a user template. The answer is counted WITHOUT an
end-of-turn token: pushing the end token down would teach the model to ramble, not to forget.

Truncation policy (``max_length`` tokens): the answer is kept whole and the prompt is cut on the
left; an answer longer than ``max_length - 1`` is cut on the right; text rows are cut on the right.

>>> from undial_peft.tiny import word_tokenizer
>>> tok = word_tokenizer(["Who wrote Hamlet ?", "Shakespeare ."], chat_template=False)
>>> row = encode(tok, Example("Who wrote Hamlet ?", "Shakespeare ."), 16)
>>> row["labels"][:4], len(row["input_ids"])
([-100, -100, -100, -100], 7)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from undial_peft.data.prompt_format import AUTO, FormatSpec, PromptFormat
from undial_peft.data.readers import Example
from undial_peft.errors import UndialDataError
from undial_peft.training.loss import IGNORE_INDEX


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
    retain_keys: Sequence[Sequence[float] | None] | None = None,
) -> datasets.Dataset:
    """Tokenised training set of forget examples, each row paired with a retain example.

    ``answer_weights`` (one entry per forget example, None to keep its own) replaces the beta
    weights of the answer tokens, e.g. with automatic keys. ``retain_keys`` (one entry per retain
    example: 1.0 on its fact tokens, None for none) becomes the ``retain_key`` column the guard's KL
    weighs (`UndialConfig.guard_key_weight`); 0.0 on the prompt, as ``beta_weight`` is.

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
        kept = encode_all(retain, "retain", retain_keys)
        extra = ({"retain_key": row["beta_weight"] if keys is not None else [0.0] * len(row["beta_weight"])}
                 for row, keys in zip(kept, retain_keys)) if retain_keys is not None else ({} for _ in kept)
        kept = [{"retain_input_ids": row["input_ids"], "retain_labels": row["labels"], **more}
                for row, more in zip(kept, extra)]
        rows = [{**rows[i % len(rows)], **kept[i % len(kept)]} for i in range(max(len(rows), len(kept)))]
    return datasets.Dataset.from_list(rows)


def with_forget_rows(dataset: datasets.Dataset, rows: Sequence[dict[str, list]]) -> datasets.Dataset:
    """``dataset`` with encoded forget ``rows`` appended, each paired with an existing row's retain example (in turn).

    >>> ds = datasets.Dataset.from_list([{"input_ids": [1, 2], "labels": [-100, 2], "beta_weight": [0.0, 1.0]}])
    >>> with_forget_rows(ds, [{"input_ids": [1, 3], "labels": [-100, 3], "beta_weight": [0.0, 1.0]}])["input_ids"][:]
    [[1, 2], [1, 3]]
    """
    paired = [c for c in dataset.column_names if c.startswith("retain_")]
    extra = [{**row, **{c: dataset[i % len(dataset)][c] for c in paired}} for i, row in enumerate(rows)]
    return datasets.concatenate_datasets([dataset, datasets.Dataset.from_list(extra, features=dataset.features)])


@dataclass
class Collator:
    """Right-pads ``input_ids`` / ``labels`` (and their ``retain_`` twins) into tensors; per-token weights
    (``beta_weight``, ``retain_key``) are padded with 0.

    >>> batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                                   {"input_ids": [8], "labels": [8]}])
    >>> batch["labels"].tolist(), batch["attention_mask"].tolist()
    ([[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, list]]) -> dict[str, torch.Tensor]:
        batch = self._pad([f["input_ids"] for f in features], [f["labels"] for f in features], "")
        if "beta_weight" in features[0]:
            batch["beta_weight"] = self._weights([f["beta_weight"] for f in features], batch["labels"].shape)
        if "retain_input_ids" in features[0]:
            retain = [f["retain_input_ids"] for f in features], [f["retain_labels"] for f in features]
            batch.update(self._pad(*retain, "retain_"))
            if "retain_key" in features[0]:
                batch["retain_key"] = self._weights([f["retain_key"] for f in features], batch["retain_labels"].shape)
        return batch

    @staticmethod
    def _weights(rows: list[list[float]], shape: torch.Size) -> torch.Tensor:
        weights = torch.zeros(shape)  # (B, T); 0 on padding
        for i, row in enumerate(rows):
            weights[i, : len(row)] = torch.tensor(row)
        return weights

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
