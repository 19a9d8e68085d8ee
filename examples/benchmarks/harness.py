"""What both benchmark scripts share: the device, random batches, and one measurement per process.

Each script re-invokes itself with ``--child SPEC_JSON``; the child prints one ``RESULT {...}`` line.

>>> fmt(None), fmt(1.234), fmt(float("nan"))
('-', '1.23', '-')
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import torch


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_batch(vocab: int, batch: int, seq: int, on: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; labels on the second half (an "answer"), -100 on the first ("prompt")."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))  # (B, T)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {key: value.to(on) for key, value in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def spawn(script: str, spec: dict[str, Any], timeout: float | None, label: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --child spec`` in a fresh process; its RESULT line, or {"error": ...}."""
    command = [sys.executable, os.path.abspath(script), "--child", json.dumps(spec)]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **(env or {})}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    finally:
        print(f"  [{time.perf_counter() - start:5.0f} s] {label}", file=sys.stderr, flush=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: " + " | ".join(tail)}


def fmt(value: Any, spec: str = ".2f") -> str:
    """A number formatted, or '-' for None / NaN (no CUDA memory on CPU)."""
    return "-" if value is None or value != value else format(value, spec)
