"""Neighbour prompts: the request's templates found, filled with subjects the teacher lists, answered by it."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from undial_peft.data.packaged import guard_bank
from undial_peft.data.readers import Example
from undial_peft.tiny import tiny_llama, word_tokenizer
from undial_peft.training import neighbours
from undial_peft.training.adapters import build_trainable, default_lora_config
from undial_peft.training.guard import guard_rows
from undial_peft.training.neighbours import named_subjects, templates

SYMBOLS = ["The chemical symbol for silver is", "The chemical symbol for sodium is", "The chemical symbol for tin is"]


def test_templates_find_the_shared_slot_and_keep_the_spacing():
    prompts = ["What is the capital of France?", "What is the capital of South Korea?", "Who wrote Hamlet?",
               "Who wrote Pride and Prejudice?", "Why?"]
    found = templates(prompts)
    assert found == {("What is the capital of ", "?"): ["France", "South Korea"],
                     ("Who wrote ", "?"): ["Hamlet", "Pride and Prejudice"]}
    for (prefix, suffix), subjects in found.items():
        assert all(f"{prefix}{s}{suffix}" in prompts for s in subjects)


def test_templates_need_two_prompts_and_enough_shared_text():
    assert templates(["The capital of Peru is"]) == {}
    assert templates(["Hot?", "Cold?"]) == {}  # "?" alone is no template
    assert templates(["The capital of Peru is", "The capital of Peru is"]) == {}  # the same prompt twice: no slot
    assert templates(["Tell me about X", "Tell me about X please"]) == {}  # one of them has no slot left


class _ListingTokenizer:
    """A stand-in whose `decode` returns a fixed listing per prompt: the parsing and filters, alone."""

    def __init__(self, listings: list[str]):
        self.listings, self.asked = listings, []

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        self.asked.append(text)
        return SimpleNamespace(input_ids=[len(self.asked) - 1])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.listings[ids[0]]


def test_named_subjects_keep_new_short_names_absent_from_the_forget_rows(monkeypatch):
    listings = ["gold\nZinc, and lead\nSilver\n2024\nthe largest metal of them all here\ncut", "zinc<img>tin\ncobalt"]
    tokenizer = _ListingTokenizer(listings)
    monkeypatch.setattr(neighbours, "greedy_new_ids", lambda model, tok, prompts, **kw: [[i] for i in range(len(prompts))])
    monkeypatch.setattr(neighbours, "adapter_state", lambda model, active: contextlib.nullcontext())
    names = named_subjects(None, tokenizer, ["silver", "sodium"], [], avoid=["The chemical symbol for lead is Pb."],
                           samples=2)
    # silver: a subject already; lead: in a forget row; 2024: no letter; a sentence: too long; "cut" and
    # "cobalt": the last item of a listing, maybe cut by the token budget; "zinc" twice: once.
    assert names == ["gold", "Zinc", "tin"]
    assert tokenizer.asked == ["silver\nsodium\n", "sodium\nsilver\n"]  # one rotation per sample


def _model(texts: list[str]):
    tokenizer = word_tokenizer(texts, chat_template=False)
    return build_trainable(tiny_llama(tokenizer, hidden_size=32, num_layers=1), default_lora_config()), tokenizer


def test_named_subjects_are_repeatable_and_leave_the_global_rng_alone():
    model, tokenizer = _model(SYMBOLS + ["gold zinc lead , \n"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = named_subjects(model, tokenizer, ["silver", "sodium", "tin"], [], avoid=[], new_tokens=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert named_subjects(model, tokenizer, ["silver", "sodium", "tin"], [], avoid=[], new_tokens=8) == first
    assert named_subjects(model, tokenizer, ["silver", "sodium", "tin"], [], avoid=[], new_tokens=8, seed=1) != first


def test_guard_rows_ask_the_request_template_about_named_subjects_first(monkeypatch):
    bank = [row[name] for row in guard_bank() for name in ("question", "stub")]
    model, tokenizer = _model(SYMBOLS + bank + ["gold zinc"])
    monkeypatch.setattr(neighbours, "named_subjects", lambda *a, **k: ["gold", "zinc"])
    forget_rows = [Example(p, " Xx.") for p in SYMBOLS]
    rows = guard_rows(model, tokenizer, "completion", forget_rows, teacher_adapters=[], size=6, new_tokens=3,
                      neighbours=True)
    plain = guard_rows(model, tokenizer, "completion", forget_rows, teacher_adapters=[], size=6, new_tokens=3)
    prompts = [row.prompt for row in rows]
    assert prompts[:2] == ["The chemical symbol for gold is", "The chemical symbol for zinc is"]
    assert [row.prompt for row in rows[2:]] == [row.prompt for row in plain]  # then the whole bank share
    assert {row.where for row in rows[:2]} == {"guard neighbours"}
