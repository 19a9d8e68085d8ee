"""Neighbour prompts: the request's own questions about other subjects, the subjects named by the teacher.

What a forget request erodes most is the same relation about other entities: forget eight chemical
symbols and the model loses the ninth. The keep signal that says "these subjects, not this relation"
is the request's own template with other subjects in it, answered by the teacher. Nothing here needs
data from the user:

1. `templates` finds the slot the forget prompts share: two prompts that differ in one span
   ("What is the chemical symbol for silver?" / "... for sodium?") give the template
   ("What is the chemical symbol for ", "?") and the subjects "silver", "sodium".
2. `named_subjects` asks the teacher to continue the list of those subjects as plain text, one per
   line ("silver\nsodium\n" -> "calcium\nmagnesium\n..."), sampled a few times, and keeps the new
   names, never one that appears in a forget row.
3. `neighbour_prompts` fills each template with them. training/guard.py has the teacher answer them.

The other side of the same request is its subjects' other facts: forget France's language and the
model loses France's capital. `subject_prompts` asks the forget subjects the shipped bank's other
relations ("What is the capital of {}?"), those whose subjects are of the same kind, as the teacher
judges when it lists them (no "capital of silver").

Prompts whose template no other forget prompt shares get no neighbours (the shipped bank still guards them).

>>> templates(["What is the capital of France?", "What is the capital of Peru?", "Who wrote Hamlet?"])
{('What is the capital of ', '?'): ['France', 'Peru']}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from undial_peft.evals.scoring import greedy_new_ids
from undial_peft.models import pad_id
from undial_peft.training.adapters import adapter_state
from undial_peft.training.stopping import answer_logprobs

_TOKEN = re.compile(r"\w+|[^\w\s]")
MIN_SHARED = 2  # words and marks a template keeps besides its slot: "for X?" is a template, "X?" is not
LIST_TOKENS = 32  # new tokens per listing: about ten short names
TOP_P = 0.9  # nucleus of the listing samples: names the teacher finds likely, not its long tail
SAMPLES = 8  # listings per template, each starting from the subjects in another order
MAX_WORDS = 4  # a longer list item is a sentence, not a subject
# A bank relation fits the request's subjects when its own subjects follow them in a list within this
# many nats per token of the request's subjects themselves (`fitting_relations`; measured gaps: 3+ nats).
TYPE_MARGIN = 1.0
BATCH = 16  # rows per scoring forward pass
RELATION_SUBJECTS = 3  # bank subjects scored per relation: enough for a 3-nat gap, half the cost of all 6


def templates(prompts: Sequence[str]) -> dict[tuple[str, str], list[str]]:
    """The (prefix, suffix) slots two or more prompts share, each with the subjects that fill it.

    A prompt's template is the longest (most shared words and marks) it has with any other prompt;
    prompts sharing it are grouped. Spacing is kept, so ``prefix + subject + suffix`` is the prompt.
    >>> templates(["The opposite of hot is", "The opposite of up is"])
    {('The opposite of ', ' is'): ['hot', 'up']}
    """
    spans = [[m.span() for m in _TOKEN.finditer(p)] for p in prompts]
    words = [[p[a:b] for a, b in s] for p, s in zip(prompts, spans)]
    best: dict[int, tuple[int, tuple[str, str], str]] = {}
    for i in range(len(prompts)):
        for j in range(len(prompts)):
            if i == j or prompts[i] == prompts[j]:
                continue
            head = _shared(words[i], words[j])
            tail = _shared(words[i][head:][::-1], words[j][head:][::-1])
            if head + tail < MIN_SHARED or head + tail >= min(len(words[i]), len(words[j])):
                continue  # too little shared, or no slot left in one of them
            start, end = spans[i][head][0], spans[i][len(words[i]) - tail - 1][1]
            found = (head + tail, (prompts[i][:start], prompts[i][end:]), prompts[i][start:end])
            if i not in best or found[0] > best[i][0]:
                best[i] = found
    grouped: dict[tuple[str, str], list[str]] = {}
    for _, template, subject in (best[i] for i in sorted(best)):
        if subject not in grouped.setdefault(template, []):
            grouped[template].append(subject)
    return {template: subjects for template, subjects in grouped.items() if len(subjects) >= 2}


def named_subjects(
    model: Any, tokenizer: Any, subjects: Sequence[str], teacher_adapters: Sequence[str], avoid: Sequence[str],
    samples: int = SAMPLES, new_tokens: int = LIST_TOKENS, seed: int = 0,
) -> list[str]:
    """More names of the kind ``subjects`` are, as the teacher lists them after them, none found in ``avoid``.

    The teacher reads the subjects one per line as plain text (no chat template: every model continues
    a list), each sample starting from another rotation of them. Sampled, not greedy: a small model's
    greedy list repeats its input; a fixed seed, under a forked RNG, keeps the result deterministic and
    the caller's random state untouched. Items are split at line breaks and commas and kept when they
    are 1-4 words with a letter, new (case ignored), and absent, as words, from every ``avoid`` text
    (the forget rows).
    >>> named_subjects(model, tok, ["silver", "sodium"], [], avoid=["silver is Ag"])  # doctest: +SKIP
    ['potassium', 'calcium', 'magnesium']
    """
    seen = {_fold(s) for s in subjects}
    text = _fold(" ".join(avoid))
    prompts = []
    for k in range(samples):
        rotated = list(subjects[k % len(subjects):]) + list(subjects[: k % len(subjects)])
        prompts.append(tokenizer("\n".join(rotated) + "\n", add_special_tokens=True).input_ids)
    with adapter_state(model, active=list(teacher_adapters)), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generated = greedy_new_ids(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=samples,
                                   sample_top_p=TOP_P)
    names = []
    for new in generated:
        # Markup a tokenizer does not mark as special ("<start_of_image>") separates items too; the
        # last item is dropped, as the token budget may have cut it ("Copper (II").
        for item in re.split(r"[\n,;]|<[^<>]*>", tokenizer.decode(new, skip_special_tokens=True))[:-1]:
            item = re.sub(r"^(and|or)\s+", "", item.strip()).strip(".:!?\"'()*-")
            key = _fold(item)
            if (not key or key in seen or len(item.split()) > MAX_WORDS or not re.search(r"[^\W\d_]", item)
                    or re.search(rf"\b{re.escape(key)}\b", text)):
                continue
            seen.add(key)
            names.append(item)
    return names


def neighbour_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], teacher_adapters: Sequence[str], avoid: Sequence[str],
    size: int,
) -> list[str]:
    """Up to ``size`` prompts: each template of ``prompts`` filled with subjects the teacher names.

    Templates take turns, so a request of several relations guards each of them.
    >>> neighbour_prompts(model, tok, ["The opposite of hot is", "The opposite of up is"], [],
    ...                   avoid=["The opposite of hot is cold."], size=2)  # doctest: +SKIP
    ['The opposite of big is', 'The opposite of fast is']
    """
    filled = []
    for (prefix, suffix), subjects in templates(prompts).items():
        names = named_subjects(model, tokenizer, subjects, teacher_adapters, avoid)
        filled.append([f"{prefix}{name}{suffix}" for name in names])
    return take_turns(filled, size)


def subject_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], bank: Sequence[dict[str, str]], field: str,
    teacher_adapters: Sequence[str], size: int,
) -> list[str]:
    """Up to ``size`` prompts asking the subjects of ``prompts`` the other relations of ``bank``.

    A bank relation's template is its rows' most common ``field`` with each row's ``subject`` as the
    slot. A relation is asked when its subjects are of the forget subjects' kind (`fitting_relations`:
    countries take "capital", "currency" and "official language", not "chemical symbol"). Fills equal
    to a forget prompt are left out (that is the fact being forgotten); training/guard.py also drops
    answers that state a forget answer's words. Relations take turns, so a small ``size`` spans them.
    >>> subject_prompts(model, tok, ["The official language of France is", "The official language of Peru is"],
    ...                 guard_bank(), "stub", [], size=2)  # doctest: +SKIP
    ['The capital of France is', 'The currency of France is the']
    """
    subjects = list(dict.fromkeys(s for group in templates(prompts).values() for s in group))
    if not subjects:
        return []
    asked = {_fold(p).rstrip(" ?.!:") for p in prompts}
    relations: dict[str, list[dict[str, str]]] = {}
    for row in bank:
        relations.setdefault(row["relation"], []).append(row)
    fitting = fitting_relations(model, tokenizer, subjects,
                                {name: [r["subject"] for r in rows] for name, rows in relations.items()}, teacher_adapters)
    filled = []
    for name in fitting:
        slots = [slot for row in relations[name] if (slot := _slot(row[field], row["subject"])) is not None]
        if slots:
            slot = max(slots, key=slots.count)  # the relation's usual wording: "currency of {}", not "of the {}"
            filled.append([q for q in (slot.format(s) for s in subjects) if _fold(q).rstrip(" ?.!:") not in asked])
    return take_turns(filled, size)


def fitting_relations(
    model: Any, tokenizer: Any, subjects: Sequence[str], relations: dict[str, list[str]],
    teacher_adapters: Sequence[str], margin: float = TYPE_MARGIN,
) -> list[str]:
    """The relations whose subjects the teacher lists after ``subjects`` about as readily as ``subjects`` themselves.

    A relation's score is the teacher's mean per-token log-probability of each of its first
    `RELATION_SUBJECTS` subjects as the next line after the forget subjects, listed one per line; the
    bar is the same for each forget subject after the others (at most `SAMPLES` of them), less
    ``margin`` nats. Measured on SmolLM2-135M and Gemma-3-270M over all six subjects of each bank
    relation: countries (bar -1.8 to -2.5) score -1.7 to -2.9 on capital, currency
    and official language (Gemma-3's capital after its language subjects: -3.4, left out) and below -5
    on books, paintings and units; books (bar -1.5) -2.1 on authors, below -3.3 elsewhere.
    >>> fitting_relations(model, tok, ["France", "Italy"], {"capital": ["Peru"], "author": ["The Hobbit"]}, [])  # doctest: +SKIP
    ['capital']
    """
    listing = "\n".join(subjects) + "\n"
    held_out = ["\n".join(subjects[:k] + subjects[k + 1:]) + "\n" for k in range(min(len(subjects), SAMPLES))]
    pairs = [(context, subjects[k]) for k, context in enumerate(held_out)]
    relations = {name: list(names[:RELATION_SUBJECTS]) for name, names in relations.items()}
    pairs += [(listing, s) for names in relations.values() for s in names]
    scores = _continuation_logprobs(model, tokenizer, pairs, teacher_adapters)
    bar = sum(scores[: len(held_out)]) / len(held_out) - margin
    fitting, at = [], len(held_out)
    for name, names in relations.items():
        if sum(scores[at: at + len(names)]) / len(names) >= bar:
            fitting.append(name)
        at += len(names)
    return fitting


def _slot(text: str, subject: str) -> str | None:
    """``text`` with its one ``subject`` as a ``{}`` slot (other braces escaped), None if not there once."""
    if text.count(subject) != 1:
        return None
    head, tail = text.split(subject)
    return head.replace("{", "{{").replace("}", "}}") + "{}" + tail.replace("{", "{{").replace("}", "}}")


def _continuation_logprobs(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], teacher_adapters: Sequence[str],
) -> list[float]:
    """Per (context, item): the teacher's mean log-probability of the tokens of ``item + "\\n"`` after ``context``."""
    rows = []
    for context, item in pairs:
        head = tokenizer(context, add_special_tokens=True).input_ids
        ids = tokenizer(context + item + "\n", add_special_tokens=True).input_ids
        if ids[: len(head)] != head:  # the boundary merged: tokenise the item on its own
            ids = head + tokenizer(item + "\n", add_special_tokens=False).input_ids
        rows.append({"input_ids": ids, "labels": [-100] * len(head) + ids[len(head):]})
    out = []
    with adapter_state(model, active=list(teacher_adapters)):
        for _, logp, mask in answer_logprobs(model, rows, pad_id(tokenizer), batch_size=BATCH):  # (B, T) each
            out.extend((logp.sum(-1) / mask.sum(-1)).tolist())
    return out


def take_turns(groups: Sequence[Sequence[Any]], size: int) -> list[Any]:
    """The first item of each group, then the second of each, ...: at most ``size`` items.

    >>> take_turns([["a1", "a2", "a3"], ["b1"]], size=3)
    ['a1', 'b1', 'a2']
    """
    return [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)][:size]


def _shared(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fold(text: str) -> str:
    """Lower case, single spaces: how names are compared."""
    return " ".join(text.casefold().split())
