"""What sets a tiny benchmark's size and its methods: the presets and one method's settings.

>>> QUICK.n_entities < DEFAULT.n_entities and len(DEFAULT_METHODS) > len(QUICK_METHODS)
True
>>> MethodSpec("npo +rt", "npo", retain_weight=1.0).config(max_steps=1).method
'npo'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

PRIVLEAK_ATTACK = "min_k"  # Min-K% (k = 0.4), MUSE's and open-unlearning's PrivLeak attack; results.json holds all four
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}  # the same for every method


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """Everything that sets the size (and so the run time) of a benchmark."""

    n_entities: int
    facts_per_entity: int
    forget_fraction: float
    holdout_fraction: float
    hidden_size: int
    num_layers: int
    num_heads: int
    pretrain_steps: int  # full fine-tuning steps for the target and the reference each
    pretrain_batch_size: int
    pretrain_lr: float  # peak of a one-cycle schedule
    unlearn_steps: int  # the step budget every method gets
    unlearn_batch_size: int
    learning_rates: tuple[float, ...]  # the robustness sweep; the middle one is the main run
    eval_retain: int  # retain facts evaluated (the others feed retain terms)
    max_new_tokens: int  # cap on greedy answer length for ROUGE-L (the longest answer + 2 when shorter)


# 60 people x 4 facts: 24 forget facts (enough for a KS test to separate target from reference),
# 24 holdout, 192 retain. A 2-layer, 128-wide Llama memorises its ~500 training rows in 400 steps.
# Unlearning: 100 steps of 8 rows (~17 passes over the 48-row forget request); at 1e-4 LoRA barely
# moves, at 1e-3 the aggressive methods collapse: the sweep spans under- to over-training.
DEFAULT = BenchSize(
    n_entities=60, facts_per_entity=4, forget_fraction=0.1, holdout_fraction=0.1,
    hidden_size=128, num_layers=2, num_heads=4, pretrain_steps=400, pretrain_batch_size=32, pretrain_lr=3e-3,
    unlearn_steps=100, unlearn_batch_size=8, learning_rates=(1e-4, 3e-4, 1e-3), eval_retain=48, max_new_tokens=20,
)
# For tests (about half a minute on one thread): 8 forget facts, a 64-wide model, 12 runs.
QUICK = BenchSize(
    n_entities=16, facts_per_entity=4, forget_fraction=0.125, holdout_fraction=0.125,
    hidden_size=64, num_layers=2, num_heads=4, pretrain_steps=150, pretrain_batch_size=32, pretrain_lr=5e-3,
    unlearn_steps=20, unlearn_batch_size=8, learning_rates=(3e-4, 1e-3, 3e-3), eval_retain=12, max_new_tokens=16,
)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row of the table: an unlearning method and its settings (besides the learning rate)."""

    label: str
    method: str
    beta: float = 10.0
    retain_weight: float = 0.0

    def config(self, **common: Any) -> Any:
        from ..config import UndialConfig

        return UndialConfig(method=self.method, beta=self.beta, retain_weight=self.retain_weight, **common)


DEFAULT_METHODS = (
    *(MethodSpec(f"undial b={b:g}", "undial", beta=b) for b in (3.0, 10.0, 30.0)),
    *(MethodSpec(f"undial b={b:g} +rt", "undial", beta=b, retain_weight=1.0) for b in (3.0, 10.0, 30.0)),
    MethodSpec("ga", "ga"),
    MethodSpec("graddiff", "graddiff", retain_weight=1.0),
    MethodSpec("npo", "npo"),
    MethodSpec("npo +rt", "npo", retain_weight=1.0),
)
QUICK_METHODS = (
    MethodSpec("undial b=10", "undial"),
    MethodSpec("undial b=10 +rt", "undial", retain_weight=1.0),
    MethodSpec("ga", "ga"),
    MethodSpec("npo", "npo"),
)


def run_id(spec: MethodSpec, lr: float) -> str:
    """A file-system-safe name for one run: ``run_id(MethodSpec("npo +rt", "npo"), 1e-3) == "npo-rt-lr-0-001"``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{spec.label} lr {lr:g}").strip("-")

