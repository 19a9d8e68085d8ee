"""What the teacher adds to a forget request before training: keys and guard rows.

The teacher is the model as deployed before the request (the new adapter off). It finds the forget rows'
automatic keys (training/answer_keys.py), answers the guard's prompts (training/guard.py), and finds the
fact tokens of those answers that the guard's KL may weigh (`UndialConfig.guard_key_weight`). The key
searches share one neutral prior per teacher (its three greedy replies: 7.8 s on SmolLM2, against 9.3 s to score
78 rows).

>>> priors = {}
>>> weights = forget_keys(model, tokenizer, rows, config, teacher, priors)  # doctest: +SKIP
>>> guard = guard_for(model, tokenizer, rows, None, config, teacher)  # doctest: +SKIP
>>> keys = guard_keys(model, tokenizer, guard, config, teacher, encoded_rows, priors)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from undial_peft.data.readers import Example
from undial_peft.training.adapters import adapter_state
from undial_peft.training.answer_keys import KeyRule, auto_key_weights, neutral_prior
from undial_peft.training.config import UndialConfig
from undial_peft.training.guard import drop_forgotten, guard_rows

logger = logging.getLogger(__name__)


def forget_keys(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[Example], config: UndialConfig, teacher: Sequence[str],
    priors: dict[tuple[str, ...], torch.Tensor] | None = None,
) -> list[list[float] | None]:
    """The forget rows' automatic keys where this run uses them (UNDIAL with ``auto_key``), else None per row."""
    if not (config.auto_key and config.method == "undial"):
        return [None] * len(rows)
    return auto_keys(model, tokenizer, rows, config, teacher, priors)


def auto_keys(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[Example], config: UndialConfig, teacher: Sequence[str],
    priors: dict[tuple[str, ...], torch.Tensor] | None = None,
) -> list[list[float] | None]:
    """Automatic key weights per row (None: the row keeps its own), from ``teacher`` (the new adapter off).

    ``priors`` keeps the neutral prior per teacher for the request's next key search (the guard's answers
    under the same teacher): its three greedy replies take 7.8 s on SmolLM2.
    """
    if not any(row.key is None and row.prompt is not None for row in rows):
        return [None] * len(rows)  # every row keeps its own key (or has no question): no search, no prior
    rule = KeyRule(threshold=config.auto_key_threshold, fallback=config.auto_key_threshold * 2 / 3,
                   first_word_only=config.auto_key_first_word)
    priors = {} if priors is None else priors
    with adapter_state(model, active=teacher):
        if tuple(teacher) not in priors:
            priors[tuple(teacher)] = neutral_prior(model, tokenizer, config.prompt_format, rule.reply_tokens)
        return auto_key_weights(model, tokenizer, rows, prompt_format=config.prompt_format, rule=rule,
                                prior=priors[tuple(teacher)])


def guard_anchor(config: UndialConfig, teacher: Sequence[str]) -> list[str]:
    """The adapters active in the model whose answers the guard keeps: the stack, or none (the base alone).

    >>> guard_anchor(UndialConfig(guard_teacher="base"), ["stack_0"]), guard_anchor(UndialConfig(), ["stack_0"])
    ([], ['stack_0'])
    """
    return [] if config.guard_teacher == "base" else list(teacher)


def guard_for(
    model: torch.nn.Module, tokenizer: Any, forget_rows: Sequence[Example], retain_rows: Sequence[Example] | None,
    config: UndialConfig, teacher: Sequence[str],
) -> list[Example]:
    """The guard's rows (training/guard.py), or [] where there is no guard to train."""
    if config.guard == "none":  # resolved by UndialConfig.resolved_guard: also with the user's retain data
        if retain_rows is not None:
            logger.info("guard skipped: the request has its own retain data, which says better what to keep")
        return []
    # A run measured in epochs keeps its epoch at the forget rows: one guard row per forget row.
    size = config.guard_rows if config.max_steps > 0 else min(config.guard_rows, len(forget_rows))
    start = time.perf_counter()
    rows = guard_rows(model, tokenizer, config.prompt_format, forget_rows, guard_anchor(config, teacher), size=size,
                      neighbours=config.guard == "neighbours")
    if config.guard_teacher == "base":
        rows = drop_forgotten(model, tokenizer, rows, config.prompt_format, teacher, config.max_length)
    rows = rows if config.max_steps > 0 else rows[:size]  # neighbours come on top of the bank's `size`
    if rows:
        logger.info("guard=%s: %d teacher answers kept by KL (weight %s), answered in %.1f s", config.guard, len(rows),
                    config.guard_weight, time.perf_counter() - start)
    else:
        logger.warning("guard=%s: the teacher answered none of the bank prompts; training without a guard", config.guard)
    return rows


def guard_keys(
    model: torch.nn.Module, tokenizer: Any, guard: Sequence[Example], config: UndialConfig, teacher: Sequence[str],
    forget_features: Sequence[dict[str, list]], priors: dict[tuple[str, ...], torch.Tensor] | None = None,
) -> list[list[float] | None] | None:
    """The guard answers' fact tokens (1.0 per answer token), found by the automatic-key rule with the model
    that answered them; None where the guard's KL weighs every token alike (no guard, or ``guard_key_weight`` 0).

    A fact token that is also one of the request's key tokens is not weighed: "Mexico's language is Spanish"
    beside a request that forgets Spain's " Spanish" would pull, K times over, on the very token the request
    lowers (the second of the ten SmolLM2 requests, chemistry and three languages, at K = 3: 0.24x of its hand
    keys without this rule, 0.06x with it). It keeps the plain guard's weight, as before K.
    >>> # guard_keys(model, tok, guard, UndialConfig(guard_key_weight=3), [], features)[0]  -> [0.0, ..., 1.0, 0.0]
    """
    if not guard or config.guard_key_weight == 0:
        return None
    start = time.perf_counter()
    keys = auto_keys(model, tokenizer, guard, config, guard_anchor(config, teacher), priors)
    lowered = {t for row in forget_features for t, w in zip(row["input_ids"], row["beta_weight"]) if w > 0}
    shared = 0
    for i, (row, row_keys) in enumerate(zip(guard, keys)):
        if row_keys is not None:
            ids = tokenizer(row.answer, add_special_tokens=False).input_ids  # the answer tokens the weights follow
            kept = [w if t not in lowered else 0.0 for t, w in zip(ids, row_keys)]
            shared += kept != row_keys
            keys[i] = kept if any(kept) else None
    logger.info("guard: fact tokens found in %d of %d answers (%d held a token this request lowers, left at 1x), "
                "weighed %sx in the KL (%.1f s)", sum(k is not None for k in keys), len(keys), shared,
                1 + config.guard_key_weight, time.perf_counter() - start)
    return keys
