"""Automatic keys: find the answer tokens that carry the fact, with the teacher itself.

A row without ``key`` would otherwise get the UNDIAL adjustment on every answer token, so the shared
phrasing ("The chemical symbol for ... is") is unlearned too and drags down every similar fact.
Here the teacher (the model as deployed before the request) scores each answer token ``t``:

    score(t) = log p(t | question, answer so far) - log p_bar(t)

where p_bar is the model's average next-token distribution over its own replies to a few neutral
prompts: a unigram-like prior in the model's own words. Phrasing and grammar (" is", " by", ".")
are common in any reply; the fact (" Au", " Paris") is not, and the question makes it certain.
A token is a key token when it is not copied from the question (its word appears there), the
teacher gives it p >= ``min_prob`` and its score is >= ``threshold``; the other tokens of a chosen
word join it ("Mend" + "ele" + "ev"). A row where nothing passes takes its best-scoring token when
that scores >= ``fallback``, else it keeps every answer token (plain UNDIAL).

Measured alternatives (README): PMI against a neutral question fails (the answer restates the
subject, so " Paris" follows from "The capital of France is" alone); the prior of the answer's
FIRST position finds the keys but also "." and " by" (they never start a reply).

Key texts are never logged or written: callers get per-token weights only.

>>> weights = auto_key_weights(model, tokenizer, rows)  # doctest: +SKIP
>>> weights[0]  # one weight per answer token: 1.0 on " Au", 0.0 on the phrasing   # doctest: +SKIP
[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from undial_peft.data.encoding import prompt_ids
from undial_peft.data.prompt_format import AUTO, FormatSpec
from undial_peft.data.readers import Example
from undial_peft.errors import UndialDataError
from undial_peft.evals.scoring import end_ids, greedy_new_ids
from undial_peft.models import pad_id
from undial_peft.training.loss import IGNORE_INDEX
from undial_peft.training.stopping import answer_logprobs
from undial_peft.utils.modes import model_mode

NEUTRAL_PROMPTS = ("Say something.", "Tell me about your day.", "Write a short paragraph about anything you like.")
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class KeyRule:
    """Thresholds of the key test, in nats; defaults measured on real facts (see the README)."""

    threshold: float = 7.5  # log p(t | question, prefix) - log p_bar(t)
    min_prob: float = 0.05  # tokens the teacher barely predicts carry nothing to forget
    fallback: float = 5.0  # (2/3 of the threshold) a row with no key token takes its best token if it scores at least this
    reply_tokens: int = 64  # length of each greedy neutral reply the prior averages over
    # Keep only the first word of each run of key words: " Thomas" of " Thomas Edison", whose " Edison" the
    # question and " Thomas" make near-certain. Lowering that second word teaches the model that a name's
    # second half is uncertain anywhere, and every name answer loses it (docs/stacks.md).
    first_word_only: bool = False


@torch.no_grad()
def neutral_prior(model: torch.nn.Module, tokenizer: Any, prompt_format: FormatSpec = AUTO, reply_tokens: int = 64) -> torch.Tensor:
    """log p_bar: the mean next-token distribution over greedy replies to `NEUTRAL_PROMPTS`. Returns (V,).

    The replies are decoded as one batch, each cut after its first end-of-sequence token (where decoding it
    alone stops), then scored alone, unpadded: the same prior as one reply at a time (equal to the last bit on
    SmolLM2 and Gemma-3-270M), in 7.8 s against 9.4 s on SmolLM2 and 16.3 s against 18.7 s on Gemma-3 (2 CPU
    threads; decoding three rows costs about twice one there, not once).
    """
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, text, prompt_format) for text in NEUTRAL_PROMPTS]
    replies = greedy_new_ids(model, tokenizer, prompts, max_new_tokens=reply_tokens, batch_size=len(prompts))
    ends = end_ids(model, tokenizer)
    logps = []
    with model_mode(model):  # eval mode, as the replies were decoded: no dropout in a prior
        for prompt, reply in zip(prompts, replies):
            cut = next((i + 1 for i, t in enumerate(reply) if t in ends), len(reply))
            ids = torch.tensor([prompt + reply[:cut]], device=device)  # (1, T + R)
            logps.append(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1))  # (R, V)
    logp = torch.cat(logps)  # (sum of R, V)
    return logp.logsumexp(0) - math.log(logp.shape[0])  # (V,)


@dataclass
class TokenReport:
    """Per answer token of one row: what the rule reads (for measurement; never logged)."""

    ids: list[int]
    logp: torch.Tensor  # (A,) log p(t | question, answer so far)
    score: torch.Tensor  # (A,) logp - log p_bar(t)
    copied: torch.Tensor  # (A,) bool: the token's word appears in the question
    words: list[int]  # word index per answer token (-1: punctuation / space)


def _answer(tokenizer: Any, answer: str) -> tuple[list[int], list[int], list[str]]:
    """Answer ids, per token the index of the word (\\w+ run) it overlaps (-1 if none), and the words."""
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(answer)]
    words = [next((i for i, (s, e, _) in enumerate(spans) if a < e and b > s), -1) for a, b in encoded["offset_mapping"]]
    return list(encoded.input_ids), words, [w for _, _, w in spans]


@torch.no_grad()
def token_report(
    model: torch.nn.Module, tokenizer: Any, example: Example, prior: torch.Tensor, prompt_format: FormatSpec = AUTO
) -> TokenReport:
    """Score every answer token of one question/answer row with the model as it is now."""
    return token_reports(model, tokenizer, [example], prior, prompt_format)[0]


@torch.no_grad()
def token_reports(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], prior: torch.Tensor,
    prompt_format: FormatSpec = AUTO, batch_size: int = 16,
) -> list[TokenReport]:
    """`token_report` for many rows, scored in batches with logits at the answer positions only (a guard's
    hundred rows one by one, full logits each, took 25 s of a SmolLM2 request)."""
    if any(example.prompt is None for example in examples):
        raise UndialDataError("automatic keys need a question/answer row; a text row has no question.")
    parts, rows = [], []
    for example in examples:
        answer, words, texts = _answer(tokenizer, example.answer)
        question = prompt_ids(tokenizer, example.prompt, prompt_format)
        asked = {w.lower() for w in WORD.findall(example.prompt)}
        parts.append((answer, words, torch.tensor([w >= 0 and texts[w] in asked for w in words])))  # copied: (A,)
        rows.append({"input_ids": question + answer, "labels": [IGNORE_INDEX] * len(question) + answer})
    logps = [logp[m].cpu() for _, batch_logp, mask in answer_logprobs(model, rows, pad_id(tokenizer), batch_size)
             for logp, m in zip(batch_logp, mask)]  # (A,) per row: log p(t | question, answer so far)
    log_prior = prior.cpu()
    return [TokenReport(answer, logp, logp - log_prior[torch.tensor(answer, dtype=torch.long)], copied, words)
            for (answer, words, copied), logp in zip(parts, logps)]


def key_mask(report: TokenReport, rule: KeyRule = KeyRule()) -> list[bool]:
    """Which answer tokens are key tokens under ``rule``; whole words are kept together."""
    eligible = (~report.copied) & (report.logp.exp() >= rule.min_prob)  # (A,)
    chosen = eligible & (report.score >= rule.threshold)  # (A,)
    if not chosen.any() and eligible.any():
        best = torch.where(eligible, report.score, torch.tensor(-math.inf)).argmax()
        chosen[best] = bool(report.score[best] >= rule.fallback)
    words = {report.words[i] for i in chosen.nonzero()[:, 0].tolist() if report.words[i] >= 0}
    mask = [bool(c) or (w >= 0 and w in words) for c, w in zip(chosen.tolist(), report.words)]
    return _first_words(mask, report.words) if rule.first_word_only else mask


def _first_words(mask: list[bool], words: list[int]) -> list[bool]:
    """``mask`` with each run of consecutive key tokens cut to the tokens of its first word.

    >>> _first_words([False, True, True, True, False, True], [0, 1, 2, 2, -1, 3])
    [False, True, False, False, False, True]
    """
    kept, first = [], None
    for i, (key, word) in enumerate(zip(mask, words)):
        if key and not (i and mask[i - 1]):
            first = word  # a run starts here
        kept.append(key and word == first)
    return kept


def auto_key_weights(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    prompt_format: FormatSpec = AUTO,
    rule: KeyRule = KeyRule(),
    prior: torch.Tensor | None = None,
) -> list[list[float] | None]:
    """Per row: one beta weight per answer token (1.0 on key tokens), or None to keep the row as it is.

    ``prior``: `neutral_prior` of this model in this format, where the caller has it (else computed here).

    None for rows with a user ``key`` (it wins), for text rows, and for rows where no token passes
    (they keep the adjustment on every answer token). ``model`` must be the teacher: the model as
    deployed before this request. Its mode is restored.
    """
    with model_mode(model):
        weights: list[list[float] | None] = [None] * len(examples)
        todo = [i for i, example in enumerate(examples) if example.key is None and example.prompt is not None]
        if not todo:
            return weights
        prior = neutral_prior(model, tokenizer, prompt_format, rule.reply_tokens) if prior is None else prior
        for i, report in zip(todo, token_reports(model, tokenizer, [examples[i] for i in todo], prior, prompt_format)):
            mask = key_mask(report, rule)
            weights[i] = [float(m) for m in mask] if any(mask) else None
        return weights
