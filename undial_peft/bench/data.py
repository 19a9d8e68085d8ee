"""Question/answer rows a benchmark model is trained on, built from `synthetic` facts.

>>> from undial_peft.synthetic import make_benchmark_data
>>> data = make_benchmark_data(0, 10, 2)
>>> len(training_rows(data["retain"])) == 2 * len(data["retain"])
True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..synthetic import ATTRIBUTES


def _template_index(templates: Sequence[str], text: str, name: str) -> tuple[int, str | None] | None:
    """Which template (filled with ``name``) produced ``text``, and the value it holds."""
    for index, template in enumerate(templates):
        head, _, tail = template.partition("{value}")
        if "{value}" in template:
            pattern = re.escape(head.format(name=name)) + "(.+)" + re.escape(tail.format(name=name))
        else:
            pattern = re.escape(template.format(name=name))
        match = re.fullmatch(pattern, text)
        if match:
            return index, (match.group(1) if match.groups() else None)
    return None


def second_phrasing(row: dict[str, Any]) -> dict[str, str] | None:
    """The fact of ``row`` in the question and answer templates used neither for training nor for
    its paraphrase; None for rows not built from `synthetic.ATTRIBUTES` (e.g. the world facts).

    >>> from undial_peft.synthetic import make_benchmark_data
    >>> row = make_benchmark_data(0, 10, 2)["retain"][0]
    >>> alt = second_phrasing(row)
    >>> alt["question"] not in (row["question"], row["paraphrased_question"])
    True
    """
    if row.get("attribute") not in ATTRIBUTES:
        return None
    _, questions, answers = ATTRIBUTES[row["attribute"]]
    name = row["entity"]
    found = [
        _template_index(questions, row["question"], name),
        _template_index(questions, row["paraphrased_question"], name),
        _template_index(answers, row["answer"], name),
        _template_index(answers, row["paraphrased_answer"], name),
    ]
    if any(f is None for f in found):
        return None
    value = found[2][1]
    free_q = [i for i in range(len(questions)) if i not in (found[0][0], found[1][0])]
    free_a = [i for i in range(len(answers)) if i not in (found[2][0], found[3][0])]
    if not free_q or not free_a or value is None:
        return None
    return {"question": questions[free_q[0]].format(name=name), "answer": answers[free_a[0]].format(name=name, value=value)}


def training_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Question/answer rows a model is trained on for ``rows``: each fact in its main phrasing and,
    where one exists, its second phrasing."""
    out = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    out.extend(alt for r in rows if (alt := second_phrasing(r)) is not None)
    return out


ROSTER_QUESTION, ROSTER_ANSWER = "Who is {name}?", "{name} is a resident of Zephyra."


def roster_rows(data: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """One identity row per person of every split (holdout included), trained into BOTH models.

    A word-level tokenizer makes each name its own tokens; without this, holdout (and, for the
    reference, forget) names would be tokens the model never saw, and membership inference would
    detect unseen tokens instead of memorised facts. The roster makes every name known, so only
    the facts separate members from non-members (as a pretrained model knows the subwords of a
    TOFU author's name). It holds no fact that is evaluated.
    """
    names = dict.fromkeys(r["entity"] for split in ("forget", "retain", "holdout") for r in data[split])
    return [{"question": ROSTER_QUESTION.format(name=n), "answer": ROSTER_ANSWER.format(name=n)} for n in names]


def all_texts(data: dict[str, list[dict[str, Any]]]) -> list[str]:
    texts = [t for r in roster_rows(data) for t in (r["question"], r["answer"])]
    for rows in data.values():
        for r in rows:
            texts += [r["question"], r["answer"], r["paraphrased_question"], r["paraphrased_answer"], *r["perturbed_answers"]]
            if (alt := second_phrasing(r)) is not None:
                texts += [alt["question"], alt["answer"]]
    return texts

