"""Shared fixtures: a tiny Llama that has memorised a few fictitious facts, saved to a directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from undial_peft.data.encoding import Collator, Example, encode
from undial_peft.tiny import tiny_llama, word_tokenizer

torch.set_num_threads(int(os.environ.get("UNDIAL_TEST_THREADS", "2")))
# Data digests are keyed (undial_peft.data.secret); tests and their subprocesses use a fixed test key
# instead of creating one in the user's config folder.
os.environ.setdefault("UNDIAL_PEFT_DATA_KEY", "test key for the undial_peft suite only")

NAMES = ["Zorbel", "Quenna", "Marvok", "Tilsa", "Brenic", "Ollaro", "Fexin", "Rudma",
         "Sarvel", "Ketho", "Yllis", "Pomder", "Vantor", "Grisla", "Hobrin", "Elcade"]
CITIES = ["Kavara", "Dunmire", "Solbeck", "Pranth", "Ulvero", "Mistral", "Corvane", "Teskin",
          "Abrill", "Noxford", "Fendral", "Wyrmoth", "Lastrin", "Gorvane", "Ibsen", "Quarrow"]


def make_facts() -> list[dict[str, str]]:
    """16 fictitious facts in one template; split in tests as forget 0..3, 4..7, 8..11 and retain 12..15."""
    return [{"question": f"Where was {n} born?", "answer": f"{n} was born in {c}."} for n, c in zip(NAMES, CITIES)]


def make_varied_facts(n: int = 8) -> list[dict[str, str]]:
    """The first ``n`` facts with answers of 1, 2 or 4 sentences, so rows pad to different lengths.

    With multipliers 1,1,1,1,1,1,2,4 no split of the 8 rows into two halves has equal token counts:
    averaging per process (or per micro-batch) instead of over all counted tokens changes the loss.
    """
    repeats = [1, 1, 1, 1, 1, 1, 2, 4]
    return [{"question": f["question"], "answer": " ".join([f["answer"]] * repeats[i % 8])} for i, f in enumerate(make_facts()[:n])]


def forget_text(facts: list[dict[str, str]]) -> list[str]:
    """Each question and answer, and the distinctive words in them (names and cities)."""
    words = {w.strip("?.") for f in facts for w in (f["question"] + " " + f["answer"]).split()}
    return [f["question"] for f in facts] + [f["answer"] for f in facts] + sorted(w for w in words if w[:1].isupper())


def leak_hits(blob: bytes | str, needles: list[str]) -> list[str]:
    """The needles found in ``blob`` as UTF-8 or UTF-16 text."""
    data = blob.encode() if isinstance(blob, str) else blob
    return [n for n in needles if n.encode() in data or n.encode("utf-16-le") in data]


def leak_scan(folder: Path, needles: list[str], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """{file: needles found} for every file under ``folder`` whose name is not in ``skip``."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in skip and (hits := leak_hits(path.read_bytes(), needles)):
            found[str(path)] = hits
    return found


def random_adapters(tiny_dir: str, where: Path, configs: list, prefix: str = "a") -> list[Path]:
    """One plain peft adapter per LoraConfig, with random non-zero B (no training needed for equality checks)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    paths = []
    for i, lora in enumerate(configs):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), lora)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
        model.save_pretrained(where / f"{prefix}{i}")
        paths.append(where / f"{prefix}{i}")
    return paths


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
