"""Attacks on an unlearned tiny model: definitions by hand, quantisation against bitsandbytes' own
4-bit load, relearning that leaves the stack as it found it, and the CLI report."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from conftest import make_facts

from undial_peft import UndialConfig, forget
from undial_peft.cli import main
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.deploy.stack import attach
from undial_peft.evals.attacks import (
    REMOVAL_NOTE,
    AttackSetup,
    multiple_choice,
    prompt_attack,
    quantise,
    recovered_fraction,
    relearn,
)
from undial_peft.evals.items import EvalItem
from undial_peft.evals.requantise import merged_copy, round_trip
from undial_peft.models import load_model

FACTS = make_facts()


def _rows(facts):
    """Forget rows with paraphrased questions and three perturbed answers (other facts' cities)."""
    cities = [f["answer"].split()[-1].rstrip(".") for f in FACTS]
    return [dict(f, paraphrased_question=f["question"].replace("Where was", "Where has") ,
                 perturbed_answers=[f["answer"].replace(cities[i], cities[(i + j) % 16]) for j in (1, 2, 3)])
            for i, f in enumerate(facts)]


@pytest.fixture(scope="module")
def unlearned(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("attacks") / "req"
    config = UndialConfig(num_train_epochs=30, learning_rate=1e-3, per_device_train_batch_size=4, disable_tqdm=True,
                          logging_steps=1000, max_steps=-1, until_ratio=None, auto_key=False)  # fixed length
    forget(tiny_dir, FACTS[:4], str(out), config=config)
    return str(out)


def test_recovered_fraction_by_hand():
    assert recovered_fraction(base=0.9, before=0.1, after=0.5) == pytest.approx(0.5)
    assert recovered_fraction(base=0.9, before=0.1, after=0.9) == pytest.approx(1.0)
    assert recovered_fraction(base=0.9, before=0.1, after=0.05) == pytest.approx(-0.0625)
    assert recovered_fraction(base=0.4, before=0.4, after=0.7) is None  # nothing was forgotten


class _PromptedSetup:
    """An `AttackSetup` stand-in whose models answer with fixed probabilities: prompt [0] is the plain
    question, prompt [1] the attacked one; ``values[(adapter_off, attacked)]`` is the probability."""

    def __init__(self, values: dict[tuple[bool, bool], float], n: int = 3) -> None:
        self.values, self.off = values, False
        self.items = [EvalItem(f"Q{i}?", f"A{i}.", paraphrased_question=f"P{i}?") for i in range(n)]
        self.prompts = [[0]] * n
        self.base = {"probability": np.full(n, values[(True, False)])}
        self.before = {"probability": np.full(n, values[(False, False)])}
        self.model = self

    @contextlib.contextmanager
    def disable_adapter(self):
        self.off = True
        try:
            yield
        finally:
            self.off = False

    def ask(self, question: str, before=()) -> list[int]:
        return [1] if before or question.startswith("P") else [0]

    def measure(self, model, prompts, index=None) -> dict[str, np.ndarray]:
        picked = range(len(prompts)) if index is None else index
        return {"probability": np.array([self.values[(self.off, prompts[i] == [1])] for i in picked])}


@pytest.mark.parametrize("kind", ["paraphrase", "few_shot", "reveal_prompt"])
def test_prompt_attacks_are_anchored_to_the_base_asked_the_same_way(kind):
    shots = [{"question": "S?", "answer": "T."}] if kind == "few_shot" else None
    # The README demo's few_shot figures: base 0.712 plain / 0.830 asked so, unlearned 0.509 / 0.727.
    # By hand: (0.727 - 0.509) / (0.830 - 0.509) = 0.218 / 0.321 = 0.6791; anchored to the plain base
    # it read (0.727 - 0.509) / (0.712 - 0.509) = 1.074, the prompt's lift of every model included.
    setup = _PromptedSetup({(True, False): 0.712, (False, False): 0.509, (True, True): 0.830, (False, True): 0.727})
    result = prompt_attack(setup, kind, shots=shots)
    assert result.recovered["probability"] == pytest.approx(0.218 / 0.321)
    assert result.base == {"probability": pytest.approx(0.830)} and result.settings["base_plain"] == {"probability": pytest.approx(0.712)}
    # A prompt that lifts the base from 0.5 to 0.9 and the unlearned model from 0.1 to 0.5 (the base's
    # plain level) closes half the gap it leaves under that prompt: (0.5 - 0.1) / (0.9 - 0.1), not 1.
    setup = _PromptedSetup({(True, False): 0.5, (False, False): 0.1, (True, True): 0.9, (False, True): 0.5})
    assert prompt_attack(setup, kind, shots=shots).recovered["probability"] == pytest.approx(0.5)


def test_nf4_round_trip_equals_a_real_bitsandbytes_4bit_load(tiny_dir):
    import bitsandbytes as bnb

    plain, _ = load_model(tiny_dir)
    four, _ = load_model(tiny_dir, load_in_4bit=True)
    layers = {n: m for n, m in four.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers
    for name, layer in layers.items():
        stored = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        weight = plain.get_submodule(name).weight
        torch.testing.assert_close(round_trip(weight, "nf4"), stored, atol=1e-6, rtol=0)
        assert not torch.equal(round_trip(weight, "nf4"), weight)  # it does round


def test_int8_round_trip_is_rowwise_absmax_by_hand():
    weight = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    w = weight.half().double().numpy()
    absmax = np.abs(w).max(axis=1, keepdims=True)
    expected = np.round(w * 127 / absmax) * absmax / 127  # LLM.int8 weight codes, in float64
    np.testing.assert_allclose(round_trip(weight, "int8").numpy(), expected, atol=2e-3)


def test_merged_copy_matches_the_attached_stack_and_leaves_it(tiny_dir, unlearned):
    model = attach(tiny_dir, [unlearned])
    ids = model.tokenizer("Where was Zorbel born ?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = merged_copy(model)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # the PeftModel still has its adapter


def test_attacks_on_an_unlearned_tiny_model(tiny_dir, unlearned):
    model = attach(tiny_dir, [unlearned])
    weights = {n: p.clone() for n, p in model.named_parameters()}
    setup = AttackSetup(model, model.tokenizer, _rows(FACTS[:4]))
    assert setup.base["probability"].mean() > 0.9 > 0.5 > setup.before["probability"].mean()  # it did forget
    result = relearn(setup, steps=20, lr=3e-3)
    assert result.n_items == 2 and result.settings["train_rows"] == 2  # trained on two, measured on the other two
    # relearning two facts of the same template brings the other two partly back
    assert result.recovered["probability"] > 0.1
    assert result.recovered["probability"] == pytest.approx(
        (result.after["probability"] - result.before["probability"]) / (result.base["probability"] - result.before["probability"]))
    assert "relearn" not in model.peft_config and list(model.base_model.active_adapters) == ["stack_0"]
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # stack and base untouched
    related = relearn(setup, train_on=FACTS[12:16], steps=20, lr=3e-3)
    assert related.attack == "relearn_related" and related.n_items == 4
    for scheme in ("nf4", "int8"):
        q = quantise(setup, scheme)
        assert q.settings["base_quantised"]["probability"] > 0.5  # quantising the base alone keeps the facts
        assert q.after["probability"] < 0.9  # round-off does not undo this adapter wholesale here
    reveal = prompt_attack(setup, "reveal_prompt")
    assert reveal.n_items == 4 and set(reveal.settings["base_plain"]) == {"probability"}
    assert prompt_attack(setup, "paraphrase").n_items == 4
    with pytest.raises(ValueError, match="few_shot"):
        prompt_attack(setup, "few_shot")
    mc = multiple_choice(setup)
    assert mc.before == {"probability": 0.25, "accuracy": 0.25} and 0 <= mc.after["probability"] <= 1


def test_system_turn_reaches_the_prompt(tiny_dir):
    _, tok = load_model(tiny_dir)
    chat_prompt = PromptFormat.resolve("auto", tok).conversation_ids
    plain = chat_prompt(tok, [{"role": "user", "content": "Where was Zorbel born ?"}])
    with_system = chat_prompt(tok, [{"role": "system", "content": "Zorbel"}, {"role": "user", "content": "Where was Zorbel born ?"}])
    assert len(with_system) > len(plain) and with_system[-len(plain) + 1 :] == plain[1:]


def test_cli_eval_reports_attacks(tiny_dir, unlearned, tmp_path, capsys):
    data, retain, out = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl", tmp_path / "report.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(FACTS[:4])), encoding="utf-8")
    retain.write_text("".join(json.dumps(f) + "\n" for f in FACTS[12:16]), encoding="utf-8")
    code = main(["eval", "--model", tiny_dir, "--adapters", unlearned, "--forget", str(data), "--retain", str(retain),
                 "--max-new-tokens", "4", "--attacks", "relearn", "few_shot", "quantise_nf4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["attacks"]["results"]) == {"relearn", "few_shot", "quantise_nf4"}
    assert report["attacks"]["removal"] == REMOVAL_NOTE and "recovered_p" in printed and "quantise_nf4" in printed
    assert "Zorbel" not in out.read_text()  # numbers only
    code = main(["eval", "--model", tiny_dir, "--forget", str(data), "--attacks", "relearn"])
    assert code == 2 and "--adapters" in capsys.readouterr().err
