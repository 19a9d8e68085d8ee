"""`UndialTrainer`: transformers' Trainer with the unlearning loss in `compute_loss`, nothing else.

The model is a PEFT model built by `adapters.build_trainable`: earlier forget adapters
(``stack``) active and frozen, plus the trainable ``NEW`` adapter. The teacher is the same module
with ``NEW`` switched off under ``torch.no_grad()``; there is never a second copy of the model.

>>> trainer = UndialTrainer(model=peft_model, args=UndialConfig(output_dir="ckpt"),  # doctest: +SKIP
...                         train_dataset=dataset, data_collator=collator, stack=[])
>>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer
from transformers.training_args import ParallelMode

from . import loss as L
from .adapters import NEW, adapter_state
from .config import UndialConfig
from .manifest import WEIGHTS

Batch = dict[str, torch.Tensor]
logger = logging.getLogger(__name__)


class UndialTrainingError(RuntimeError):
    """Training cannot run as configured (e.g. unsynchronised processes) or produced a non-finite loss; nothing is saved."""


class UndialTrainer(Trainer):
    """Trainer for UNDIAL and the baselines (GA, GradDiff, NPO) on one PEFT model."""

    args: UndialConfig

    def __init__(self, *args: Any, stack: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_data_parallel()
        self.stack = list(stack)  # adapter names active in the teacher
        # compute_loss normalises by num_items_in_batch (tokens) or by the accumulated number of
        # sequences itself, so the Trainer must not divide by the accumulation steps again.
        self.loss_is_scaled_for_ga = True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Restore only the ``NEW`` adapter from a checkpoint, in place.

        The Trainer's own PEFT loader re-activates only the FIRST adapter and makes it trainable;
        with a stack that is ``stack_0``, so a resumed run would train the wrong adapter. Loading
        in place keeps the parameter objects, so the optimizer state restored next still fits.
        """
        weights = load_file(str(Path(resume_from_checkpoint) / NEW / WEIGHTS))
        result = set_peft_model_state_dict(self.model, weights, adapter_name=NEW)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{resume_from_checkpoint}: checkpoint does not fit this LoRA config (e.g. {unexpected[0]}).")
        logger.info("resumed the new adapter from %s", resume_from_checkpoint)

    def _check_data_parallel(self) -> None:
        # torchrun on CPU without use_cpu: accelerate opens a gloo group but reports no distributed
        # type, so the Trainer neither wraps the model in DDP nor gathers the token count: every
        # process trains its own replica on its own shard (loss x world size) and nothing syncs.
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1 and self.args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise UndialTrainingError(
                f"launched as {processes} processes, but the Trainer is not data-parallel, so they would train "
                "unsynchronised copies. On CPU pass use_cpu=True (UndialConfig(use_cpu=True)), set "
                "ACCELERATE_USE_CPU=1, or launch with `accelerate launch --cpu`."
            )

    # --- forward passes -------------------------------------------------------------------
    def _teacher(self, model: torch.nn.Module, **batch: Any) -> Any:
        """The model as deployed before this request: stack on, new adapter off, no grad."""
        with torch.no_grad(), adapter_state(self.model, active=self.stack):
            return model(**batch)

    def _fused(self) -> bool:
        config = self.model.config
        plain_head = getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
        return self.args.loss_chunk_size > 0 and plain_head

    # --- losses ---------------------------------------------------------------------------
    def _sequences(self, batch_size: int) -> int:
        # Sequence-level losses are averaged over the whole accumulated batch.
        return batch_size * self.current_gradient_accumulation_steps

    def _forget_loss(self, model: torch.nn.Module, inputs: Batch, num_items: torch.Tensor | int) -> torch.Tensor:
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        labels, method = inputs["labels"], self.args.method
        if method == "undial":
            # Per-token strength: the key's tokens (or every answer token) get beta, the rest 0.
            beta = self.args.beta * inputs["beta_weight"] if "beta_weight" in inputs else self.args.beta
            if self._fused():
                head = {"output_hidden_states": True, "logits_to_keep": 1}  # skip the (B, T, V) logits
                teacher = self._teacher(model, **batch, **head).hidden_states[-1]  # (B, T, H)
                student = model(**batch, **head).hidden_states[-1]  # (B, T, H)
                lm_head = self.model.get_output_embeddings()
                return L.undial_loss_from_hidden(
                    student, teacher, lm_head, labels, beta, num_items, self.args.loss_chunk_size
                )
            teacher = self._teacher(model, **batch).logits  # (B, T, V)
            return L.undial_loss(model(**batch).logits, teacher, labels, beta, num_items)
        student = model(**batch).logits  # (B, T, V)
        if method in ("ga", "graddiff"):
            return -L.nll_loss(student, labels, num_items)
        # npo
        teacher_logp = L.sequence_logprob(self._teacher(model, **batch).logits, labels)  # (B,)
        student_logp = L.sequence_logprob(student, labels)  # (B,)
        per_sequence = L.npo_loss(student_logp, teacher_logp, self.args.npo_beta)
        return per_sequence * labels.shape[0] / self._sequences(labels.shape[0])

    def _retain_loss(self, model: torch.nn.Module, inputs: Batch) -> torch.Tensor:
        batch = {"input_ids": inputs["retain_input_ids"], "attention_mask": inputs["retain_attention_mask"]}
        labels = inputs["retain_labels"]
        student = model(**batch).logits  # (B, T, V)
        share = labels.shape[0] / self._sequences(labels.shape[0])  # 1 / accumulation steps
        if self.args.retain_loss == "nll":
            return L.nll_loss(student, labels) * share
        teacher = self._teacher(model, **batch).logits  # (B, T, V)
        mask = L.shift_labels(labels) != L.IGNORE_INDEX  # (B, T)
        teacher_logp = teacher[mask].float().log_softmax(-1)  # (N, V)
        student_logp = student[mask].float().log_softmax(-1)  # (N, V)
        kl = torch.nn.functional.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
        return kl / mask.sum().clamp(min=1) * share

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Batch,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """gamma * forget loss (+ alpha * retain loss), normalised for accumulation and devices."""
        if num_items_in_batch is None:  # evaluation, or no accumulation bookkeeping
            num_items_in_batch = (L.shift_labels(inputs["labels"]) != L.IGNORE_INDEX).sum()
        elif self.args.average_tokens_across_devices and self.args.world_size > 1:
            # The Trainer's count is summed over processes and DDP averages gradients over them.
            num_items_in_batch = num_items_in_batch / self.args.world_size
        loss = self.args.forget_weight * self._forget_loss(model, inputs, num_items_in_batch)
        if self.args.retain_weight > 0 and "retain_input_ids" in inputs:
            loss = loss + self.args.retain_weight * self._retain_loss(model, inputs)
        if not torch.isfinite(loss):
            raise UndialTrainingError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step}: lower the learning rate "
                "or beta, or train in float32; no adapter was written."
            )
        if return_outputs:
            return loss, {}
        return loss
