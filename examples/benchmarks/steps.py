"""The step variants `step_cost.py` compares, and the memory helpers both benchmark scripts read.

`build_step` returns one full training step (loss, backward, optimizer) of a variant on a batch;
`PeakMemory` reads the process's peak memory (CPU: VmHWM, resettable; CUDA: the allocator).

>>> "undial_cached" in STEP_VARIANTS
True
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import importlib.resources
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harness import sync

from undial_peft.training.teacher_cache import INDEX

PINNED = 128 * 1024  # glibc's starting mmap threshold, pinned (`undial_peft.utils.cpu_memory`)
STEP_VARIANTS = ("lora_sft", "undial", "undial_mmap", "undial_mmap_huge", "undial_trim", "undial_cached", "undial_full",
                 "undial_gc", "undial_4bit", "undial_4bit_gc", "undial_stack9", "undial_stack9_fused", "reference")
STACK_DEPTH = 9  # the earlier requests below request 10
BATCH, BETA, LR = 4, 10.0, 1e-4

# --- memory and timing helpers (run in the child) ---------------------------------------------


def proc_status_mib(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def settle() -> None:
    """Free what setup left behind, so the peak measured next is the step's own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory from `reset()` on: CUDA allocator peak, or the process's peak RSS (VmHWM).

    Writing "5" to /proc/self/clear_refs resets VmHWM (Linux >= 4.0); where that is refused the
    peak falls back to ``ru_maxrss``, which also counts model loading (``reset_ok`` says which).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset_ok = False

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return proc_status_mib("VmRSS") or 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.reset_ok = True
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = proc_status_mib("VmHWM")
        return hwm if self.reset_ok and hwm is not None else maxrss_mib()


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- step variants (child) --------------------------------------------------------------------


def _optimizer(args: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the Trainer would build (AdamW, fused where available), for every variant alike."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
    return cls(params, **kwargs)


@dataclass
class Step:
    """One training step of a variant: loss, backward, optimizer; its parts stay reachable for profiling."""

    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    optimizer: torch.optim.Optimizer
    trained: torch.nn.Module
    trainer: Any = None  # the UndialTrainer of the UNDIAL variants
    cache_s: float | None = None  # undial_cached: seconds of the one teacher pass filling the cache

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.loss_fn(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def build_step(variant: str, model: torch.nn.Module, workdir: str, batch: dict[str, torch.Tensor],
               cpu_mmap_threshold: int | None = None) -> Step:
    """One full training step of ``variant`` on ``batch`` (undial_cached: the cache is filled here, timed).

    ``cpu_mmap_threshold``: the UNDIAL variants' `UndialConfig.cpu_mmap_threshold` (None: its
    default, 0: glibc's adaptive threshold). ``undial_mmap`` is ``undial`` with it pinned at
    128 KiB (`PINNED`), to compare both in one run.
    """
    from peft import get_peft_model

    from undial_peft.training import loss as L
    from undial_peft.training.adapters import build_trainable, default_lora_config
    from undial_peft.training.config import UndialConfig
    from undial_peft.training.trainer import UndialTrainer

    torch.manual_seed(0)  # same LoRA A initialisation for every LoRA variant
    args = UndialConfig(output_dir=workdir, beta=BETA, learning_rate=LR)
    if variant == "lora_sft":
        peft_model = get_peft_model(model, default_lora_config()).train()
        optimizer = _optimizer(args, [p for p in peft_model.parameters() if p.requires_grad])
        return Step(lambda b: peft_model(**b).loss, optimizer, peft_model)  # causal-LM NLL over (B, T, V) logits
    if variant.startswith("undial"):
        chunk = 0 if variant == "undial_full" else args.loss_chunk_size
        threshold = PINNED if variant.startswith("undial_mmap") else cpu_mmap_threshold
        allocator = {} if threshold is None else {"cpu_mmap_threshold": threshold}
        args = UndialConfig(output_dir=workdir, beta=BETA, learning_rate=LR, loss_chunk_size=chunk,
                            teacher_cache="memory" if variant == "undial_cached" else "off", **allocator)
        # _stack9: request 10, the new adapter over nine frozen ones, separate or fused (the default)
        stack = _random_stack(model, Path(workdir), STACK_DEPTH) if "_stack" in variant else ()
        # _gc: gradient checkpointing, the setting for memory-bound runs (activations dominate at 135M)
        peft_model = build_trainable(model, default_lora_config(), stack, gradient_checkpointing=variant.endswith("_gc"),
                                     fuse_stack=variant.endswith("_fused")).train()
        trainer = UndialTrainer(model=peft_model, args=args, train_dataset=_as_dataset(batch), data_collator=_collate)
        loss_fn = (lambda b: _trimmed(trainer.compute_loss(peft_model, b))) if variant == "undial_trim" else \
            (lambda b: trainer.compute_loss(peft_model, b))
        step = Step(loss_fn, trainer.create_optimizer(), peft_model, trainer)
        if variant == "undial_cached":  # what train() does first: one teacher pass over the (one-batch) set
            sync()
            start = time.perf_counter()
            trainer.teacher_cache = trainer._build_teacher_cache()
            sync()
            step.cache_s = time.perf_counter() - start
            batch[INDEX] = torch.arange(batch["input_ids"].shape[0])  # the rows' dataset indices
        return step
    if variant == "reference":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the second full copy
        model.train().requires_grad_(True)  # full fine-tuning

        def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits  # (B, T, V)
            student_logits = model(**inputs).logits  # (B, T, V)
            return L.undial_loss(student_logits, teacher_logits, b["labels"], BETA)

        return Step(loss_fn, _optimizer(args, list(model.parameters())), model)
    raise ValueError(f"unknown variant {variant!r}; choose one of {STEP_VARIANTS}")


def _trimmed(loss: torch.Tensor) -> torch.Tensor:
    """``loss``, after handing the heap's free pages back to the OS (``malloc_trim(0)``): what the
    forward pass freed (teacher logits, loss chunks) leaves RSS before backward allocates its own."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return loss


def _random_stack(model: torch.nn.Module, workdir: Path, depth: int) -> list[Path]:
    """``depth`` default-config adapters with random B (step time does not depend on the values), saved."""
    from peft import get_peft_model

    from undial_peft.training.adapters import default_lora_config

    paths = []
    for i in range(depth):
        peft_model = get_peft_model(model, default_lora_config())
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.01)
        peft_model.save_pretrained(workdir / f"stack{i}")
        model = peft_model.unload()  # the base without LoRA layers, for the next one
        paths.append(workdir / f"stack{i}")
    return paths


def _as_dataset(batch: dict[str, torch.Tensor]) -> Any:
    """The batch as a training set of its rows (what the cache pass reads)."""
    import datasets

    return datasets.Dataset.from_dict({k: batch[k].tolist() for k in ("input_ids", "labels")})


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    from undial_peft.data.encoding import Collator

    return Collator(pad_token_id=0)(rows)


def demo_rows() -> list[dict[str, Any]]:
    text = importlib.resources.files("undial_peft").joinpath("data/demo_facts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _tiny_model_dir(workdir: Path) -> str:
    """A small random Llama (word tokenizer over the demo facts) saved to ``workdir``, for --quick."""
    from undial_peft.tiny import tiny_llama, word_tokenizer

    texts = [row["question"] + " " + row["answer"] for row in demo_rows()]
    tokenizer = word_tokenizer(texts)
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2)
    model.save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    return str(workdir)


def model_dir(model: str, shape: str | None, workdir: Path) -> str:
    """What the children load: a random model of ``shape`` saved to ``workdir``, the tiny model, or ``model``."""
    if shape is not None:
        import gpu_memory

        gpu_memory.save_random(shape, workdir)
        settle()
        return str(workdir)
    return _tiny_model_dir(workdir) if model == "tiny" else model
