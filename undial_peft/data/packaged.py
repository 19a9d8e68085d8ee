"""The fact files shipped with the package (``undial_peft/data/*.jsonl``), measured on SmolLM2-135M-Instruct.

>>> sorted({f["split"] for f in demo_facts()}), sorted({f["topic"] for f in real_facts()})[:2]
(['forget', 'keep'], ['authors', 'capitals'])
>>> len({row["relation"] for row in guard_bank()}) >= 10
True
"""

from __future__ import annotations

import json
from importlib import resources


def _packaged(name: str) -> list[dict[str, str]]:
    text = resources.files("undial_peft").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def demo_facts() -> list[dict[str, str]]:
    """The demo's facts: question, answer, key word and split (forget / keep); each answer is the model's
    own greedy sentence, kept where its probability is >= 0.5."""
    return _packaged("demo_facts.jsonl")


def real_facts() -> list[dict[str, str]]:
    """Real facts the model knows (hand key probability >= 0.5): question, answer, key and topic."""
    return _packaged("real_facts.jsonl")


def guard_bank() -> list[dict[str, str]]:
    """Factual prompts across many relations, with no answers (the teacher gives them, training/guard.py):
    relation, subject (a phrase in both prompts), question (chat models) and stub (base models)."""
    return _packaged("guard_bank.jsonl")
