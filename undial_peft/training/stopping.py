"""Stop when forgotten: a `TrainerCallback` that measures the forget set while training.

Every ``check_every`` optimizer steps it runs the forget set (and the retain set, when given)
through the model with the new adapter on (no grad, eval mode; train mode is restored) and stops;
without a retain set, checks start at ``min_steps`` (none could stop training earlier), and a
fixed-length run (no target) is measured once, after its last step:

- ``target``: the forget set's mean key probability reached every given target: at most
  ``until_ratio`` x its value before training and/or at most ``until_prob``;
- ``retain_budget``: the retain set's mean answer probability fell by more than
  ``max_retain_drop`` (a fraction of its value before). The adapter is then rolled back to the last
  check that was within the budget, so the saved adapter keeps the promise. After a resume from a
  checkpoint the resumed weights are measured first: they are the first point it can roll back to;
- ``max_steps``: the step limit came first; the outcome says by how much the target was missed.

A row's key probability is exp(mean log p) over the tokens that get the UNDIAL adjustment
(``beta_weight > 0``: its key, found by hand or by `answer_keys`, else every answer token), with the
answer so far as context; the set's figure is the mean over rows.

>>> stop = StopWhenForgotten(forget_rows, pad_token_id=0, until_ratio=0.2)  # doctest: +SKIP
>>> trainer.add_callback(stop); trainer.train(); stop.outcome["stopped"]  # doctest: +SKIP
'target'
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from undial_peft.data.encoding import Collator
from undial_peft.errors import UndialConfigError, UndialTrainingError
from undial_peft.training.adapters import adapter_state
from undial_peft.training.loss import IGNORE_INDEX, shift_labels, shift_labels_like
from undial_peft.utils.modes import model_mode

logger = logging.getLogger(__name__)

Features = Sequence[dict[str, list]]  # rows as `data.encode` returns them


@torch.no_grad()
def key_probabilities(model: torch.nn.Module, rows: Features, pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """Per row: exp(mean log p) of the tokens with ``beta_weight > 0`` (all labels if absent). Returns (N,).

    >>> # key_probabilities(model, [encode(tokenizer, Example("Q?", "It is Paris.", "Paris"), 64)], 0)
    """
    out = []
    for batch, logp, mask in answer_logprobs(model, rows, pad_token_id, batch_size):
        if "beta_weight" in batch:  # weights sit on the label positions; shift them like the labels
            keyed = mask & (shift_labels_like(batch["beta_weight"]) > 0)  # (B, T)
            mask = torch.where(keyed.any(-1, keepdim=True), keyed, mask)  # a row without key tokens: all of it
        out.append((logp * mask).sum(-1).div(mask.sum(-1).clamp(min=1)).exp().float().cpu())  # (B,)
    return torch.cat(out)


@torch.no_grad()
def answer_logprobs(
    model: torch.nn.Module, rows: Features, pad_token_id: int, batch_size: int = 16
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Per batch of ``rows``: the collated batch, each position's label log-prob and the answer mask, (B, T) each.

    >>> # for batch, logp, mask in answer_logprobs(model, rows, 0): logp[mask]  -> the answer tokens' log-probs
    """
    device = next(model.parameters()).device
    collate = Collator(pad_token_id)
    with model_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(rows[start : start + batch_size])).items()}
            targets = shift_labels(batch["labels"])  # (B, T): the token each position predicts
            mask = targets != IGNORE_INDEX  # (B, T)
            keep = mask.any(0).nonzero().squeeze(-1)  # (K,) positions some row counts
            # Logits at those K positions only, not (B, T, V): a prompt is most of a row, and Gemma-3's head is 262k wide.
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=keep).logits  # (B, K, V)
            wanted = targets[:, keep]  # (B, K)
            picked = logits.float().log_softmax(-1).gather(-1, wanted.clamp(min=0)[..., None]).squeeze(-1)  # (B, K)
            logp = torch.zeros(targets.shape, dtype=torch.float32, device=device)  # (B, T), 0 where not counted
            logp[:, keep] = torch.where(mask[:, keep], picked, 0.0)
            yield batch, logp, mask


def spread(rows: Features, size: int) -> list[dict[str, list]]:
    """``size`` rows evenly spaced over all of ``rows`` (all of them when there are no more), in order.

    Deterministic, so reruns watch the same rows; spread, so a retain file sorted by topic or source
    is watched across its whole length and not only its head.

    >>> [r["i"] for r in spread([{"i": i} for i in range(10)], 4)]
    [0, 2, 5, 7]
    """
    rows = list(rows)
    if len(rows) <= size:
        return rows
    return [rows[i * len(rows) // size] for i in range(size)]


def _answer_only(rows: Features) -> list[dict[str, list]]:
    # Retain rows are judged on the whole answer, whatever their keys.
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


class StopWhenForgotten(TrainerCallback):
    """Stops training at a forget target or a retain budget; ``outcome`` says why and with what figures.

    Args:
        forget_rows: encoded forget rows (``input_ids``, ``labels``, ``beta_weight``).
        pad_token_id: the tokenizer's pad id, for batching.
        until_ratio: stop when the forget key probability is <= this fraction of its value before.
        until_prob: stop when it is <= this absolute value. With both, both must hold.
        check_every: measure every N optimizer steps.
        min_steps: the target does not stop training before this step. Past the target, UNDIAL's
            key probability settles near its adjusted-target floor while the distillation of the
            other tokens undoes collateral damage (measured in the README), so stopping at the
            first check below the target is not what keeps other facts.
        retain_rows: encoded retain rows to watch.
        max_retain_rows: how many of them are scored at each check: evenly spaced over the whole
            set (`spread`); every check is a forward pass over them.
        max_retain_drop: stop when the retain answer probability fell by more than this fraction.
        teacher_adapters: the adapters active before this request, to measure "before" correctly
            even when training resumes from a checkpoint (the new adapter is switched off for it).
    """

    def __init__(
        self,
        forget_rows: Features,
        pad_token_id: int,
        *,
        until_ratio: float | None = None,
        until_prob: float | None = None,
        check_every: int = 1,
        min_steps: int = 0,
        retain_rows: Features | None = None,
        max_retain_drop: float | None = None,
        max_retain_rows: int = 16,
        teacher_adapters: Sequence[str] | None = None,
    ) -> None:
        if check_every < 1:
            raise UndialConfigError(f"check_every={check_every} is invalid: measure every 1 or more steps.")
        self.forget_rows, self.pad = list(forget_rows), pad_token_id
        if max_retain_rows < 1:
            raise UndialConfigError(f"max_retain_rows={max_retain_rows} is invalid: watch at least 1 retain row.")
        if min_steps < 0:
            raise UndialConfigError(f"min_steps={min_steps} is invalid: use 0 (stop at the first check below the target) or more.")
        self.until_ratio, self.until_prob, self.check_every = until_ratio, until_prob, check_every
        self.min_steps = min_steps
        self.retain_rows = _answer_only(spread(retain_rows, max_retain_rows)) if retain_rows and max_retain_drop is not None else []
        self.max_retain_drop = max_retain_drop
        self.teacher_adapters = teacher_adapters
        self.history: list[dict[str, float]] = []
        self.outcome: dict[str, Any] = {}
        self._good: dict[str, torch.Tensor] | None = None  # trainable weights at the last in-budget check
        self._good_point: dict[str, float] = {}  # what that check measured: kept with the weights it describes

    # --- measuring ------------------------------------------------------------------------
    def measure(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """The forget set's mean key probability (and the watched retain rows' answer probability) now."""
        point = {"step": step, "forget": float(key_probabilities(model, self.forget_rows, self.pad).mean())}
        if self.retain_rows:
            point["retain"] = float(key_probabilities(model, self.retain_rows, self.pad).mean())
        return point

    def _target(self, before: float) -> float | None:
        return stopping_target(before, self.until_ratio, self.until_prob)

    def _snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        # Only a retain budget rolls back; without one the copy would never be read.
        if not self.retain_rows:
            return None
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    # --- callback hooks -------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs["model"]
        if self.teacher_adapters is not None:  # the deployed model: new adapter off
            with adapter_state(model, active=self.teacher_adapters):
                before = self.measure(model, 0)
        else:
            before = self.measure(model, 0)
        self.history = [before]
        target = self._target(before["forget"])
        self.outcome = {"forget_before": before["forget"], "target": target, "retain_before": before.get("retain")}
        if self.max_retain_drop is not None and "retain" in before:
            self.outcome["retain_floor"] = before["retain"] * (1 - self.max_retain_drop)
        if state.global_step > 0:
            # Resumed from a checkpoint: the model holds step k's weights, not the ones "before"
            # measured (new adapter off). Measure them, so that a roll-back returns to weights whose
            # figures are known, and the outcome reports those figures as "after".
            resumed = {**self.measure(model, state.global_step), "resumed": 1.0}
            self.history.append(resumed)
            floor = self.outcome.get("retain_floor")
            if floor is not None and resumed["retain"] < floor:
                raise UndialTrainingError(
                    f"the checkpoint at step {state.global_step} already loses more of the retain set than"
                    f" max_retain_drop allows (retain probability {resumed['retain']:.4f} < {floor:.4f}) and"
                    " no weights within the budget are left to roll back to: train again without resume (--resume).")
        self._good, self._good_point = self._snapshot(model), self.history[-1]

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self._due(state.global_step, state.max_steps):
            return
        model = kwargs["model"]
        point = self.measure(model, state.global_step)
        self.history.append(point)
        logger.info("step %d: forget key probability %.4f%s", point["step"], point["forget"],
                    f", retain {point['retain']:.4f}" if "retain" in point else "")
        floor = self.outcome.get("retain_floor")
        if floor is not None and point["retain"] < floor:
            self._roll_back(model)
            control.should_training_stop = True
            return
        self._good, self._good_point = self._snapshot(model), point
        target = self.outcome["target"]
        if target is not None and point["forget"] <= target and state.global_step >= self.min_steps:
            self.outcome.update(stopped="target")
            control.should_training_stop = True

    def _due(self, step: int, max_steps: int) -> bool:
        if step >= max_steps:
            return True  # the last step is always measured: it gives the figures after training
        if step % self.check_every:
            return False
        # Without a retain set to guard, a check can only stop training at the target from min_steps
        # on; before that (or without a target) it would cost a forward pass over the forget set for
        # nothing, about as much as a training step on a small request.
        return bool(self.retain_rows) or (self.outcome["target"] is not None and step >= self.min_steps)

    def _roll_back(self, model: torch.nn.Module) -> None:
        # The snapshot and the point that measured it were saved together: "after" is what the kept
        # weights measured, also when they are the resumed ones.
        last_good = self._good_point
        with torch.no_grad():
            for name, param in model.named_parameters():
                if self._good is not None and name in self._good:
                    param.copy_(self._good[name])
        self.outcome.update(stopped="retain_budget", exceeded_at_step=self.history[-1]["step"])
        self.history.append({**last_good, "rolled_back": 1.0})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        last, target = self.history[-1], self.outcome.get("target")
        if target is not None and "stopped" not in self.outcome and last["forget"] <= target:
            self.outcome["stopped"] = "target"  # reached, at a step limit below min_steps
        self.outcome.setdefault("stopped", "max_steps" if target is not None else "fixed_length")
        self.outcome.update(step=int(last["step"]), forget_after=last["forget"], retain_after=last.get("retain"),
                            checks=len(self.history) - 1)
        self._good, self._good_point = None, {}
        logger.info("%s", describe_outcome(self.outcome))
        if self.outcome["stopped"] in ("max_steps", "retain_budget") and self.outcome.get("target") is not None:
            logger.warning("target not reached: forget key probability %.4f, target %.4f (missed by %.4f)",
                           last["forget"], self.outcome["target"], last["forget"] - self.outcome["target"])


def stopping_target(before: float, until_ratio: float | None, until_prob: float | None) -> float | None:
    """The key probability that stops training: ``until_ratio`` x before and/or ``until_prob`` (with both,
    both must hold: the lower), or None without a target.

    >>> stopping_target(0.8, 0.2, None), stopping_target(0.8, 0.2, 0.1), stopping_target(0.8, None, None)
    (0.16000000000000003, 0.1, None)
    """
    limits = [x for x in (None if until_ratio is None else until_ratio * before, until_prob) if x is not None]
    return min(limits) if limits else None


def describe_outcome(outcome: dict[str, Any]) -> str:
    """One line saying why training stopped, with the before/after figures.

    >>> describe_outcome({"stopped": "target", "step": 12, "forget_before": 0.8, "forget_after": 0.15, "target": 0.16})
    'stopped at step 12: target reached; forget key probability 0.800 -> 0.150 (0.19x; target 0.160)'
    """
    reason = {"target": "target reached", "retain_budget": "retain budget reached (rolled back to the last check within it)",
              "max_steps": "step limit reached before the target", "fixed_length": "fixed length (no target)"}
    before, after = outcome["forget_before"], outcome["forget_after"]
    why = reason[outcome["stopped"]]
    if outcome.get("deployed", {}).get("reached") is False and outcome["stopped"] == "target":
        why = "target reached on the 4-bit model trained, NOT as served"
    if outcome.get("llama_cpp", {}).get("reached") is False and outcome["stopped"] == "target":
        why = "target reached in PyTorch, NOT in llama.cpp"
    text = f"stopped at step {outcome['step']}: {why}; forget key probability {before:.3f} -> {after:.3f}"
    text += f" ({after / before:.2f}x" if before > 0 else " ("
    text += f"; target {outcome['target']:.3f})" if outcome.get("target") is not None else ")"
    if outcome.get("retain_before") is not None and outcome.get("retain_after") is not None:
        text += f"; retain probability {outcome['retain_before']:.3f} -> {outcome['retain_after']:.3f}"
    if (silence := outcome.get("silence")) and silence.get("asked"):
        text += (f"; greedy answers saying their key {silence['before']} -> {silence['at_target']} at the target"
                 f" -> {silence['after']} of {silence['asked']} ({silence['rounds']} silence round"
                 f"{'' if silence['rounds'] == 1 else 's'})")
    # Measured on another form than the one trained: the full-precision base after --4bit, llama.cpp.
    served = [outcome[k] for k in ("deployed", "llama_cpp") if outcome.get(k, {}).get("forget_before") is not None]
    if served:
        from undial_peft.training.verify import describe_deployed  # verify imports this module

        text += "".join(f"; {describe_deployed(figures)}" for figures in served)
    return text

