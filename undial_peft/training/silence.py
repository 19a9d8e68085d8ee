"""Greedy silence: does the model, asked a forget row's prompt, still say the row's key?

Key probability is measured on the request's own answer, token by token. A model can lower it there
and still say the fact on another path: measured on the demo (SmolLM2), past the target the greedy
answer to "What is the capital of Japan?" became "The capital of Japan is **Tokyo**." (the key
probability after "is" was 0.05x; the fact came after a markdown token the row never had).
`named_rows` asks each forget prompt greedily and finds the rows whose answer still holds the key's
text; `escape_row` turns such an answer into a forget row keyed on where it says the key; and
`silence_rounds`, which `forget` calls after the target, trains on the paths the model actually takes
(``config.silence_rounds``).

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

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import torch

from undial_peft.data.encoding import Collator, with_forget_rows
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.evals.scoring import greedy_new_ids
from undial_peft.training.adapters import adapter_state
from undial_peft.training.config import UndialConfig
from undial_peft.training.loss import IGNORE_INDEX
from undial_peft.training.stopping import StopWhenForgotten
from undial_peft.training.teacher_cache import INDEX
from undial_peft.training.trainer import UndialTrainer

logger = logging.getLogger(__name__)

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


def spoken_key(keys: Sequence[str]) -> str:
    """The word an answer must say to state a row's fact: the last word of its longest key run.

    A key in several runs (the J, K and Rowling of J.K. Rowling) is found by its longest, since a single
    letter is in any other name. Automatic keys take a fact's modifiers along ("East Africa", "Canadian
    Dollar", "Thomas Edison"): an answer that says "Africa", "dollar" or "Edison" still states the fact, so
    the run's last word (the head of an English noun phrase, a person's surname) is what is looked for.
    >>> spoken_key(["J", "K", "Rowling"]), spoken_key(["East Africa"]), spoken_key(["Fe"])
    ('Rowling', 'Africa', 'Fe')
    """
    longest = max(keys, key=len)
    return longest.split()[-1].strip(".,;:!?\"'()") or longest


def says(text: str, key: str) -> bool:
    """Whether ``text`` says ``key`` as a word of its own, allowing a plural or possessive ending.

    Not inside another word ("Fe" is not in "Ferrous"), but "Shakespeares" and "Tokyo's" say it. Keys of three
    characters or more match in any case ("TOKYO", "rupee"); shorter ones (chemical symbols) only as written,
    since "fe" or "au" is part of other text.
    >>> says("The capital of Japan is **Tokyo**.", "Tokyo"), says("It is Ferrous.", "Fe"), says("Fe, iron", "Fe")
    (True, False, True)
    >>> says("a play by William Shakespeares", "Shakespeare"), says("the Indian rupee", "Rupee"), says("fe", "Fe")
    (True, True, False)
    """
    flags = re.IGNORECASE if len(key) >= 3 else 0
    return re.search(rf"(?<!\w){re.escape(key)}(?:'s|\u2019s|s|es)?(?!\w)", text, flags) is not None


def prompt_of(row: dict[str, list]) -> list[int] | None:
    """The row's prompt ids (everything before its first answer token), or None for a text row."""
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    return row["input_ids"][:first] if first > 0 else None


def answers_end_at_newline(prompt_format: Any, tokenizer: Any) -> bool:
    """Whether greedy answers in this prompt format end at their first newline: completion and template prompts
    (a base model's continuation), not chat turns, which end at the end of the turn."""
    return PromptFormat.resolve(prompt_format, tokenizer).kind != "chat"


def named_rows(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, list]], one_line: bool = False,
) -> tuple[list[Named], int]:
    """Ask every keyed prompt row greedily; return the rows whose answer says the key, and how many were asked.

    An answer ends at the end of the turn (eos or pad); with ``one_line`` (completion and template prompts)
    also at its first newline, as the guard cuts them: a base model's continuation runs on past its answer
    into new text ("iron.\\n\\nIron is a chemical element with the symbol Fe"), which is not the answer asked.
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
        ends = (n for n, t in enumerate(ids) if t in stop or (one_line and "\n" in tokenizer.decode([t])))
        ids = ids[: next(ends, len(ids))]
        key = spoken_key(keys)
        if says(tokenizer.decode(ids, skip_special_tokens=True), key):
            named.append(Named(i, ids, key))
    return named, len(asked)


def escape_row(tokenizer: Any, row: dict[str, list], named: Named) -> dict[str, list]:
    """A forget row: the row's prompt, the model's answer up to the end of the key's first mention, keyed there.

    The key's tokens are the shortest run of answer tokens whose text holds the key; the answer is cut after
    it (what follows is the model's own text, which the distillation would only hold in place).
    >>> # escape_row(tok, row, Named(0, ids_of(" **Tokyo**."), "Tokyo"))["beta_weight"]  -> [0, 0, 1, 1] on the answer
    """
    ids = named.answer_ids

    def holds(part: list[int]) -> bool:  # as `named_rows` found it: the key as a word of its own
        return says(tokenizer.decode(part, skip_special_tokens=True), named.key)

    end = next(n for n in range(1, len(ids) + 1) if holds(ids[:n]))
    start = max(s for s in range(end) if holds(ids[s:end]))
    prompt = prompt_of(row) or []
    answer = ids[:end]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "beta_weight": [0.0] * len(prompt) + [1.0 if start <= n else 0.0 for n in range(len(answer))],
    }


def silence_rounds(
    trainer: UndialTrainer, tokenizer: Any, features: Sequence[dict[str, list]], stopper: StopWhenForgotten,
    config: UndialConfig, said_before: int | None = None,
) -> datasets.Dataset:
    """Train on the paths the model still takes to say a forget row's key; return the training set grown by them.

    Each round asks every keyed forget prompt greedily (training/silence.py); the answers that say the key
    become forget rows keyed there, added to the training set, and training goes on for `ROUND_STEPS` steps
    with ``trainer``'s model, arguments and teachers (a fresh optimizer; the teacher answers only the new
    rows, the others are copied from the previous trainer's cache). Rounds follow only a reached target (a
    step limit or a retain budget ends the request as it was), and a round that takes the user's retain set
    past ``max_retain_drop`` is rolled back. The outcome records how many answers said their key before
    training, at the target and at the end, on the model trained (in a 4-bit run the NF4 model, not the
    full-precision base it is served on).

    ``said_before``: the teacher's count where the caller has it (a 4-bit run's served figures), saving a pass.
    >>> dataset = silence_rounds(trainer, tokenizer, forget_features, stopper, config)  # doctest: +SKIP
    >>> stopper.outcome["silence"]  # doctest: +SKIP
    {'asked': 6, 'before': 6, 'at_target': 2, 'rounds': 3, 'steps': 30, 'after': 1}
    """
    model, teacher, dataset = trainer.model, trainer.stack, trainer.train_dataset
    one_line = answers_end_at_newline(config.prompt_format, tokenizer)
    if INDEX in dataset.column_names:
        dataset = dataset.remove_columns(INDEX)
    if said_before is None:  # the teacher's own count, unless the caller measured it on this model already
        with adapter_state(model, active=teacher):
            said_before = len(named_rows(model, tokenizer, features, one_line)[0])
    named, asked = named_rows(model, tokenizer, features, one_line)
    record: dict[str, Any] = {"asked": asked, "before": said_before, "at_target": len(named), "rounds": 0,
                              "steps": 0}
    stopper.outcome["silence"] = record
    rounds = config.silence_rounds if stopper.outcome.get("stopped") == "target" else 0
    step, floor = stopper.outcome["step"], stopper.outcome.get("retain_floor")
    while named and record["rounds"] < rounds:
        logger.info("silence round %d: %d of %d greedy answers still say their key; training on them",
                    record["rounds"] + 1, len(named), asked)
        kept = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        grown = with_forget_rows(dataset, [escape_row(tokenizer, features[n.row], n) for n in named])
        previous = trainer
        # The plain guard mean (K = 0): the weighed fact tokens held the very paths a round trains away (the
        # demo at K = 3: 2 of 6 answers still said their key after three weighed rounds, 0 after one plain one).
        args = replace(trainer.args, max_steps=ROUND_STEPS, save_strategy="no", guard_key_weight=0.0)
        trainer = UndialTrainer(model=model, args=args,
                                train_dataset=grown, data_collator=Collator(tokenizer.pad_token_id), stack=teacher,
                                retain_teacher=previous.retain_stack, earlier=previous)
        trainer.keep_teacher_cache = True
        trainer.train()
        previous.teacher_cache = None
        point = {**stopper.measure(model, step + ROUND_STEPS), "silence": 1.0}
        if floor is not None and point["retain"] < floor:  # the user's retain set first, as the stopping rule
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in kept:
                        param.copy_(kept[name])
            record["rolled_back"] = record["rounds"] + 1
            logger.warning("silence round %d took the retain set past max_retain_drop: rolled back", record["rounds"] + 1)
            break
        dataset, step = grown, step + ROUND_STEPS
        record["rounds"] += 1
        record["steps"] += ROUND_STEPS
        stopper.history.append(point)
        stopper.outcome.update(step=step, forget_after=point["forget"], retain_after=point.get("retain"))
        named, _ = named_rows(model, tokenizer, features, one_line)
    trainer.teacher_cache = None
    record["after"] = len(named)
    if named:
        logger.warning("%d of %d greedy answers still say their key after %d silence rounds", len(named), asked,
                       record["rounds"])
    return dataset
