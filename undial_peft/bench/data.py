"""Question/answer rows a benchmark model is trained on, built from `synthetic` facts.

>>> from undial_peft.data.synthetic import make_benchmark_data
>>> data = make_benchmark_data(0, 10, 2)
>>> len(training_rows(data["retain"])) == 2 * len(data["retain"])
True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from undial_peft.data.synthetic import ATTRIBUTES, make_benchmark_data, real_author_facts, real_world_facts
from undial_peft.errors import UndialConfigError


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

    >>> from undial_peft.data.synthetic import make_benchmark_data
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


def by_person(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by their ``entity``, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["entity"], []).append(row)
    return list(groups.values())


def real_splits(seed: int, size: Any) -> dict[str, Any]:
    """The real-model benchmark's data (``size`` a `settings.RealSize`): people split into a request
    pool, holdout and retain; the pool into sequential requests; real world facts and real authors.

    >>> from undial_peft.bench.settings import REAL
    >>> s = real_splits(0, REAL)
    >>> len(s["requests"]), len(s["main"]), len(s["pool"]), len(s["retain_eval"]), len(s["world_facts"])
    (5, 20, 50, 20, 11)
    """
    n_pool = size.requests * size.people_per_request
    if not 0 < size.main_people <= n_pool:
        raise UndialConfigError(f"main_people={size.main_people} must be between 1 and the pool's {n_pool} people.")
    data = make_benchmark_data(seed, size.n_people, size.facts_per_person, n_pool / size.n_people,
                               size.holdout_people / size.n_people)
    pool, retain = by_person(data["forget"]), by_person(data["retain"])
    if len(pool) != n_pool or len(by_person(data["holdout"])) != size.holdout_people:
        raise UndialConfigError(f"{size.n_people} people do not split into {n_pool} forget and {size.holdout_people} holdout.")
    if len(retain) <= size.eval_retain_people:
        raise UndialConfigError(f"eval_retain_people={size.eval_retain_people} leaves no retain people for retain terms.")
    per = size.people_per_request
    return {
        "pool": [r for person in pool for r in person],
        "main": [r for person in pool[: size.main_people] for r in person],
        "requests": [[r for person in pool[k * per : (k + 1) * per] for r in person] for k in range(size.requests)],
        "retain_eval": [r for person in retain[: size.eval_retain_people] for r in person],
        "retain_train": [r for person in retain[size.eval_retain_people :] for r in person],
        "retain": data["retain"],
        "holdout": data["holdout"],
        "world_facts": real_world_facts(),
        "real_authors": real_author_facts(),
    }
