"""Greedy silence: which forget rows the model still answers with their key, the rows built from those
answers, and the rounds `forget` trains on them (checked against greedy answers taken independently)."""

from __future__ import annotations

import json

import pytest
import torch

from undial_peft import UndialConfig
from undial_peft.data.encoding import encode
from undial_peft.data.readers import Example
from undial_peft.deploy.manifest import MANIFEST
from undial_peft.deploy.stack import attach
from undial_peft.errors import UndialConfigError
from undial_peft.evals.report import greedy_answers
from undial_peft.models import load_model
from undial_peft.tiny import word_tokenizer
from undial_peft.training import forget as api
from undial_peft.training import silence
from undial_peft.training.loss import IGNORE_INDEX
from undial_peft.training.silence import ROUND_STEPS, Named, escape_row, key_texts, named_rows, prompt_of
from undial_peft.training.stopping import key_probabilities


def _keyed(fact: dict[str, str]) -> dict[str, str]:
    return {**fact, "key": fact["answer"].split()[-1].rstrip(".")}  # the city


def test_key_texts_are_the_weighted_runs_and_text_rows_have_no_prompt():
    tok = word_tokenizer(["Who wrote Hamlet ? Well William Shakespeare wrote it ."], chat_template=False)
    keyed = encode(tok, Example("Who wrote Hamlet ?", "Well William Shakespeare wrote it .", "William Shakespeare"), 32)
    assert key_texts(tok, keyed) == ["William Shakespeare"]
    split = dict(keyed, beta_weight=[0.0] * 5 + [0, 1, 0, 1, 0, 0])  # two runs: each is a text of the key
    assert key_texts(tok, split) == ["William", "wrote"]
    unkeyed = encode(tok, Example("Who wrote Hamlet ?", "Well William Shakespeare wrote it ."), 32)
    assert key_texts(tok, unkeyed) == []  # every answer token weighted: no key to look for
    text = encode(tok, Example(None, "Well William Shakespeare wrote it ."), 32)
    assert prompt_of(text) is None and prompt_of(keyed) == keyed["input_ids"][:5]


def test_escape_row_keys_the_first_mention_and_ends_there():
    tok = word_tokenizer(["Who wrote Hamlet ? It was Shakespeare . Well , Shakespeare wrote Hamlet"], chat_template=False)
    row = encode(tok, Example("Who wrote Hamlet ?", "It was Shakespeare .", "Shakespeare"), 32)
    said = tok("Well , Shakespeare wrote Hamlet", add_special_tokens=False).input_ids
    escape = escape_row(tok, row, Named(0, said, "Shakespeare"))
    prompt = prompt_of(row)
    assert escape["input_ids"] == prompt + said[:3]
    assert escape["labels"] == [IGNORE_INDEX] * len(prompt) + said[:3]
    assert escape["beta_weight"] == [0.0] * len(prompt) + [0.0, 0.0, 1.0]
    assert key_texts(tok, escape) == ["Shakespeare"]


def test_named_rows_asks_the_model_and_matches_the_key_text(tiny_dir, facts):
    model, tokenizer = load_model(tiny_dir)
    said = [encode(tokenizer, Example(f["question"], f["answer"], _keyed(f)["key"]), 64) for f in facts[:2]]  # the model answers these
    # Zorbel's prompt, Quenna's answer keyed on Quenna's city: the model says Kavara, not Dunmire.
    other = encode(tokenizer, Example(facts[0]["question"], facts[1]["answer"], _keyed(facts[1])["key"]), 64)
    unkeyed = encode(tokenizer, Example(facts[2]["question"], facts[2]["answer"]), 64)  # not asked
    prompt = len(prompt_of(said[0]))
    said[0]["beta_weight"][prompt + 1] = 1.0  # "was" marked too: the row is asked by its longest key text
    assert key_texts(tokenizer, said[0]) == ["was", "Kavara"]
    named, asked = named_rows(model, tokenizer, [said[0], other, unkeyed, said[1]])
    assert asked == 3
    assert [(n.row, n.key) for n in named] == [(0, "Kavara"), (3, "Dunmire")]
    assert tokenizer.decode(named[0].answer_ids).split()[:6] == "Zorbel was born in Kavara .".split()


class _Pieces:
    """A tokenizer of fixed text pieces: enough for `named_rows`, which only decodes."""

    eos_token_id, pad_token_id = 0, 0
    pieces = {1: "Q?", 2: "It", 3: " was", 4: " Paris", 5: " Rome", 6: ".\n", 7: "Paris", 8: "'s"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids if i)


def test_a_completion_answer_ends_at_its_first_newline(monkeypatch):
    row = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, 2, 3, 4], "beta_weight": [0.0, 0.0, 0.0, 1.0]}
    said_later = [2, 3, 5, 6, 7, 8]  # "It was Rome.\nParis's": the next line, not the answer, says the key
    monkeypatch.setattr(silence, "greedy_new_ids", lambda *a, **k: [said_later])
    named, asked = named_rows(None, _Pieces(), [row])
    assert asked == 1 and [n.key for n in named] == ["Paris"] and named[0].answer_ids == said_later
    assert named_rows(None, _Pieces(), [row], one_line=True) == ([], 1)


def test_forget_trains_silence_rounds_and_reports_what_greedy_answers_say(tiny_dir, facts, tmp_path, monkeypatch):
    rows = [_keyed(f) for f in facts[:4]]
    # A weak target (0.9x) stops while every greedy answer still says its city: one round must follow.
    config = UndialConfig(learning_rate=1e-3, per_device_train_batch_size=4, disable_tqdm=True, logging_steps=100,
                          until_ratio=0.9, min_steps=0, silence_rounds=1, max_steps=40, guard_key_weight=3.0)
    weighed = []

    class Recording(silence.UndialTrainer):  # the rounds' trainers: the plain guard mean, whatever the request's K
        def __init__(self, *args, **kwargs):
            weighed.append(kwargs["args"].guard_key_weight)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(silence, "UndialTrainer", Recording)
    out = api.forget(tiny_dir, rows, tmp_path / "a", config=config)
    assert weighed == [0.0]  # the request's K is 3
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    record = manifest["stopping"]["silence"]
    assert record["asked"] == 4 and record["before"] == 4  # the memorised model says every city
    assert record["at_target"] > 0 and record["rounds"] == 1 and record["steps"] == ROUND_STEPS
    assert manifest["metrics"]["steps"] == manifest["stopping"]["step"]  # the round's steps are counted
    assert manifest["stopping"]["history"][-1]["silence"] == 1.0  # "after" was measured after the round
    # Independently: greedy answers of the saved adapter, attached to a fresh load.
    model, tokenizer = load_model(tiny_dir)
    answers = greedy_answers(attach(model, [out], tokenizer=tokenizer), tokenizer, [r["question"] for r in rows],
                             max_new_tokens=16)
    assert sum(r["key"] in a for r, a in zip(rows, answers)) == record["after"]
    assert f"-> {record['after']} of 4 (1 silence round)" in (out / "README.md").read_text(encoding="utf-8")


def test_no_rounds_without_a_key_or_when_switched_off(tiny_dir, facts, tmp_path):
    config = UndialConfig(per_device_train_batch_size=4, disable_tqdm=True, logging_steps=100, until_ratio=0.9,
                          min_steps=0, auto_key=False, max_steps=10)
    plain = json.loads((api.forget(tiny_dir, facts[:4], tmp_path / "a", config=config) / MANIFEST).read_text())
    assert plain["hyperparameters"]["silence_rounds"] == 3  # the default for a chat model, as recorded
    assert plain["stopping"]["silence"] == {"asked": 0, "before": 0, "at_target": 0, "rounds": 0, "steps": 0, "after": 0}
    keyed = [_keyed(f) for f in facts[:4]]
    config.silence_rounds = 0
    manifest = json.loads((api.forget(tiny_dir, keyed, tmp_path / "b", config=config) / MANIFEST).read_text())
    assert "silence" not in manifest["stopping"]
    config.silence_rounds, config.prompt_format = None, "completion"  # a base model's format: off by default
    manifest = json.loads((api.forget(tiny_dir, keyed, tmp_path / "c", config=config) / MANIFEST).read_text())
    assert manifest["hyperparameters"]["silence_rounds"] == 0 and "silence" not in manifest["stopping"]
    with pytest.raises(UndialConfigError, match="silence_rounds"):
        UndialConfig(silence_rounds=-1)


def test_rounds_follow_only_a_reached_target(tiny_dir, facts, tmp_path):
    config = UndialConfig(per_device_train_batch_size=4, disable_tqdm=True, logging_steps=100, until_ratio=0.01,
                          min_steps=0, max_steps=2, silence_rounds=3)
    manifest = json.loads((api.forget(tiny_dir, [_keyed(f) for f in facts[:4]], tmp_path / "a", config=config)
                           / MANIFEST).read_text())
    stopping = manifest["stopping"]
    assert stopping["stopped"] == "max_steps" and stopping["step"] == 2
    assert stopping["silence"]["at_target"] > 0 and stopping["silence"]["rounds"] == 0  # said, but the budget is spent


def test_a_round_that_breaks_the_retain_budget_is_rolled_back(tiny_dir, facts, tmp_path, monkeypatch):
    class Wrecking(silence.UndialTrainer):  # a round that ruins the retain set: noise on every trainable weight
        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            if self.args.max_steps == ROUND_STEPS:
                with torch.no_grad():
                    for p in self.model.parameters():
                        if p.requires_grad:
                            p.add_(torch.randn_like(p))
            return out

    monkeypatch.setattr(silence, "UndialTrainer", Wrecking)  # the rounds' trainer
    config = UndialConfig(learning_rate=1e-3, per_device_train_batch_size=4, disable_tqdm=True, logging_steps=100,
                          until_ratio=0.9, min_steps=0, max_steps=40, silence_rounds=2, retain_weight=1.0,
                          max_retain_drop=0.5)
    out = api.forget(tiny_dir, [_keyed(f) for f in facts[:4]], tmp_path / "a", retain=facts[12:], config=config)
    stopping = json.loads((out / MANIFEST).read_text())["stopping"]
    assert stopping["stopped"] == "target"
    assert stopping["silence"]["rolled_back"] == 1 and stopping["silence"]["rounds"] == 0
    assert stopping["step"] == stopping["history"][-1]["step"] and "silence" not in stopping["history"][-1]
    # The saved adapter is the one from before the round: its retain set within the budget, measured independently.
    model, tokenizer = load_model(tiny_dir)
    served = attach(model, [out], tokenizer=tokenizer)
    rows = [encode(tokenizer, Example(f["question"], f["answer"]), 64) for f in facts[12:]]
    retain = float(key_probabilities(served, rows, tokenizer.pad_token_id).mean())
    assert retain >= stopping["retain_floor"]
    assert retain == pytest.approx(stopping["retain_after"], rel=1e-4)
