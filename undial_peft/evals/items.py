"""Evaluation items: what a forget / retain / ... split holds, read and validated, and how MUSE asks them.

An item is a question and its answer, with the probes some metrics need (a paraphrased question and
answer, perturbed answers) and, for MUSE rows, the protocol that says how to prompt and score them.
Items are named in reports only by a keyed digest.

>>> items = read_eval_items([{"question": "Who?", "answer": "Ana.", "perturbed_answers": ["Bo."]}])
>>> items[0].perturbed_answers
('Bo.',)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from undial_peft.data.digests import keyed_sha256
from undial_peft.data.readers import Example, _read_rows
from undial_peft.errors import UndialDataError


@dataclass(frozen=True)
class Protocol:
    """How a benchmark builds its prompts, where it differs from this package's chat-template default.

    ``separator`` joins the raw prompt and the answer, tokenised as one string with no chat template
    (None: a text row, every token scored); ``max_new_tokens`` is the benchmark's own greedy budget,
    used instead of `evaluate`'s; ``max_tokens`` caps the tokens after the prompt (None: no cap);
    the greedy text is cut at the first ``stop`` string.
    """

    separator: str | None
    max_new_tokens: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()


# MUSE, as open-unlearning runs it (configs/eval/muse_metrics, configs/data/datasets/MUSE_*.yaml):
# VerbMem continues ``prompt + " " + gt`` (CompletionDataset, insert_space) for 128 tokens, gt cut at
# 2048 tokens; KnowMem asks in the Llama-2 "Question: ...\nAnswer: " format after the *_icl
# examples, 32 tokens, cut at its stop words; PrivLeak scores each text up to 2048 tokens (MUSE_MIA).
PROTOCOLS = {
    "muse_verbmem": Protocol(separator=" ", max_new_tokens=128, max_tokens=2048),
    "muse_knowmem": Protocol(separator="", max_new_tokens=32, stop=("\n\n", "\nQuestion", "Question:")),
    "muse_privleak": Protocol(separator=None, max_tokens=2048),
}


@dataclass(frozen=True)
class EvalItem:
    """One evaluation item; perturbed answers enable the truth ratio. ``question`` None = raw text.

    The true side of the truth ratio is the paraphrased answer when given, else the answer itself
    (TOFU: ``base_answer_key`` is paraphrased_answer on forget/retain, answer on real-authors /
    world-facts). ``paraphrased_question`` is kept for the paraphrase attack, not for the ratio.
    ``protocol`` names a benchmark's prompt format in `PROTOCOLS` (None: the chat template);
    ``few_shot`` holds its in-context (question, answer) pairs.
    """

    question: str | None
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None
    protocol: str | None = None
    few_shot: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def has_truth_ratio(self) -> bool:
        return len(self.perturbed_answers) > 0

    @property
    def true_answer(self) -> str:
        return self.paraphrased_answer if self.paraphrased_answer is not None else self.answer


def _optional_text(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UndialDataError(f"{where}: field {key!r} must be a non-empty string or absent.")
    return value


def read_eval_items(source: str | Path | Sequence[dict | Example | EvalItem]) -> list[EvalItem]:
    """Read evaluation items from a file (.jsonl/.json/.csv/.parquet), dicts, Examples or EvalItems.

    Field names are those `undial_peft.data.synthetic` writes; TOFU's ``perturbed_answer`` is accepted too.

    >>> read_eval_items([Example("Q?", "A.")])[0]
    EvalItem(question='Q?', answer='A.', paraphrased_answer=None, perturbed_answers=(), paraphrased_question=None, protocol=None)
    """
    items = []
    rows = source if isinstance(source, Sequence) and not isinstance(source, str) else None
    for where, row in ((f"row {i}", r) for i, r in enumerate(rows)) if rows is not None else _read_rows(source):
        if isinstance(row, EvalItem):
            items.append(row)
            continue
        if isinstance(row, Example):
            items.append(EvalItem(row.prompt, row.answer))
            continue
        if not isinstance(row, dict):
            raise UndialDataError(f"{where}: expected a dict, Example or EvalItem, got {type(row).__name__}.")
        # The training data's other shapes ({"prompt", "completion"}, {"text"}) are accepted too.
        question = _optional_text(row, "question" if "question" in row else "prompt", where)
        answer = _optional_text(row, next((k for k in ("answer", "completion", "text") if k in row), "answer"), where)
        if answer is None:
            raise UndialDataError(f"{where}: field 'answer' is missing; evaluation rows need question/answer.")
        perturbed = row.get("perturbed_answers", row.get("perturbed_answer")) or ()
        if isinstance(perturbed, str) or not all(isinstance(p, str) and p.strip() for p in perturbed):
            raise UndialDataError(f"{where}: 'perturbed_answers' must be a list of non-empty strings.")
        protocol = row.get("protocol")
        if protocol is not None and protocol not in PROTOCOLS:
            raise UndialDataError(f"{where}: unknown protocol {protocol!r}; use one of {sorted(PROTOCOLS)} or leave it out.")
        shots = row.get("few_shot") or ()
        if not all(isinstance(s, dict) and isinstance(s.get("question"), str) and isinstance(s.get("answer"), str)
                   for s in shots):
            raise UndialDataError(f"{where}: 'few_shot' must be a list of {{\"question\", \"answer\"}} objects.")
        items.append(
            EvalItem(
                question,
                answer,
                _optional_text(row, "paraphrased_answer", where),
                tuple(perturbed),
                _optional_text(row, "paraphrased_question", where),
                protocol,
                tuple((s["question"], s["answer"]) for s in shots),
            )
        )
    if not items:
        raise UndialDataError("no evaluation items given.")
    return items


def item_prompt(item: EvalItem) -> str | None:
    """The raw prompt text of a protocol item (None for text rows); for others, the question.

    MUSE KnowMem: each in-context pair as ``"Question: {q}\\nAnswer: {a}\\n\\n"``, then
    ``"Question: {question}\\nAnswer: "`` (open-unlearning's Llama-2 template for MUSE).

    >>> item_prompt(EvalItem("Q?", "A.", protocol="muse_knowmem", few_shot=(("P?", "B."),)))
    'Question: P?\\nAnswer: B.\\n\\nQuestion: Q?\\nAnswer: '
    """
    if item.protocol == "muse_knowmem":
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in item.few_shot)
        return f"{shots}Question: {item.question}\nAnswer: "
    return item.question


def items_digest(items: Sequence[EvalItem]) -> str:
    """Keyed digest (`data.secret`) of every text field that a metric reads (paraphrases and perturbations
    included): the reference check compares it; without the key, a guess cannot be confirmed from a report.

    >>> items_digest([EvalItem("Q?", "A.")]) != items_digest([EvalItem("Q?", "A.", perturbed_answers=("B.",))])
    True
    """
    return keyed_sha256(
        # the protocol and its examples change what is scored; appended only when set, so the
        # digests of earlier reports (no protocol) still match
        json.dumps([it.question, it.answer, it.paraphrased_answer, list(it.perturbed_answers), it.paraphrased_question,
                    *([it.protocol, [list(s) for s in it.few_shot]] if it.protocol else [])],
                   ensure_ascii=False).encode("utf-8") + b"\n"
        for it in items
    )
