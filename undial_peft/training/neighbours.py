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

A third side is the answers' kind: forget inventors (answers: people) and the model loses authors.
`answer_type_prompts` asks the bank relations whose answers the teacher lists after the forget answers
about as readily as those themselves, about more subjects of theirs the teacher names.

Prompts whose template no other forget prompt shares get no neighbours (the shipped bank still guards them).

>>> templates(["What is the capital of France?", "What is the capital of Peru?", "Who wrote Hamlet?"])
{('What is the capital of ', '?'): ['France', 'Peru']}
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
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
TYPE_RELATIONS = 2  # relations asked for the answers' kind: each costs one listing pass of the teacher
# Answers are judged with a wider margin than subjects. Measured on SmolLM2-135M (per-token gap below the
# forget answers' own bar): authors after inventors 1.35 (people after people), the next relation 2.95;
# capitals after continents 2.4 (cities after regions), currencies after languages 2.8.
ANSWER_MARGIN = 1.5
# Words any answer may add to its prompt whatever its fact; never evidence of what kind the answer is.
COMMON = frozenset("a an and are as at by for from in is it its of on or that the this to was were which with".split())


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


def neighbour_subjects(
    model: Any, tokenizer: Any, prompts: Sequence[str], teacher_adapters: Sequence[str], avoid: Sequence[str],
) -> dict[tuple[str, str], list[str]]:
    """Per template of ``prompts``, the other subjects the teacher names (`named_subjects`).

    >>> neighbour_subjects(model, tok, ["The opposite of hot is", "The opposite of up is"], [],
    ...                    avoid=["The opposite of hot is cold."])  # doctest: +SKIP
    {('The opposite of ', ' is'): ['big', 'fast']}
    """
    return {template: named_subjects(model, tokenizer, subjects, teacher_adapters, avoid)
            for template, subjects in templates(prompts).items()}


def neighbour_prompts(named: dict[tuple[str, str], list[str]], size: int) -> list[str]:
    """Up to ``size`` prompts: each template filled with its named subjects, templates taking turns,
    so a request of several relations guards each of them.

    >>> neighbour_prompts({("The opposite of ", " is"): ["big", "fast"], ("Who wrote ", "?"): ["Emma"]}, size=3)
    ['The opposite of big is', 'Who wrote Emma?', 'The opposite of fast is']
    """
    return _take_turns([[f"{prefix}{name}{suffix}" for name in names] for (prefix, suffix), names in named.items()], size)


def _take_turns(groups: Sequence[Sequence[str]], size: int) -> list[str]:
    """The first item of each group, then the second of each, ...: at most ``size`` items."""
    return [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)][:size]


def subject_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], bank: Sequence[dict[str, str]], field: str,
    teacher_adapters: Sequence[str], size: int, named: Sequence[str] = (),
) -> list[str]:
    """Up to ``size`` prompts asking the subjects of ``prompts``, then the ``named`` neighbour subjects,
    the other relations of ``bank``.

    A bank relation's template is its rows' most common ``field`` with each row's ``subject`` as the
    slot. A relation is asked when its subjects are of the forget subjects' kind (`fitting_relations`:
    countries take "capital", "currency" and "official language", not "chemical symbol"). Fills equal
    to a forget prompt are left out (that is the fact being forgotten); training/guard.py also drops
    answers that state a forget answer's words. Relations take turns, so a small ``size`` spans them.
    The neighbour subjects (`neighbour_subjects`: countries the teacher names after the request's) are
    asked too because a request about some countries erodes the same relation about others: after ten
    requests about countries' languages, currencies and continents, SmolLM2 kept the capitals of the
    countries they named (0.97-1.02x) and lost others' (Sweden 0.61x, Kenya 0.66x; docs/stacks.md).
    >>> subject_prompts(model, tok, ["The official language of France is", "The official language of Peru is"],
    ...                 guard_bank(), "stub", [], size=2)  # doctest: +SKIP
    ['The capital of France is', 'The currency of France is the']
    """
    subjects = list(dict.fromkeys(s for group in templates(prompts).values() for s in group))
    if not subjects:
        return []
    fills = list(dict.fromkeys([*subjects, *named]))
    asked = {_fold(p).rstrip(" ?.!:") for p in prompts}
    relations = wordings(bank, field)
    fitting = fitting_relations(model, tokenizer, subjects,
                                {name: [r["subject"] for r in rows] for name, (_, rows) in relations.items()}, teacher_adapters)
    filled = [[q for q in (relations[name][0].format(s) for s in fills) if _fold(q).rstrip(" ?.!:") not in asked]
              for name in fitting]
    return _take_turns(filled, size)


def wordings(bank: Sequence[dict[str, str]], field: str) -> dict[str, tuple[str, list[dict[str, str]]]]:
    """Per bank relation: its usual wording of ``field`` as a ``{}`` slot (the most common over its rows:
    "currency of {}", not one row's "currency of the {}"), and its rows. Rows whose subject is not in
    their text once are skipped; a relation without such a row is left out.

    >>> wordings([{"relation": "capital", "subject": "Peru", "stub": "The capital of Peru is"}], "stub")["capital"][0]
    'The capital of {} is'
    """
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in bank:
        grouped.setdefault(row["relation"], []).append(row)
    found = {}
    for name, rows in grouped.items():
        slots = [slot for row in rows if (slot := as_slot(row[field], row["subject"])) is not None]
        if slots:
            found[name] = (max(slots, key=slots.count), rows)
    return found


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
    scores, bar = _relation_scores(model, tokenizer, subjects, relations, teacher_adapters)
    return [name for name, score in scores.items() if score >= bar - margin]


def _relation_scores(
    model: Any, tokenizer: Any, items: Sequence[str], relations: dict[str, list[str]], teacher_adapters: Sequence[str],
) -> tuple[dict[str, float], float]:
    """Per relation, the mean per-token log-probability of its first `RELATION_SUBJECTS` items as the next
    line after ``items`` listed one per line; and the same for each of ``items`` after the others (at
    most `SAMPLES` of them), averaged: the score of an item of the same kind."""
    listing = "\n".join(items) + "\n"
    held_out = ["\n".join([*items[:k], *items[k + 1:]]) + "\n" for k in range(min(len(items), SAMPLES))]
    pairs = [(context, items[k]) for k, context in enumerate(held_out)]
    relations = {name: list(names[:RELATION_SUBJECTS]) for name, names in relations.items()}
    pairs += [(listing, s) for names in relations.values() for s in names]
    scores = _continuation_logprobs(model, tokenizer, pairs, teacher_adapters)
    bar = sum(scores[: len(held_out)]) / len(held_out)
    per_relation, at = {}, len(held_out)
    for name, names in relations.items():
        per_relation[name] = sum(scores[at: at + len(names)]) / len(names)
        at += len(names)
    return per_relation, bar


def answer_phrases(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Per (prompt, answer): the answer's entity, the longest run of capitalised words it adds to its
    prompt ("... by J.R.R. Tolkien, a British author" -> "J.R.R. Tolkien"), else its first added word
    ("cold"); at most `MAX_WORDS` words.

    Added words leave out the prompt's words, `COMMON` words ("The" starting a sentence), and words
    every answer of ``pairs`` adds (the relation's phrasing), when there are three or more. A model's own answers ramble ("The Hobbit is a classic fantasy novel by
    J.R.R. Tolkien"): the entity is the part that names something.
    >>> answer_phrases([("Who wrote Emma?", "Emma was written by Jane Austen, an English author."),
    ...                 ("Who wrote Dracula?", "Dracula was written by Bram Stoker."),
    ...                 ("What is the opposite of hot?", "The opposite of hot is cold.")])
    ['Jane Austen', 'Bram Stoker', 'cold']
    """
    rows = []  # per answer: (word, added to the prompt, only spaces since the previous word)
    for prompt, answer in pairs:
        row, last = [], None
        for m in re.finditer(r"\w+(?:[.'-]\w+)*(?:(?<=\b\w)\.)?", answer):  # "J.R.R." keeps its last dot
            word = m.group()
            row.append((word, _fold(word) not in words_of(prompt) | COMMON, last is not None and answer[last:m.start()].isspace()))
            last = m.end()
        rows.append(row)
    shared = set.intersection(*({_fold(w) for w, added, _ in row if added} for row in rows)) if len(rows) >= 3 else set()
    phrases = []
    for row in rows:
        runs: list[list[str]] = []
        first, in_run = None, False
        for word, added, joined in row:
            added = added and _fold(word) not in shared
            first = first or (word if added else None)
            if added and word[0].isupper():
                if in_run and joined:
                    runs[-1].append(word)
                else:
                    runs.append([word])
            in_run = added and word[0].isupper()
        best = max(runs, key=len, default=[first] if first else [])
        phrases.append(" ".join(best[:MAX_WORDS]))
    return phrases


def answer_type_prompts(
    model: Any, tokenizer: Any, forget_answers: Sequence[str], relations: dict[str, tuple[str, list[str], list[str]]],
    teacher_adapters: Sequence[str], avoid: Sequence[str], size: int, asked: Collection[str] = (),
) -> list[str]:
    """Up to ``size`` prompts of the bank relations whose answers are of the forget answers' kind.

    ``relations``: name -> (its wording with a ``{}`` slot, its bank subjects, the teacher's answers to
    them as `answer_phrases`). The `TYPE_RELATIONS` best-scoring relations that fit (`fitting_relations`
    over the answers: people after people, not cities) are filled with subjects the teacher names after
    theirs (`named_subjects`, none found in ``avoid``); prompts in ``asked`` are left out.
    >>> answer_type_prompts(model, tok, ["Alexander Graham Bell", "Thomas Edison"],
    ...                     {"author": ("Who wrote {}?", ["Hamlet", "Emma"], ["William Shakespeare", "Jane Austen"])},
    ...                     [], avoid=[], size=2)  # doctest: +SKIP
    ['Who wrote Dracula?', 'Who wrote Ulysses?']
    """
    phrases = [p for p in dict.fromkeys(forget_answers) if p]
    candidates = {name: answers for name, (_, _, answers) in relations.items() if len([a for a in answers if a]) >= 2}
    if len(phrases) < 2 or not candidates:
        return []
    scores, bar = _relation_scores(model, tokenizer, phrases, {n: [a for a in answers if a] for n, answers in candidates.items()},
                                   teacher_adapters)
    best = sorted((name for name, score in scores.items() if score >= bar - ANSWER_MARGIN), key=lambda n: -scores[n])
    done = {_fold(p).rstrip(" ?.!:") for p in asked}
    filled = []
    for name in best[:TYPE_RELATIONS]:
        slot, subjects, _ = relations[name]
        names = named_subjects(model, tokenizer, subjects, teacher_adapters, avoid)
        filled.append([q for q in (slot.format(n) for n in names) if _fold(q).rstrip(" ?.!:") not in done])
    return _take_turns(filled, size)


def as_slot(text: str, subject: str) -> str | None:
    """``text`` with its one ``subject`` as a ``{}`` slot (`slot_of`), None if not there once."""
    if text.count(subject) != 1:
        return None
    return slot_of(*text.split(subject))


def slot_of(prefix: str, suffix: str) -> str:
    """A template as a format string: ``prefix + "{}" + suffix``, other braces escaped.

    >>> slot_of("Who wrote {the} ", "?").format("Emma")
    'Who wrote {the} Emma?'
    """
    return prefix.replace("{", "{{").replace("}", "}}") + "{}" + suffix.replace("{", "{{").replace("}", "}}")


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


def _shared(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def words_of(text: str) -> set[str]:
    """The lower-case words of ``text``."""
    return set(re.findall(r"\w+", text.casefold()))


def _fold(text: str) -> str:
    """Lower case, single spaces: how names are compared."""
    return " ".join(text.casefold().split())
