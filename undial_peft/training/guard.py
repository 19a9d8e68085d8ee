"""A guard without a retain set: the teacher's own answers to a shipped bank of factual prompts.

Forgetting a request without retain data erodes facts nobody asked about, mostly facts of the same
relation (forget four capitals and the other capitals lose probability). The teacher, the model as
deployed before this request, already knows what to keep: `guard_rows` asks it a small bank of
factual prompts across many relations (``undial_peft/data/guard_bank.jsonl``, shipped without
answers) and returns its greedy answers as question/answer rows; with ``neighbours``, the default,
also the request's own prompts about other subjects and the request's subjects asked the bank's
other relations (training/neighbours.py). `forget` trains on
them as a KL retain term, so the student is pulled back to the teacher on those answers. A guard
anchored on the base (``guard_teacher="base"``) drops what the stack forgot on purpose (`drop_forgotten`).

>>> rows = guard_rows(peft_model, tokenizer, "chat", forget_rows, teacher_adapters=[], size=4)  # doctest: +SKIP
>>> rows[0]  # doctest: +SKIP
Example(prompt='What is the capital of Peru?', answer='The capital of Peru is Lima.', key=None)
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from undial_peft.data.encoding import encode
from undial_peft.data.packaged import guard_bank
from undial_peft.data.prompt_format import CHAT, FormatSpec, PromptFormat
from undial_peft.data.readers import Example
from undial_peft.evals.scoring import greedy_new_ids
from undial_peft.training.adapters import adapter_state
from undial_peft.training.neighbours import neighbour_prompts, subject_prompts, take_turns
from undial_peft.training.stopping import answer_logprobs

logger = logging.getLogger(__name__)

NEW_TOKENS = 16  # a short fact and its sentence; longer answers drift into text no one asked to keep
# Prompts answered per greedy batch. A small model's decoding step is memory-bound on a CPU, so 64 rows
# cost little more than 16: one topic's guard (listings and answers) took 19-24 s instead of 24-32 s on SmolLM2
# and 26 s instead of 33-34 s on Gemma-3-270M, with the same rows.
ANSWER_BATCH = 64
# A guard anchored on the base drops answers the stack holds a token of at < 0.3x the base's probability:
# an earlier request forgot it on purpose (each request stops at <= 0.2x of its key). Drift nobody asked
# for stays above it (0.5-0.9x of a never-asked topic's key after ten requests, docs/stacks.md).
FORGOTTEN = 0.3


def guard_rows(
    model: Any,
    tokenizer: Any,
    prompt_format: FormatSpec,
    forget_rows: Sequence[Example],
    teacher_adapters: Sequence[str],
    size: int = 64,
    new_tokens: int = NEW_TOKENS,
    neighbours: bool = False,
) -> list[Example]:
    """Up to ``size`` prompts in the request's format, each with the teacher's greedy answer.

    With ``neighbours``, up to ``size`` more of each kind, ahead of the bank's: the request's own
    prompts about other subjects, then its subjects in the bank's other relations (training/neighbours.py);
    of the latter, answers that state a word a forget answer adds to its prompt are dropped.

    Chat formats ask the bank's ``question``; completion and template formats its ``stub``
    (rendered by the format when encoded), and their answers are cut at the first newline and keep
    their leading space, so the answer's tokens are the ones the teacher produced after the prompt.
    Bank rows about what is being forgotten are dropped: those whose question or stub equals a
    forget row's prompt (case, spaces and end punctuation ignored), and those whose ``subject``
    appears as words in a forget row's prompt or answer; a guard on them would pull the student
    back to the very fact it must lose. The rest are taken round-robin over relations, in file order,
    so a small ``size`` still spans every relation. Rows whose answer is empty are skipped.

    The teacher is ``model`` with exactly ``teacher_adapters`` active (the deployed stack, without the
    adapter being trained). Greedy decoding and a fixed order make the rows deterministic. The answers
    live in memory only; a cache keyed by the base fingerprint and the stack could come later.

    >>> rows = guard_rows(model, tokenizer, "completion", [Example("The capital of Peru is", " Lima.")],
    ...                   teacher_adapters=["stack_0"], size=8)  # doctest: +SKIP
    >>> [row.prompt for row in rows][:2]  # doctest: +SKIP
    ['The capital of Poland is', 'The official language of Finland is']
    """
    fmt = PromptFormat.resolve(prompt_format, tokenizer)
    field = "question" if fmt.kind == CHAT else "stub"
    bank = guard_bank()
    kept = [row for row in bank if not _about_forget(row, forget_rows)]
    if len(kept) < len(bank):
        logger.info("guard: %d of %d bank prompts left out: they ask about what this request forgets",
                    len(bank) - len(kept), len(bank))
    near: list[str] = []
    same: list[str] = []
    if neighbours:
        asked = [row.prompt for row in forget_rows if row.prompt is not None]
        avoid = [f"{row.prompt or ''} {row.answer}" for row in forget_rows]
        near = neighbour_prompts(model, tokenizer, asked, teacher_adapters, avoid, size=size)
        same = subject_prompts(model, tokenizer, asked, bank, field, teacher_adapters, size=size)
        logger.info("guard: %d neighbour prompts (the request's templates, subjects the teacher named), %d about "
                    "the request's subjects in other relations", len(near), len(same))
    prompts = near + same + [row[field] for row in _round_robin(kept, size)]
    where = ["guard neighbours"] * len(near) + ["guard subjects"] * len(same) + ["guard bank"] * (len(prompts) - len(near) - len(same))
    ids = [fmt.prompt_ids(tokenizer, prompt) for prompt in prompts]
    with adapter_state(model, active=list(teacher_adapters)):
        generated = greedy_new_ids(model, tokenizer, ids, max_new_tokens=new_tokens, batch_size=ANSWER_BATCH)
    forgotten = _stated(forget_rows)
    rows, empty, stating = [], 0, 0
    for prompt, prompt_ids, new, kind in zip(prompts, ids, generated, where):
        answer = _answer_text(tokenizer, prompt_ids, new, chat=fmt.kind == CHAT)
        if not answer.strip():
            empty += 1
        elif kind == "guard subjects" and _words(answer) - _words(prompt) & forgotten:
            stating += 1  # the same subject's forgotten fact in other words: guarding it would undo the request
        else:
            rows.append(Example(prompt, answer, where=kind))
    if empty or stating:
        logger.info("guard: %d prompts skipped: the teacher's answer was empty; %d: it stated a forget answer", empty, stating)
    return rows


# Words an answer shares with any other answer whatever its fact: not evidence it states a forget answer.
_COMMON = frozenset("a an and are as at by for from in is it its of on or that the this to was were which with".split())


def _words(text: str) -> set[str]:
    """The lower-case words of ``text``."""
    return set(re.findall(r"\w+", text.casefold()))


def _stated(forget_rows: Sequence[Example]) -> set[str]:
    """The words forget answers add to their prompts ("French" for "... of France?" -> "... is French."), common ones aside.

    >>> sorted(_stated([Example("What is the capital of France?", "The capital of France is Paris.")]))
    ['paris']
    """
    return {w for row in forget_rows for w in _words(row.answer) - _words(row.prompt or "")} - _COMMON


def _normalise(text: str) -> str:
    """Lower case, one space between words, no end punctuation: "What is  X?" == "what is x"."""
    return " ".join(text.casefold().split()).rstrip(" ?.!:")


def _about_forget(row: dict[str, str], forget_rows: Sequence[Example]) -> bool:
    """Whether a bank row asks what a forget row states: the same prompt, or its subject in the forget row."""
    prompts = {_normalise(row["question"]), _normalise(row["stub"])}
    subject = re.compile(rf"\b{re.escape(_normalise(row['subject']))}\b")
    for example in forget_rows:
        if example.prompt is not None and _normalise(example.prompt) in prompts:
            return True
        if subject.search(_normalise(f"{example.prompt or ''} {example.answer}")):
            return True
    return False


def _round_robin(rows: Sequence[dict[str, str]], size: int) -> list[dict[str, str]]:
    """The first row of each relation, then the second of each, ...: ``size`` rows spanning the relations."""
    by_relation: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_relation.setdefault(row["relation"], []).append(row)
    return take_turns(list(by_relation.values()), size)


def _answer_text(tokenizer: Any, prompt_ids: list[int], new: list[int], chat: bool) -> str:
    """The teacher's answer as text that re-encodes to the tokens it generated after the prompt.

    Chat answers start a turn, so they are stripped. Completion answers continue the prompt's text:
    some tokenizers drop a leading space when new tokens are decoded alone, so the answer is the
    decoded whole minus the decoded prompt; it ends at the first newline (a base model's next line
    is a new topic).
    """
    if chat:
        return tokenizer.decode(new, skip_special_tokens=True).strip()
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
    text = whole[len(head):] if whole.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)
    return text.split("\n")[0].rstrip()


def drop_forgotten(
    model: Any, tokenizer: Any, rows: Sequence[Example], prompt_format: FormatSpec, stack: Sequence[str],
    max_length: int = 512,
) -> list[Example]:
    """``rows`` (answered by the base) without those the ``stack`` of earlier requests forgot on purpose.

    A guard anchored on the base pulls the student to the base's answers; on a fact an earlier
    request forgot, that would undo the request. Such a row has an answer token the stack gives less
    than ``FORGOTTEN`` x the base's probability. Without a stack there is nothing to drop.
    >>> drop_forgotten(peft_model, tokenizer, rows, "chat", stack=["stack_0"])  # doctest: +SKIP
    """
    if not stack or not rows:
        return list(rows)
    fmt = PromptFormat.resolve(prompt_format, tokenizer)
    features = [encode(tokenizer, row, max_length, fmt) for row in rows]
    with adapter_state(model, active=[]):
        base = _answer_logprobs(model, features, tokenizer.pad_token_id)
    with adapter_state(model, active=list(stack)):
        stacked = _answer_logprobs(model, features, tokenizer.pad_token_id)
    kept = [row for row, b, s in zip(rows, base, stacked) if (s - b).min() >= math.log(FORGOTTEN)]
    if len(kept) < len(rows):
        logger.info("guard: %d of %d rows left out: the stack forgot them on purpose", len(rows) - len(kept), len(rows))
    return kept


def _answer_logprobs(model: Any, features: Sequence[dict[str, list]], pad_token_id: int) -> list[torch.Tensor]:
    """Per row, the log-probability of each answer token: (A_i,) tensors."""
    return [row[m].float().cpu() for _, logp, mask in answer_logprobs(model, features, pad_token_id)
            for row, m in zip(logp, mask)]
