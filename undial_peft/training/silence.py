"""Greedy silence: does the model, asked a forget row's prompt, still say the row's key?

Key probability is measured on the request's own answer, token by token. A model can lower it there
and still say the fact on another path: measured on the demo (SmolLM2), past the target the greedy
answer to "What is the capital of Japan?" became "The capital of Japan is **Tokyo**." (the key
probability after "is" was 0.05x; the fact came after a markdown token the row never had).
`named_rows` asks each forget prompt greedily and finds the rows whose answer still holds the key's
text; `escape_row` turns such an answer into a forget row keyed on where it says the key, so that
`forget` can train on the path the model actually takes (``config.silence_rounds``).

Rows are token ids as `data.encode` returns them; keys are the tokens with ``beta_weight > 0`` (hand
keys or automatic ones). Rows without a prompt (text rows) or without key tokens are not asked.

>>> from undial_peft.data.encoding import encode
>>> from undial_peft.data.readers import Example
>>> from undial_peft.tiny import word_tokenizer
>>> tok = word_tokenizer(["Who wrote Hamlet ? It was Shakespeare ."], chat_template=False)
>>> row = encode(tok, Example("Who wrote Hamlet ?", "It was Shakespeare .", "Shakespeare"), 32)
>>> key_texts(tok, row)
['Shakespeare']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from undial_peft.evals.scoring import greedy_new_ids
from undial_peft.training.loss import IGNORE_INDEX

# Answer tokens asked beyond the row's own answer length: room for a lead-in the row does not have.
SLACK_TOKENS = 16
# Steps a silence round trains before the model is asked again. A fixed count, not the key-probability target:
# on the demo a row at 0.2x of its key probability was still answered with the key (it stayed the likeliest
# token), so the round's measure is the greedy answer itself, and a fixed count bounds the round's cost.
ROUND_STEPS = 10
ASK_BATCH = 32  # greedy rows per batch; decoding a small model is memory-bound, so a wide batch is cheap


@dataclass(frozen=True)
class Named:
    """A forget row whose greedy answer still says its key: the row's index, the answer's ids, the key text."""

    row: int
    answer_ids: list[int]
    key: str


def key_texts(tokenizer: Any, row: dict[str, list]) -> list[str]:
    """The texts of a row's key: each run of consecutive answer tokens with ``beta_weight > 0``, decoded and stripped.

    A row whose every answer token is weighted has no key to look for (returns []).
    """
    answer = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    weighted = [i for i in answer if row["beta_weight"][i] > 0]
    if not weighted or len(weighted) == len(answer):
        return []
    runs: list[list[int]] = []
    for i in weighted:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    texts = [tokenizer.decode([row["input_ids"][i] for i in run], skip_special_tokens=True).strip() for run in runs]
    return [text for text in texts if text]


def says(text: str, key: str) -> bool:
    """Whether ``text`` holds ``key`` as a word of its own (not inside another: "Fe" is not in "Ferrous").

    >>> says("The capital of Japan is **Tokyo**.", "Tokyo"), says("It is Ferrous.", "Fe"), says("Fe, iron", "Fe")
    (True, False, True)
    """
    return re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text) is not None


def prompt_of(row: dict[str, list]) -> list[int] | None:
    """The row's prompt ids (everything before its first answer token), or None for a text row."""
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    return row["input_ids"][:first] if first > 0 else None


def named_rows(model: Any, tokenizer: Any, rows: Sequence[dict[str, list]]) -> tuple[list[Named], int]:
    """Ask every keyed prompt row greedily; return the rows whose answer says the key, and how many were asked.

    >>> # named, asked = named_rows(peft_model, tokenizer, forget_features)  -> ([Named(row=1, ...)], 6)
    """
    asked = [(i, prompt, keys) for i, row in enumerate(rows)
             if (prompt := prompt_of(row)) is not None and (keys := key_texts(tokenizer, row))]
    if not asked:
        return [], 0
    longest = max(sum(label != IGNORE_INDEX for label in rows[i]["labels"]) for i, _, _ in asked)
    answers = greedy_new_ids(model, tokenizer, [prompt for _, prompt, _ in asked],
                             max_new_tokens=longest + SLACK_TOKENS, batch_size=ASK_BATCH)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    named = []
    for (i, _, keys), ids in zip(asked, answers):
        ids = ids[: next((n for n, t in enumerate(ids) if t in stop), len(ids))]  # up to the end of the turn
        text = tokenizer.decode(ids, skip_special_tokens=True)
        key = max(keys, key=len)  # a key in several runs (the J, K and Rowling of J.K. Rowling) by its longest:
        if says(text, key):       # a single letter would be found in any other name
            named.append(Named(i, ids, key))
    return named, len(asked)


def escape_row(tokenizer: Any, row: dict[str, list], named: Named) -> dict[str, list]:
    """A forget row: the row's prompt, the model's answer up to the end of the key's first mention, keyed there.

    The key's tokens are the shortest run of answer tokens whose text holds the key; the answer is cut after
    it (what follows is the model's own text, which the distillation would only hold in place).
    >>> # escape_row(tok, row, Named(0, ids_of(" **Tokyo**."), "Tokyo"))["beta_weight"]  -> [0, 0, 1, 1] on the answer
    """
    ids = named.answer_ids
    end = next(n for n in range(1, len(ids) + 1) if named.key in tokenizer.decode(ids[:n], skip_special_tokens=True))
    start = max(s for s in range(end) if named.key in tokenizer.decode(ids[s:end], skip_special_tokens=True))
    prompt = prompt_of(row) or []
    answer = ids[:end]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "beta_weight": [0.0] * len(prompt) + [1.0 if start <= n else 0.0 for n in range(len(answer))],
    }
