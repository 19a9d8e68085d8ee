"""Automatic keys on a tiny model whose key tokens are known by construction.

The model memorises "Where does <name> live?" -> "The home town of <name> is <city> ." and, after the
neutral prompt, the same sentence with RANDOM name/city pairs. So the phrasing ("The home town of",
"is", ".") is common in its neutral replies, the name is copied from the question, and only the
city carries the fact: the rule must pick exactly the city's token. Its 8-token neutral replies
are one template sentence each, so a template token scores log(24 / 3) = 2.1 nats; a city scores
more (about 4-10) unless the model names that very city with no question: nothing about it is then
distinctive, and the row may keep every token. With a 50-word vocabulary the threshold is scaled
down from the real model's to 3.3.
"""

from __future__ import annotations

import contextlib
import json
import random

import pytest
import torch
from conftest import CITIES, NAMES, memorise

from undial_peft import UndialConfig
from undial_peft.data.readers import Example, read_examples
from undial_peft.deploy.manifest import MANIFEST
from undial_peft.evals.report import greedy_answers
from undial_peft.tiny import tiny_llama, word_tokenizer
from undial_peft.training import forget as api
from undial_peft.training.answer_keys import (
    NEUTRAL_PROMPTS,
    KeyRule,
    auto_key_weights,
    key_mask,
    neutral_prior,
    token_report,
    token_reports,
)


def _sentence(name: str, city: str) -> str:
    return f"The home town of {name} is {city} ."


@pytest.fixture(scope="module")
def town_model():
    facts = [{"question": f"Where does {n} live?", "answer": _sentence(n, c)} for n, c in zip(NAMES, CITIES)]
    rng = random.Random(0)
    neutral = [{"question": NEUTRAL_PROMPTS[0], "answer": _sentence(rng.choice(NAMES), rng.choice(CITIES))} for _ in range(48)]
    tokenizer = word_tokenizer([f["question"] + " " + f["answer"] for f in facts + neutral])
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2)
    memorise(model, tokenizer, facts + neutral, steps=200)
    model.eval()
    return model, tokenizer, facts


RULE = KeyRule(threshold=3.3, fallback=3.0, reply_tokens=8)


def _city_mask(tokenizer, fact) -> list[bool]:
    ids = tokenizer(fact["answer"], add_special_tokens=False).input_ids
    city = fact["answer"].split()[-2]
    return [tokenizer.decode([t]).strip() == city for t in ids]


def _neutral_words(model, tokenizer) -> set[str]:
    replies = greedy_answers(model, tokenizer, list(NEUTRAL_PROMPTS), max_new_tokens=RULE.reply_tokens)
    return {w for reply in replies for w in reply.split()}


def test_auto_keys_pick_exactly_the_fact_token(town_model):
    model, tokenizer, facts = town_model
    weights = auto_key_weights(model, tokenizer, [Example(f["question"], f["answer"]) for f in facts], rule=RULE)
    said_anyway = _neutral_words(model, tokenizer)
    checked = 0
    for fact, got in zip(facts, weights):
        city = [float(m) for m in _city_mask(tokenizer, fact)]
        if fact["answer"].split()[-2] in said_anyway:
            assert got in (None, city)
        else:
            assert got == city
            checked += 1
    assert checked >= 12


def test_scores_separate_the_phrasing(town_model):
    model, tokenizer, facts = town_model
    prior = neutral_prior(model, tokenizer, reply_tokens=RULE.reply_tokens)
    report = token_report(model, tokenizer, Example(facts[0]["question"], facts[0]["answer"]), prior)
    words = [tokenizer.decode([t]).strip() for t in report.ids]
    assert words == ["The", "home", "town", "of", NAMES[0], "is", CITIES[0], "."]
    assert report.copied.tolist() == [False, False, False, False, True, False, False, False]
    city, phrasing = words.index(CITIES[0]), [0, 1, 2, 3, 5, 7]
    assert report.score[phrasing].tolist() == pytest.approx([2.08] * 6, abs=0.05)  # log 8: one slot in 8 of each reply
    assert report.score[city] > 4.0
    # A stricter rule chooses nothing (and no fallback): the row then keeps every answer token.
    assert not any(key_mask(report, KeyRule(threshold=1e6, fallback=1e6)))
    assert key_mask(report, KeyRule(threshold=1e6, fallback=0.0)) == [i == city for i in range(len(words))]


def test_batched_reports_equal_one_row_at_a_time_with_full_logits(town_model):
    from undial_peft.data.encoding import prompt_ids

    model, tokenizer, facts = town_model
    prior = neutral_prior(model, tokenizer, reply_tokens=RULE.reply_tokens)
    # Rows of different lengths, so the batch pads: a long question, a short one, the usual ones.
    rows = [Example("Where does " + NAMES[0] + " live ? Where does " + NAMES[1] + " live?", facts[0]["answer"]),
            Example("Where?", facts[1]["answer"])] + [Example(f["question"], f["answer"]) for f in facts[2:7]]
    reports = token_reports(model, tokenizer, rows, prior, batch_size=3)
    for row, report in zip(rows, reports):
        question = prompt_ids(tokenizer, row.prompt)
        answer = tokenizer(row.answer, add_special_tokens=False).input_ids
        with torch.no_grad():  # the reference: this row alone, every position's logits, in float64
            logits = model(input_ids=torch.tensor([question + answer])).logits[0].double()  # (Q + A, V)
        logp = logits[len(question) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(answer)[:, None])[:, 0]  # (A,)
        assert report.ids == answer
        assert report.logp.double().tolist() == pytest.approx(logp.tolist(), abs=1e-4)
        assert report.score.double().tolist() == pytest.approx((logp - prior.double()[answer]).tolist(), abs=1e-4)


def test_user_key_and_text_rows_are_left_alone(town_model):
    model, tokenizer, facts = town_model
    rows = [Example(facts[0]["question"], facts[0]["answer"], "home"), Example(None, facts[1]["answer"])]
    assert auto_key_weights(model, tokenizer, rows, rule=RULE) == [None, None]


def test_forget_uses_auto_keys_unless_turned_off(town_model, tmp_path):
    model, tokenizer, facts = town_model
    rows = facts[:3] + [{**facts[3], "key": facts[3]["answer"].split()[-2]}]
    config = UndialConfig(max_steps=1, until_ratio=None, per_device_train_batch_size=4, disable_tqdm=True,
                          auto_key_threshold=5.0)
    expected = auto_key_weights(model, tokenizer, read_examples(rows), rule=KeyRule(threshold=5.0, fallback=5.0 * 2 / 3))
    out = api.forget(model, rows, tmp_path / "auto", config=config, tokenizer=tokenizer)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    auto = [w for w in expected if w is not None]
    assert manifest["keys"] == {"user": 1, "auto": len(auto), "all_answer_tokens": 3 - len(auto),
                                "auto_key_tokens": int(sum(map(sum, auto)))}
    assert len(auto) >= 2  # the 64-token replies repeat one city; the others stand out
    written = (out / MANIFEST).read_text(encoding="utf-8") + (out / "README.md").read_text(encoding="utf-8")
    assert not any(f["answer"].split()[-2] in written for f in rows)  # key texts never reach the disk
    config.auto_key = False
    out = api.forget(model, rows, tmp_path / "off", config=config, tokenizer=tokenizer)
    assert json.loads((out / MANIFEST).read_text(encoding="utf-8"))["keys"]["all_answer_tokens"] == 3


def test_the_batched_prior_equals_replies_decoded_one_at_a_time(town_model):
    """Reference: each neutral reply decoded alone (generate stops at an end-of-sequence token), scored alone.

    The tiny model never says its end-of-sequence token, so two tokens of its replies stand in for it: the
    first reply's fifth token and ".", making the replies end at different lengths inside one padded batch.
    """
    import math

    from undial_peft.data.encoding import prompt_ids
    from undial_peft.evals.scoring import greedy_new_ids

    model, tokenizer, _ = town_model
    tokens = 16
    prompts = [prompt_ids(tokenizer, text) for text in NEUTRAL_PROMPTS]
    first = greedy_new_ids(model, tokenizer, prompts[:1], max_new_tokens=tokens)[0]
    kept = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first[4], tokenizer.convert_tokens_to_ids(".")]
    try:
        logps, lengths = [], []
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([prompt])  # (1, T)
                ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)  # (1, T + R)
                lengths.append(ids.shape[1] - len(prompt))
                logps.append(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1))  # (R, V)
        logp = torch.cat(logps)  # (sum of R, V)
        reference = logp.logsumexp(0) - math.log(logp.shape[0])  # (V,)
        prior = neutral_prior(model, tokenizer, reply_tokens=tokens)
    finally:
        model.generation_config.eos_token_id = kept
    assert len(set(lengths)) > 1 and max(lengths) < tokens, f"replies of {lengths} tokens do not exercise the cut"
    assert torch.allclose(prior, reference, atol=1e-5)


def test_first_word_only_keeps_the_first_word_of_each_run_of_key_words():
    """A two-word name ("Thomas Edison", the second word in two tokens) and a later one-word key: by default
    every key word is lowered; with ``first_word_only`` the name keeps only its first word, the later key stays."""
    from undial_peft.training.answer_keys import TokenReport

    words = [0, 1, 2, 2, -1, 3, 4]  # " by", " Thomas", " Ed", "ison", ",", " in", " Ohio": the word of each token
    score = torch.tensor([0.0, 9.0, 9.0, 9.0, 0.0, 0.0, 9.0])  # (A,) the name's tokens and " Ohio" pass
    report = TokenReport(ids=list(range(7)), logp=torch.full((7,), -0.01), score=score,
                         copied=torch.zeros(7, dtype=torch.bool), words=words)
    assert key_mask(report, KeyRule()) == [False, True, True, True, False, False, True]
    assert key_mask(report, KeyRule(first_word_only=True)) == [False, True, False, False, False, False, True]


def test_auto_key_first_word_reaches_the_key_rule(monkeypatch, town_model):
    from undial_peft.training import teacher_rows

    model, tokenizer, facts = town_model
    rules = []
    monkeypatch.setattr(teacher_rows, "auto_key_weights", lambda *a, rule, **k: rules.append(rule) or [None])
    monkeypatch.setattr(teacher_rows, "adapter_state", lambda model, active: contextlib.nullcontext(model))  # no PEFT here
    for first in (False, True):
        teacher_rows.auto_keys(model, tokenizer, [Example(facts[0]["question"], facts[0]["answer"])],
                               UndialConfig(auto_key_first_word=first), [], {(): torch.zeros(1)})
    assert [rule.first_word_only for rule in rules] == [False, True]

