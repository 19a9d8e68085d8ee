"""Where the peak memory of one training step goes: a breakdown table (CPU: RSS; CUDA: allocator).

One process, one step variant of `step_cost.py` (same model loading, same step), one warm-up
step, then one profiled step. Rows of the table:

weights             frozen base parameters (4-bit: the packed NF4 bytes), once per storage
LoRA + AdamW        trainable LoRA parameters, their gradients and AdamW's two moments
teacher cache       the cached teacher rows (``undial_cached``: (N, H) fp32), held all run
held before step    what the process holds between steps above the interpreter and libraries
teacher pass        peak of the live teacher pass (no grad) above what was held before it
saved activations   every tensor autograd saves for backward during the student forward + loss,
                    once per storage, parameters excluded, per decoder layer and in total
loss chunk buffers  peak inside the fused head (`undial_loss_from_hidden`) above what was held
                    when it started: the (chunk, V) float32 buffers and the (N, H) gradient
step peak           the highest memory of the step, above the interpreter and libraries (what
                    `step_cost.py` reports as ``peak``)
other               step peak - held - saved activations - loss buffers: temporaries alive at
                    the peak and allocator slack (RSS the allocator keeps after ``free``)

``--cpu-mmap-threshold 0`` profiles glibc's adaptive threshold (before the trainer pinned it,
`undial_peft.utils.cpu_memory`): the difference in ``other`` is the slack the pin removes.

Commands (repository root)::

    python examples/benchmarks/memory_profile.py --shape 360m --variant undial
    python examples/benchmarks/memory_profile.py --shape 360m --variant undial --cpu-mmap-threshold 0
    python examples/benchmarks/memory_profile.py --shape 360m --variant undial_cached
    python examples/benchmarks/memory_profile.py --model tiny --variant undial   # seconds, smoke run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import steps
import torch

from undial_peft.training import loss as loss_module

MIB = 2**20


class Phases:
    """Peak (since the previous mark) and current memory at named marks, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.memory = steps.PeakMemory(device)
        self.rows: list[tuple[str, float, float]] = []
        self.memory.reset()

    def mark(self, name: str) -> None:
        harness.sync()
        self.rows.append((name, self.memory.peak(), self.memory.current()))
        self.memory.reset()

    def get(self, name: str) -> tuple[float, float] | None:
        """(peak, end) of the phase ``name``, or None where the step had no such phase."""
        return next(((p, c) for n, p, c in self.rows if n == name), None)


class SavedTensors:
    """Bytes autograd saves for backward, once per storage, by the decoder layer running at the time.

    Parameters (and views of them, e.g. the transposed weight a linear layer saves) are not
    activations: their storages are listed in ``skip`` and not counted.

    >>> saved = SavedTensors(skip=set())
    >>> x = torch.ones(4, 8, requires_grad=True)
    >>> with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
    ...     y = (x * x).sum()
    >>> saved.total  # x, saved once though used twice: 4 * 8 * 4 bytes
    128
    """

    def __init__(self, skip: set[int]) -> None:
        self.seen = set(skip)
        self.where = "outside the layers"  # set by the layers' forward hooks
        self.by_place: collections.Counter[str] = collections.Counter()
        self.by_shape: collections.Counter[str] = collections.Counter()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.by_place[self.where] += storage.nbytes()
            self.by_shape[f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"] += storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def in_layers(self, layers: torch.nn.ModuleList) -> Iterator[None]:
        """Attribute what is saved while layer i runs to "layer i"."""

        def enter(index: int) -> Any:
            return lambda module, args: setattr(self, "where", f"layer {index}")

        handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
        handles += [layer.register_forward_hook(lambda *_: setattr(self, "where", "outside the layers")) for layer in layers]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def total(self) -> int:
        return sum(self.by_place.values())

    def layer_bytes(self) -> list[int]:
        return [n for place, n in self.by_place.items() if place.startswith("layer ")]


def _storage_bytes(tensors: Any) -> tuple[int, set[int]]:
    """Bytes of the distinct storages among ``tensors`` (tied weights counted once), and their pointers."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()), set(seen)


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Llama-like causal LM (the shapes this script builds), PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def profile(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.models import load_model

    device = harness.device()
    four_bit = "4bit" in spec["variant"]
    model, _ = load_model(spec["model"], load_in_4bit=four_bit)
    if not four_bit:
        model.to(device)
    with tempfile.TemporaryDirectory() as workdir:
        batch = harness.random_batch(model.config.vocab_size, steps.BATCH, spec["seq"], device)
        step = steps.build_step(spec["variant"], model, workdir, batch, spec["cpu_mmap_threshold"])
        step(batch)  # warm-up: optimizer state exists from here on
        steps.settle()
        phases = Phases(device)
        params = list(step.trained.parameters())
        frozen, _ = _storage_bytes(p for p in params if not p.requires_grad)
        trainable, _ = _storage_bytes(p for p in params if p.requires_grad)
        _, skip = _storage_bytes([*params, *step.trained.buffers()])
        saved = SavedTensors(skip)
        trainer = step.trainer
        cache = trainer.teacher_cache.nbytes if trainer is not None and trainer.teacher_cache is not None else 0
        fused = loss_module.undial_loss_from_hidden
        if trainer is not None:
            teacher = trainer._teacher

            def marked_teacher(*args: Any, **kwargs: Any) -> Any:
                phases.mark("before the teacher")
                out = teacher(*args, **kwargs)
                phases.mark("teacher pass")
                return out

            def marked_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
                phases.mark("student forward")
                out = fused(*args, **kwargs)
                phases.mark("fused loss")
                return out

            trainer._teacher = marked_teacher
            loss_module.undial_loss_from_hidden = marked_loss
        phases.mark("held before the step")
        try:
            with saved.in_layers(_decoder_layers(step.trained)):
                loss = step.loss_fn(batch)
        finally:
            loss_module.undial_loss_from_hidden = fused
        phases.mark("after the loss")
        loss.backward()
        grads, _ = _storage_bytes(p.grad for p in params if p.grad is not None)
        phases.mark("backward")
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        phases.mark("optimizer step")
    held = phases.rows[0][2]
    return {
        "runtime_mib": spec["runtime_mib"],
        "held_mib": held - spec["runtime_mib"],
        "weights_mib": frozen / MIB,
        "lora_mib": trainable / MIB,
        "grads_mib": grads / MIB,
        "adamw_mib": _optimizer_bytes(step.optimizer) / MIB,
        "cache_mib": cache / MIB,
        "phases": [{"phase": n, "peak_mib": p, "end_mib": c} for n, p, c in phases.rows],
        "step_peak_mib": max(p for _, p, _ in phases.rows) - spec["runtime_mib"],
        "saved_mib": saved.total / MIB,
        "saved_layers_mib": [n / MIB for n in saved.layer_bytes()],
        "saved_outside_mib": saved.by_place["outside the layers"] / MIB,
        "saved_top": [(shape, nbytes / MIB) for shape, nbytes in saved.by_shape.most_common(8)],
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def table(r: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """The breakdown rows (name, MiB, how it was measured) of one `profile` result."""
    phase = {row["phase"]: (row["peak_mib"], row["end_mib"]) for row in r["phases"]}
    held = r["held_mib"] + r["runtime_mib"]  # RSS
    held_at_loss = phase.get("student forward", (None, held))[1]
    teacher = phase.get("teacher pass")
    loss = phase.get("fused loss")
    layers = r["saved_layers_mib"]
    loss_peak = None if loss is None else loss[0] - held_at_loss
    other = r["step_peak_mib"] - r["held_mib"] - r["saved_mib"] - (loss_peak or 0.0)
    optimizer = r["lora_mib"] + r["grads_mib"] + r["adamw_mib"]
    return [
        ("weights (frozen)", r["weights_mib"], "parameter storages"),
        ("LoRA params + grads + AdamW", optimizer, f"{r['lora_mib']:.0f} + {r['grads_mib']:.0f} + {r['adamw_mib']:.0f}"),
        ("teacher cache", r["cache_mib"] or None, "cached rows"),
        ("held before the step", r["held_mib"], "RSS above the libraries"),
        ("teacher pass (transient)", None if teacher is None else teacher[0] - held, "its peak above held"),
        ("saved activations, total", r["saved_mib"], "saved_tensors_hooks, per storage"),
        (f"  per layer ({len(layers)} layers)", sum(layers) / max(len(layers), 1), f"min {min(layers, default=0):.1f}, "
         f"max {max(layers, default=0):.1f}"),
        ("  outside the layers", r["saved_outside_mib"], "embeddings, final norm, loss"),
        ("loss chunk buffers", loss_peak, "peak in the fused head above its start"),
        ("other: temporaries + allocator slack", other, "the rest of the peak"),
        ("step peak", r["step_peak_mib"], "highest RSS above the libraries"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help='"default", "tiny", or a model directory')
    parser.add_argument("--shape", default=None, help="a random model of this shape instead (360m, 1b, 8b)")
    parser.add_argument("--variant", default="undial", choices=steps.STEP_VARIANTS)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-mmap-threshold", type=int, default=None,
                        help="UndialConfig.cpu_mmap_threshold of the UNDIAL variants (0: glibc's adaptive threshold)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import undial_peft.deploy.stack  # noqa: F401  (as step_cost.py: the libraries' memory is in the baseline)
    import undial_peft.training.forget  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        model = steps.model_dir(args.model, args.shape, Path(tmp))
        steps.settle()
        runtime = 0.0 if harness.device().type == "cuda" else (steps.proc_status_mib("VmRSS") or 0.0)
        result = profile({"model": model, "variant": args.variant, "seq": args.seq, "runtime_mib": runtime,
                          "cpu_mmap_threshold": args.cpu_mmap_threshold})
    print(f"{args.variant} T={args.seq} cpu_mmap_threshold={args.cpu_mmap_threshold}: trainable "
          f"{result['trainable'] / 1e6:.2f}M, interpreter + libraries {runtime:.0f} MiB (not counted below)")
    for name, mib, how in table(result):
        print(f"  {name:<38} {harness.fmt(mib, '8.0f'):>8}  {how}")
    print("  phases (peak / end, MiB RSS): " + "; ".join(
        f"{row['phase']} {row['peak_mib']:.0f}/{row['end_mib']:.0f}" for row in result["phases"]))
    print("  largest saved groups (shape dtype: MiB): " + "; ".join(f"{s} {m:.0f}" for s, m in result["saved_top"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
