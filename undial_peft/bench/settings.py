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
    auto_key: bool = False  # UNDIAL: find each row's key tokens with the teacher (rows here name no key)
    # "none": the method as published, as the recorded tables ran it; "neighbours": UNDIAL with forget's
    # default guard (the teacher's answers to the request's neighbours and the shipped bank, training/guard.py)
    guard: str = "none"

    def config(self, **common: Any) -> Any:
        from undial_peft.training.config import UndialConfig

        return UndialConfig(method=self.method, beta=self.beta, retain_weight=self.retain_weight,
                            auto_key=self.auto_key, guard=self.guard, **common)


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


@dataclasses.dataclass(frozen=True)
class RealSize:
    """Everything that sets the size of the real-model benchmark (`real.run_real_bench`)."""

    n_people: int
    facts_per_person: int
    holdout_people: int  # never trained: the non-members of membership inference
    requests: int  # the request pool's requests, each about different people
    stacked_requests: int  # how many of them the sequential part stacks (not part of the fine-tune recipe)
    people_per_request: int
    main_people: int  # the single-request forget set: the first people of the request pool
    eval_retain_people: int  # retain people evaluated (the others feed retain terms)
    finetune_epochs: int  # at most; the fine-tune stops after the epoch where the rows are memorised
    memorised_at: float  # mean answer probability on the training rows that counts as memorised
    finetune_lr: float  # peak of a one-cycle schedule
    finetune_batch_size: int
    trained_layers: int | None  # top decoder layers fine-tuned (None: every parameter but the embeddings)
    unlearn_steps: int  # fixed budget of the learning-rate sweep
    unlearn_batch_size: int
    learning_rates: tuple[float, ...]  # the sweep; the middle one is the main run
    max_new_tokens: int  # cap on greedy answer length for ROUGE-L


# 40 people x 5 facts; a pool of 10 forget people = 5 requests of 2 (all 5 stacked); the single request is
# the first 4 (10% of the people); 4 holdout people; 26 retain people, 4 of them evaluated.
REAL = RealSize(
    n_people=40, facts_per_person=5, holdout_people=4, requests=5, stacked_requests=5, people_per_request=2, main_people=4,
    eval_retain_people=4, finetune_epochs=10, memorised_at=0.95, finetune_lr=3e-4, finetune_batch_size=16, trained_layers=10,
    unlearn_steps=15, unlearn_batch_size=8, learning_rates=(1e-4, 3e-4, 1e-3), max_new_tokens=24,
)
# CI size: 12 people x 2 facts, 3 requests of 1 person; minutes on the real model, seconds on a tiny one.
REAL_QUICK = RealSize(
    n_people=12, facts_per_person=2, holdout_people=2, requests=3, stacked_requests=3, people_per_request=1, main_people=2,
    eval_retain_people=2, finetune_epochs=8, memorised_at=0.95, finetune_lr=3e-4, finetune_batch_size=8, trained_layers=10,
    unlearn_steps=4, unlearn_batch_size=4, learning_rates=(3e-4, 1e-3, 3e-3), max_new_tokens=16,
)


REAL_METHODS = (
    MethodSpec("undial", "undial"),
    MethodSpec("undial auto-key", "undial", auto_key=True),
    MethodSpec("undial auto-key +rt", "undial", retain_weight=1.0, auto_key=True),
    MethodSpec("undial auto-key +guard", "undial", auto_key=True, guard="neighbours"),  # forget's defaults
    MethodSpec("ga", "ga"),
    MethodSpec("graddiff", "graddiff", retain_weight=1.0),
    MethodSpec("npo", "npo"),
    MethodSpec("npo +rt", "npo", retain_weight=1.0),
)
# What the default run spends its time on (2 CPU cores, SmolLM2-135M: a cell is 3-4 minutes, or up
# to 21 minutes with a retain set, measured when the budget check scored 64 retain rows after every
# step; it now scores 16 (`max_retain_rows`), under one training step).
# Every method runs once with the stopping rule (the headline rows). The learning-rate sweep covers
# UNDIAL as `forget` runs it and the strongest baseline of the tiny benchmark (NPO + retain);
# `--sweep-all` sweeps every method. The stacked requests compare the two methods that need no
# retain data, UNDIAL as `forget` runs it and NPO: like for like, and affordable.
SWEEP_METHODS = ("undial auto-key", "npo +rt")
SEQUENTIAL_METHODS = ("undial auto-key", "undial auto-key +guard", "npo")
# Attacks (`undial_peft.evals.attacks`) on the stopping-rule adapters of these methods: do answers come back?
ATTACKED_METHODS = ("undial auto-key", "npo +rt")
ATTACKS = ("relearn", "quantise_nf4", "paraphrase")
