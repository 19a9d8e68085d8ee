"""The benchmark's target and reference models: fine-tune until memorised, measure memorisation.

>>> # stats = memorise(model, tokenizer, rows, QUICK, seed=0); stats["final_loss"]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import metrics
from ..data import Collator, Example, encode
from ..evaluate import score
from .settings import BenchSize


def full_fine_tune(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]], *, steps: int, batch_size: int, lr: float,
    seed: int,
) -> dict[str, float]:
    """Fine-tune every parameter that requires grad on ``rows`` (answer tokens only, chat template as
    evaluation uses it): AdamW, one-cycle schedule (10% warm-up), shuffled batches, ``steps`` steps.

    >>> # full_fine_tune(model, tokenizer, [{"question": "Q?", "answer": "A."}], steps=10, batch_size=8, lr=1e-4, seed=0)
    """
    features = [encode(tokenizer, Example(r["question"], r["answer"]), 128) for r in rows]
    collate = Collator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    order: list[int] = []
    losses = []
    started = time.perf_counter()
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(features), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        batch = collate([features[i] for i in picked])
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return {"final_loss": float(sum(losses[-10:]) / len(losses[-10:])), "seconds": time.perf_counter() - started}


def memorise(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]], size: BenchSize, seed: int
) -> dict[str, float]:
    """The tiny target's fine-tune: `full_fine_tune` with the size's steps, batch and learning rate."""
    return full_fine_tune(model, tokenizer, rows, steps=size.pretrain_steps, batch_size=size.pretrain_batch_size,
                          lr=size.pretrain_lr, seed=seed)


def mean_answer_probability(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]]) -> float:
    """Mean exp(-mean answer NLL) over question/answer rows."""
    scores = score(model, tokenizer, [Example(r["question"], r["answer"]) for r in rows], batch_size=32)
    return float(sum(metrics.answer_probability(s.logprobs) for s in scores) / len(scores))


def load_target(directory: Path) -> tuple[Any, Any]:
    """A saved target or reference model and its tokenizer, in eval mode."""
    from ..models import load_model

    model, tokenizer = load_model(directory)
    return model.eval(), tokenizer

