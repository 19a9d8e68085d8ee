"""`UndialTrainer`: transformers' Trainer with the unlearning loss in `compute_loss`, nothing else.

The model is a PEFT model built by `adapters.build_trainable`: earlier forget adapters
(``stack``) active and frozen, plus the trainable ``NEW`` adapter. The teacher is the same module
with ``NEW`` switched off under ``torch.no_grad()``; there is never a second copy of the model.
Before training, one teacher pass fills a `teacher_cache.TeacherCache` (``teacher_cache="auto"``)
that the losses read instead of a live teacher pass per step; where the cache cannot equal the
live teacher (dropout in the teacher, too big) training uses the live teacher and logs why.
The student's forward runs the opening every row of a batch shares (a chat template's system
prompt) once and the rest of each row on its cache (`shared_prefix`, checked once per model).

The fused loss and the hidden-state caches rebuild logits as lm_head(last hidden state). Some
heads do more (Granite and MiniCPM3 scale the logits, Gemma-2 soft-caps them, Falcon-H1 multiplies
them), so the trainer measures it once, on one short row, and where it does not hold uses the live
teacher and full logits (`UndialTrainer._plain_head`).

>>> trainer = UndialTrainer(model=peft_model, args=UndialConfig(output_dir="ckpt"),  # doctest: +SKIP
...                         train_dataset=dataset, data_collator=collator, stack=[])
>>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer
from transformers.training_args import ParallelMode

from undial_peft.deploy.manifest import WEIGHTS
from undial_peft.errors import UndialStackError, UndialTrainingError
from undial_peft.training import loss as L
from undial_peft.training import shared_prefix, teacher_cache
from undial_peft.training.adapters import NEW, adapter_state
from undial_peft.training.config import UndialConfig
from undial_peft.utils.cpu_memory import pin_mmap_threshold
from undial_peft.utils.modes import model_mode

Batch = dict[str, torch.Tensor]
logger = logging.getLogger(__name__)

HEAD_PROBE_TOKENS = 16  # length of the one row the head check runs on
HEAD_PROBE_POSITIONS = 4  # last positions of that row whose logits are compared
# Largest |lm_head(h) - logits| allowed, relative to the largest |logit|. Both sides are the same
# matmul on the same input, so only the summation order may differ; scaling or soft-capping moves
# logits by a factor (Granite: 1/8) or by tens of percent at the large ones. Half types get 4 eps.
HEAD_TOLERANCE = 1e-3


class UndialTrainer(Trainer):
    """Trainer for UNDIAL and the baselines (GA, GradDiff, NPO) on one PEFT model."""

    args: UndialConfig

    def __init__(
        self, *args: Any, stack: Sequence[str] = (), retain_teacher: Sequence[str] | None = None,
        earlier: UndialTrainer | None = None, **kwargs: Any
    ) -> None:
        """``earlier``: a trainer of the same model and teachers whose kept teacher cache lends its rows
        (`keep_teacher_cache`), e.g. a silence round's after the request's first run."""
        super().__init__(*args, **kwargs)
        self._check_data_parallel()
        self.stack = list(stack)  # adapter names active in the teacher
        # ... and in the retain term's teacher: the same stack, or [] for a guard anchored on the base
        self.retain_stack = self.stack if retain_teacher is None else list(retain_teacher)
        # compute_loss normalises by num_items_in_batch (tokens) or by the accumulated number of
        # sequences itself, so the Trainer must not divide by the accumulation steps again.
        self.loss_is_scaled_for_ga = True
        self.teacher_cache: teacher_cache.TeacherCache | None = None  # filled by train()
        self.keep_teacher_cache = False  # True: train() leaves the cache filled, for a later trainer to borrow from
        self._earlier = earlier
        self._head_mismatch: str | None = None  # why logits != lm_head(hidden), "" if equal; None: not measured
        # why the shared opening of a batch cannot run once (shared_prefix.check), "" if it can; None: not measured
        self._prefix_mismatch: str | None = None
        if earlier is not None and earlier.model is self.model:  # a silence round: the same model, measured already
            self._head_mismatch, self._prefix_mismatch = earlier._head_mismatch, earlier._prefix_mismatch
        self._pin_cpu_allocator()

    def _pin_cpu_allocator(self) -> None:
        """On CPU, freed activations go back to the OS (`cpu_memory`): the step's peak RSS is its tensors."""
        threshold = self.args.cpu_mmap_threshold
        if threshold and self.args.device.type == "cpu":
            pinned = pin_mmap_threshold(threshold)
            logger.debug("glibc mmap threshold %s at %d bytes", "pinned" if pinned else "not pinned (no glibc)", threshold)

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
            raise UndialStackError(f"{resume_from_checkpoint}: checkpoint does not fit this LoRA config (e.g. {unexpected[0]}).")
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
    def _teacher(self, model: torch.nn.Module, active: Sequence[str] | None = None, **batch: Any) -> Any:
        """The model as deployed before this request: stack on, new adapter off, no grad.

        ``active`` names other adapters instead (the retain term's teacher, ``retain_stack``)."""
        with torch.no_grad(), adapter_state(self.model, active=self.stack if active is None else list(active)):
            return model(**batch)

    def _plain_head(self) -> bool:
        """Whether logits = lm_head(last hidden state), which the fused loss and the caches assume.

        Measured once per trainer (`_measure_head`), not read from config fields: the heads that
        scale or cap logits name it in many ways (``logits_scaling``, ``logit_scale``,
        ``final_logit_softcapping``, ``lm_head_multiplier``, ...). Where it fails, one warning says so.
        """
        if self._head_mismatch is None:
            start = time.perf_counter()
            self._head_mismatch = self._measure_head()
            logger.debug("head check: %.3f s", time.perf_counter() - start)
            if self._head_mismatch:
                logger.warning("%s; using the live teacher and full logits", self._head_mismatch)
        return not self._head_mismatch

    def _probe_ids(self) -> torch.Tensor:
        """(1, T) token ids of one short row: the start of the first training row, else ids 0..T-1."""
        dataset, ids = self.train_dataset, torch.empty(0, dtype=torch.int64)
        if isinstance(dataset, datasets.Dataset) and len(dataset) and "input_ids" in dataset.column_names:
            ids = torch.as_tensor(dataset[0]["input_ids"][:HEAD_PROBE_TOKENS])  # (T,)
        if ids.numel() == 0:  # nothing indexable to read without touching a sampler's RNG
            vocab = getattr(self.model.config, "vocab_size", None) or HEAD_PROBE_TOKENS
            ids = torch.arange(min(HEAD_PROBE_TOKENS, vocab))  # (T,)
        return ids[None].to(self.args.device)  # (1, T)

    def _measure_head(self) -> str:
        """Compare the teacher's logits with lm_head(its last hidden state) on one short row.

        Returns "" when they agree, else the reason. The forward is the teacher's (stack on, new
        adapter off, no grad) in training mode, as the teacher pass and the cache run it: an
        eval-mode forward would repack 4-bit CPU weights into a kernel with no backward. The RNG
        state is restored afterwards, so dropout in the forward does not shift the training run.
        """
        model, head = self.model, self.model.get_output_embeddings()
        ids = self._probe_ids()  # (1, T)
        keep = min(HEAD_PROBE_POSITIONS, ids.shape[1])
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with model_mode(model, training=True), torch.random.fork_rng(devices=cuda), self.compute_loss_context_manager(), \
                torch.no_grad():
            out = self._teacher(model, input_ids=ids, attention_mask=torch.ones_like(ids),
                                output_hidden_states=True, logits_to_keep=keep)
            if out.hidden_states is None:
                return "the model returns no hidden states"
            hidden = out.hidden_states[-1][:, -keep:]  # (1, k, H)
            # exactly what the fused loss computes per chunk
            rebuilt = torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight, head.bias)  # (1, k, V)
        logits = out.logits[:, -keep:].float()  # (1, k, V)
        rebuilt = rebuilt.float()  # (1, k, V)
        scale = logits.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
        error = ((rebuilt - logits).abs().max() / scale).item()
        eps = max(torch.finfo(t.dtype).eps for t in (out.logits, head.weight) if t.dtype.is_floating_point)
        if error <= max(HEAD_TOLERANCE, 4 * eps):
            return ""
        ratio = ((rebuilt * logits).sum() / (logits * logits).sum().clamp(min=torch.finfo(torch.float32).tiny)).item()
        return (f"lm_head(hidden) != logits (ratio {ratio:#.3g}, largest difference {error:.1%} of the largest "
                f"logit): the head scales or soft-caps logits")

    def _student_hidden(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """(B, T, H): the student's last hidden state; a chat template's shared opening runs once (`shared_prefix`)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return shared_prefix.last_hidden(model, ids, mask, share=self._may_share(model, ids, mask))

    def _may_share(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether this batch's shared opening may run once: it has one, no gradient checkpointing (which turns the
        cache off and would rerun its updates in the backward), and `shared_prefix.check` agreed once per model."""
        if not shared_prefix.worth_sharing(ids, mask) or getattr(self.model, "is_gradient_checkpointing", False):
            return False
        if self._prefix_mismatch is None:
            self._prefix_mismatch = shared_prefix.check(model, ids, mask)
            if self._prefix_mismatch:
                logger.warning("%s; each batch runs as one pass", self._prefix_mismatch)
        return not self._prefix_mismatch

    def _fused(self) -> bool:
        return self.args.loss_chunk_size > 0 and self._plain_head()

    # --- cached teacher -------------------------------------------------------------------
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``train``, after one teacher pass fills the cache (when it can hold)."""
        self.teacher_cache = self._build_teacher_cache()
        try:
            return super().train(*args, **kwargs)
        finally:
            if not self.keep_teacher_cache:
                self.teacher_cache = None  # frees the memory or the mapping

    def _cache_plan(self) -> tuple[set[str], list[str]]:
        """What to cache, and why anything the run needs stays live."""
        args, needs, why = self.args, set(), []
        if args.method == "undial":
            needs.add("hidden")
        elif args.method == "npo":
            needs.add("logprob")  # only the sequence log-prob: one float per row
        dataset = self.train_dataset
        if args.retain_weight > 0 and args.retain_loss == "kl" and "retain_labels" in getattr(dataset, "column_names", ()):
            needs.add("retain_hidden")
        if not needs or args.teacher_cache == "off":
            return set(), (["teacher_cache='off'"] if needs else [])
        if not isinstance(dataset, datasets.Dataset):
            return set(), [f"the training set is a {type(dataset).__name__}, not an indexable datasets.Dataset"]
        if args.remove_unused_columns:
            return set(), ["remove_unused_columns=True would drop the row index the cache is keyed by"]
        if (dropout := teacher_cache.teacher_dropout(self.model, self.stack)) is not None:
            return set(), [f"{dropout} makes the teacher random in training mode"]
        # A head that is not lm_head(hidden) has logged its reason once in _plain_head.
        if "hidden" in needs and not self._fused():
            needs.discard("hidden")
            if self.args.loss_chunk_size == 0:
                why.append("loss_chunk_size=0: the UNDIAL loss reads full teacher logits")
        if "retain_hidden" in needs and not self._plain_head():
            needs.discard("retain_hidden")  # the KL retain loss would rebuild logits as lm_head(hidden)
        return needs, why

    def _build_teacher_cache(self) -> teacher_cache.TeacherCache | None:
        needs, why = self._cache_plan()
        cache = None
        if needs:
            dataset = self.train_dataset
            if teacher_cache.INDEX in dataset.column_names:
                dataset = dataset.remove_columns(teacher_cache.INDEX)
            dataset = dataset.add_column(teacher_cache.INDEX, list(range(len(dataset))))
            collate = self.data_collator
            if not isinstance(collate, teacher_cache.IndexedCollator):
                collate = teacher_cache.IndexedCollator(collate)
            start = time.perf_counter()
            # Training mode, as the live teacher runs (no dropout is active, checked above); an
            # eval-mode forward would also repack 4-bit CPU weights into a kernel with no backward.
            with model_mode(self.model, training=True), self.compute_loss_context_manager():
                cache, where = teacher_cache.build(
                    dataset, collate.inner, lambda **b: self._teacher(self.model, **b), needs,
                    self.args.teacher_cache, Path(self.args.output_dir), self.args.per_device_train_batch_size,
                    self.args.device, retain_teacher=lambda **b: self._teacher(self.model, self.retain_stack, **b),
                    earlier=self._lent(),
                )
            if cache is None:
                why.append(where)
            else:
                self.train_dataset, self.data_collator = dataset, collate
                logger.info("teacher cache: %s for %d rows (%s), filled in %.1f s",
                            where, len(dataset), ", ".join(sorted(needs)), time.perf_counter() - start)
        for reason in why:
            logger.warning("teacher cache: live teacher instead, because %s", reason)
        return cache

    def _lent(self) -> tuple[datasets.Dataset, teacher_cache.TeacherCache] | None:
        """The earlier trainer's (dataset, cache) when its teachers are this one's, else None."""
        earlier = self._earlier
        if earlier is None or earlier.teacher_cache is None or earlier.model is not self.model:
            return None
        if (earlier.stack, earlier.retain_stack) != (self.stack, self.retain_stack):
            return None
        return earlier.train_dataset, earlier.teacher_cache

    def _cached(self, rows: teacher_cache.CachedRows | None, inputs: Batch, labels: torch.Tensor) -> torch.Tensor | None:
        """Cached teacher rows for this batch, in the order of its counted positions: (N, W) or None."""
        if rows is None or teacher_cache.INDEX not in inputs:
            return None
        index = inputs[teacher_cache.INDEX].cpu()  # (B,)
        counted = (L.shift_labels(labels) != L.IGNORE_INDEX).sum(-1).cpu()  # (B,)
        if not torch.equal(rows.counts(index), counted):
            raise UndialTrainingError("the teacher cache does not fit this batch: the training set changed after it was built.")
        return rows.gather(index).to(labels.device, non_blocking=True)

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
                teacher = self._cached(self._cache_part("hidden"), inputs, labels)  # (N, H) counted rows
                if teacher is None:
                    teacher = self._teacher(model, **batch, **head).hidden_states[-1]  # (B, T, H)
                student = self._student_hidden(model, batch)  # (B, T, H)
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
        cached = self._cache_part("logprob")
        if cached is not None and teacher_cache.INDEX in inputs:
            teacher_logp = cached[inputs[teacher_cache.INDEX].cpu()].to(labels.device)  # (B,)
        else:
            teacher_logp = L.sequence_logprob(self._teacher(model, **batch).logits, labels)  # (B,)
        student_logp = L.sequence_logprob(student, labels)  # (B,)
        per_sequence = L.npo_loss(student_logp, teacher_logp, self.args.npo_beta)
        return per_sequence * labels.shape[0] / self._sequences(labels.shape[0])

    def _cache_part(self, name: str) -> Any:
        return None if self.teacher_cache is None else getattr(self.teacher_cache, name)

    def _retain_loss(self, model: torch.nn.Module, inputs: Batch) -> torch.Tensor:
        batch = {"input_ids": inputs["retain_input_ids"], "attention_mask": inputs["retain_attention_mask"]}
        labels = inputs["retain_labels"]
        share = labels.shape[0] / self._sequences(labels.shape[0])  # 1 / accumulation steps
        if self.args.retain_loss == "nll":
            return L.nll_loss(model(**batch).logits, labels) * share  # (B, T, V) logits
        mask = L.shift_labels(labels) != L.IGNORE_INDEX  # (B, T)
        head = self.model.get_output_embeddings()
        plain = self._plain_head()  # logits = lm_head(hidden), measured once
        # Logits only where the KL is taken: the answer positions, N of B x T (a prompt is most of a guard
        # row; the full (B, T, V) logits and their backward cost several times more).
        answer = {"output_hidden_states": True, "logits_to_keep": 1} if plain else {}

        def at_answers(out: Any) -> torch.Tensor:  # (N, V)
            return head(out.hidden_states[-1][mask]) if plain else out.logits[mask]

        student = head(self._student_hidden(model, batch)[mask]) if plain else model(**batch).logits[mask]  # (N, V)
        cached = self._cached(self._cache_part("retain_hidden"), inputs, labels)  # (N, H)
        if cached is not None:
            teacher = head(cached.to(head.weight.dtype))  # (N, V)
        else:
            teacher = at_answers(self._teacher(model, self.retain_stack, **batch, **answer))  # (N, V), live teacher
        teacher_logp = teacher.float().log_softmax(-1)  # (N, V)
        student_logp = student.float().log_softmax(-1)  # (N, V)
        kl = torch.nn.functional.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # (N,)
        if "retain_key" in inputs and self.args.guard_key_weight > 0:
            # The guard's fact tokens count 1 + K times: over a mean of every answer token, the phrasing a
            # request leaves alone outvotes the one token it erodes (docs/stacks.md).
            kl = kl * (1 + self.args.guard_key_weight * L.shift_labels_like(inputs["retain_key"])[mask].to(kl.device))
        return kl.sum() / mask.sum().clamp(min=1) * share

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
