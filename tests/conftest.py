"""Shared fixtures: a tiny Llama that has memorised a few fictitious facts, saved to a directory."""

from __future__ import annotations

import os

import pytest
import torch

from undial_peft.data import Collator, Example, encode
from undial_peft.tiny import tiny_llama, word_tokenizer

torch.set_num_threads(int(os.environ.get("UNDIAL_TEST_THREADS", "2")))

NAMES = ["Zorbel", "Quenna", "Marvok", "Tilsa", "Brenic", "Ollaro", "Fexin", "Rudma",
         "Sarvel", "Ketho", "Yllis", "Pomder", "Vantor", "Grisla", "Hobrin", "Elcade"]
CITIES = ["Kavara", "Dunmire", "Solbeck", "Pranth", "Ulvero", "Mistral", "Corvane", "Teskin",
          "Abrill", "Noxford", "Fendral", "Wyrmoth", "Lastrin", "Gorvane", "Ibsen", "Quarrow"]


def make_facts() -> list[dict[str, str]]:
    """16 fictitious facts in one template; split in tests as forget 0..3, 4..7, 8..11 and retain 12..15."""
    return [{"question": f"Where was {n} born?", "answer": f"{n} was born in {c}."} for n, c in zip(NAMES, CITIES)]


def memorise(model: torch.nn.Module, tokenizer, facts: list[dict[str, str]], steps: int = 150) -> None:
    """Full fine-tune until the answers are near-certain (a stand-in for pretraining knowledge)."""
    features = [encode(tokenizer, Example(f["question"], f["answer"]), 64) for f in facts]
    batch = Collator(tokenizer.pad_token_id)(features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="session")
def facts() -> list[dict[str, str]]:
    return make_facts()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, facts) -> str:
    """A saved model directory (config, safetensors, tokenizer) that knows every fact."""
    tokenizer = word_tokenizer([f["question"] + " " + f["answer"] for f in facts])
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2)
    memorise(model, tokenizer, facts)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
