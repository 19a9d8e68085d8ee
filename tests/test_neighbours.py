"""Neighbour prompts: the request's templates found, filled with subjects the teacher lists, answered by it."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from undial_peft.data.packaged import guard_bank
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.data.readers import Example
from undial_peft.tiny import tiny_llama, word_tokenizer
from undial_peft.training import guard, neighbours
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
    monkeypatch.setattr(guard, "subject_prompts", lambda *a, **k: [])  # tested on their own below
    forget_rows = [Example(p, " Xx.") for p in SYMBOLS]
    rows = guard_rows(model, tokenizer, "completion", forget_rows, teacher_adapters=[], size=6, new_tokens=3,
                      neighbours=True)
    plain = guard_rows(model, tokenizer, "completion", forget_rows, teacher_adapters=[], size=6, new_tokens=3)
    prompts = [row.prompt for row in rows]
    assert prompts[:2] == ["The chemical symbol for gold is", "The chemical symbol for zinc is"]
    assert [row.prompt for row in rows[2:]] == [row.prompt for row in plain]  # then the whole bank share
    assert {row.where for row in rows[:2]} == {"guard neighbours"}


def _relation(relation: str, subject: str, question: str, stub: str) -> dict[str, str]:
    return {"relation": relation, "subject": subject, "question": question, "stub": stub}


BANK = [_relation("capital", "Peru", "What is the capital of Peru?", "The capital of Peru is"),
        _relation("capital", "Chile", "What is the capital of Chile?", "The capital of Chile is"),
        _relation("language", "Peru", "What is the official language of Peru?", "The official language of Peru is"),
        _relation("symbol", "helium", "What is the chemical symbol for helium?", "The chemical symbol for helium is")]


def test_subject_prompts_ask_the_relations_whose_subjects_fit(monkeypatch):
    # Per-token log-probabilities of a next list item after the forget subjects: each forget subject
    # after the other one scores -2 (the bar: -2 - 1 = -3); the capital relation's subjects -2.5 and
    # -3.0 (mean -2.75: fits), helium -6 (chemical symbol: does not), Peru under "language" -2.
    scores = {"France": -2.0, "Japan": -2.0, "Peru": None, "Chile": -3.0, "helium": -6.0}
    asked_pairs = []

    def continuation_logprobs(model, tokenizer, pairs, adapters):
        asked_pairs.extend(pairs)
        return [scores[item] if scores[item] is not None else (-2.5 if i < 3 else -2.0) for i, (_, item) in enumerate(pairs)]

    monkeypatch.setattr(neighbours, "_continuation_logprobs", continuation_logprobs)
    asked = ["What is the official language of France?", "What is the official language of Japan?"]
    got = neighbours.subject_prompts(None, None, asked, BANK, "question", [], size=8)
    # capital fits; "language" fits too but its fills are the forgotten facts themselves; helium's relation does not
    assert got == ["What is the capital of France?", "What is the capital of Japan?"]
    assert asked_pairs[:2] == [("Japan\n", "France"), ("France\n", "Japan")]  # each subject after the others
    assert asked_pairs[2] == ("France\nJapan\n", "Peru")
    stubs = neighbours.subject_prompts(None, None, ["The official language of France is",
                                                    "The official language of Japan is"], BANK, "stub", [], size=1)
    assert stubs == ["The capital of France is"]
    assert neighbours.subject_prompts(None, None, ["Who wrote Hamlet?"], BANK, "question", [], size=8) == []


def test_continuation_logprobs_are_the_teacher_mean_token_logprob():
    # Against an independent float64 computation on a tiny model.
    model, tokenizer = _model(["silver sodium tin gold \n"])
    got = neighbours._continuation_logprobs(model, tokenizer, [("silver\nsodium\n", "gold"), ("silver\n", "tin")], [])
    for value, (context, item) in zip(got, [("silver\nsodium\n", "gold"), ("silver\n", "tin")]):
        head = tokenizer(context).input_ids
        ids = tokenizer(context + item + "\n").input_ids
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (T, V)
        expected = sum(logp[t - 1, ids[t]].item() for t in range(len(head), len(ids))) / (len(ids) - len(head))
        assert abs(value - expected) < 1e-4


def test_guard_keeps_subject_rows_but_not_one_stating_a_forgotten_answer(monkeypatch):
    forget_rows = [Example("What is the official language of France?", "The official language of France is French."),
                   Example("What is the official language of Japan?", "The official language of Japan is Japanese.")]
    answers = {"What is the capital of France?": "The capital of France is Paris.",
               "What do people in France speak?": "People in France speak French."}
    monkeypatch.setattr(guard, "neighbour_prompts", lambda *a, **k: [])
    monkeypatch.setattr(guard, "subject_prompts", lambda *a, **k: list(answers))
    monkeypatch.setattr(guard, "greedy_new_ids", lambda model, tok, ids, **k: [[0]] * len(ids))
    monkeypatch.setattr(guard, "_answer_text", lambda tok, prompt_ids, new, chat: answers.get(prompt_of.get(tuple(prompt_ids)), "A."))
    model, tokenizer = _model([p for p in answers] + [r.prompt for r in forget_rows])
    fmt = "chat" if tokenizer.chat_template else "completion"
    prompt_of = {tuple(PromptFormat.resolve(fmt, tokenizer).prompt_ids(tokenizer, p)): p for p in answers}
    rows = guard.guard_rows(model, tokenizer, fmt, forget_rows, teacher_adapters=[], size=2, neighbours=True)
    subjects = [row for row in rows if row.where == "guard subjects"]
    assert [(r.prompt, r.answer) for r in subjects] == [("What is the capital of France?", "The capital of France is Paris.")]
    assert sorted(guard._stated(forget_rows)) == ["french", "japanese"]


def test_subject_prompts_use_a_relation_s_usual_wording(monkeypatch):
    # "of the United States" is one row's wording, "of {}" the relation's; a row without its subject is skipped.
    bank = [_relation("currency", "United States", "What is the currency of the United States?", "x"),
            _relation("currency", "Brazil", "What is the currency of Brazil?", "x"),
            _relation("currency", "Peru", "What is the currency of Chile?", "x"),
            _relation("currency", "Turkey", "What is the currency of Turkey?", "x")]
    monkeypatch.setattr(neighbours, "_continuation_logprobs", lambda model, tok, pairs, adapters: [-2.0] * len(pairs))
    asked = ["What is the capital of France?", "What is the capital of Japan?"]
    assert neighbours.subject_prompts(None, None, asked, bank, "question", [], size=8) == \
        ["What is the currency of France?", "What is the currency of Japan?"]
