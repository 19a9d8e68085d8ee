"""Where the peak memory of one training step goes, phase by phase (CPU: RSS; CUDA: allocator).

One process, one step variant of `step_cost.py` (same model loading, same step), one warm-up
step, then one profiled step split into phases: teacher pass, student forward + fused loss,
backward, optimizer. For each phase: the peak above the memory held before the step, and what
is still held at its end. During the student forward every tensor autograd saves for backward is
recorded once (by storage), grouped by shape: those are the activations, and the table says
which ones dominate. What the peak holds beyond weights + optimizer state + saved activations is
temporaries and allocator slack.

Commands (repository root)::

    python examples/benchmarks/memory_profile.py --shape 360m --variant undial
    python examples/benchmarks/memory_profile.py --shape 360m --variant undial_gc --seq 512
    python examples/benchmarks/memory_profile.py --model tiny --variant undial   # seconds, smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness
import steps
import torch

from undial_peft.training.trainer import UndialTrainer


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


class SavedTensors:
    """Bytes autograd saves for backward, once per storage, grouped by (shape, dtype)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.by_shape: collections.Counter[str] = collections.Counter()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.seen and not isinstance(tensor, torch.nn.Parameter):
            self.seen.add(storage.data_ptr())
            self.by_shape[f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"] += storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.by_shape.values())


def profile(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.models import load_model

    device = harness.device()
    four_bit = "4bit" in spec["variant"]
    before_model = steps.PeakMemory(device).current()
    model, _ = load_model(spec["model"], load_in_4bit=four_bit)
    if not four_bit:
        model.to(device)
    weights = steps.PeakMemory(device).current() - before_model
    with tempfile.TemporaryDirectory() as workdir:
        batch = harness.random_batch(model.config.vocab_size, steps.BATCH, spec["seq"], device)
        step = steps.build_step(spec["variant"], model, workdir, batch)
        step(batch)  # warm-up: optimizer state exists from here on
        steps.settle()
        phases = Phases(device)
        saved = SavedTensors()
        trainer = step.trainer
        if isinstance(trainer, UndialTrainer):
            teacher = trainer._teacher

            def marked_teacher(*args: Any, **kwargs: Any) -> Any:
                with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # teacher saves nothing
                    out = teacher(*args, **kwargs)
                phases.mark("teacher pass (no grad)")
                return out

            trainer._teacher = marked_teacher
        phases.mark("held before the step")
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = step.loss_fn(batch)
        phases.mark("student forward + loss")
        loss.backward()
        phases.mark("backward")
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        phases.mark("optimizer step")
    base = phases.rows[0][2] if phases.rows[0][0] == "held before the step" else phases.rows[1][2]
    return {
        "weights_mib": weights,
        "held_mib": base,
        "phases": [{"phase": n, "peak_mib": p, "end_mib": c} for n, p, c in phases.rows],
        "saved_mib": saved.total / 2**20,
        "saved_top": [(shape, nbytes / 2**20) for shape, nbytes in saved.by_shape.most_common(8)],
        "trainable": sum(p.numel() for p in step.trained.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help='"default", "tiny", or a model directory')
    parser.add_argument("--shape", default=None, help="a random model of this shape instead (360m, 1b, 8b)")
    parser.add_argument("--variant", default="undial", choices=steps.STEP_VARIANTS)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = steps.model_dir(args.model, args.shape, Path(tmp))
        result = profile({"model": model, "variant": args.variant, "seq": args.seq})
    print(f"{args.variant} T={args.seq}: weights {result['weights_mib']:.0f} MiB, held before the step "
          f"{result['held_mib']:.0f} MiB (RSS: + interpreter), trainable {result['trainable'] / 1e6:.2f}M")
    for row in result["phases"]:
        print(f"  {row['phase']:<26} peak {row['peak_mib']:8.0f}  end {row['end_mib']:8.0f}")
    print(f"  activations saved for backward: {result['saved_mib']:.0f} MiB; largest groups (shape dtype: MiB):")
    for shape, mib in result["saved_top"]:
        print(f"    {shape:<40} {mib:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
