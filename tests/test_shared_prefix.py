"""A batch's shared opening run once == one pass over the batch: hidden states, gradients, whole training runs."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapters
from peft import LoraConfig

from undial_peft import UndialConfig
from undial_peft.data.encoding import Collator, build_dataset, encode
from undial_peft.data.readers import Example, read_examples
from undial_peft.models import load_model
from undial_peft.training import shared_prefix
from undial_peft.training.adapters import build_trainable, default_lora_config
from undial_peft.training.trainer import UndialTrainer


@pytest.fixture
def share_short(monkeypatch):
    """The tiny template shares 4 tokens ("<s> <|user|> Where was"): let that count as worth sharing."""
    monkeypatch.setattr(shared_prefix, "MIN_SHARED", 2)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The shared length of every batch `last_hidden` ran with its opening once (batches run as one pass: not listed)."""
    seen: list[int] = []
    inner = shared_prefix.last_hidden

    def spy(model, ids, mask, share=True):
        if share and shared_prefix.worth_sharing(ids, mask):
            seen.append(shared_prefix.shared_length(ids, mask))
        return inner(model, ids, mask, share)

    monkeypatch.setattr(shared_prefix, "last_hidden", spy)
    return seen


def test_shared_length_by_hand():
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 0], [1, 2, 3, 4, 0]])  # (3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert shared_prefix.shared_length(ids, mask) == 3
    assert shared_prefix.shared_length(ids[[0, 2]], mask[[0, 2]]) == 4  # stops where row 2 pads, not at 5
    same = torch.tensor([[7, 8, 9]] * 2)
    assert shared_prefix.shared_length(same, torch.ones_like(same)) == 2  # every row keeps one token of its own
    assert not shared_prefix.worth_sharing(ids[:1], mask[:1])  # one row shares nothing with another


def _batch(tokenizer, facts, lengths=(0, 1, 2, 0, 1)):
    """Chat rows that open alike and pad to different lengths (a row's answer repeats ``n`` more facts)."""
    rows = []
    for i, extra in enumerate(lengths):
        answer = " ".join([facts[i]["answer"]] + [facts[8 + j]["answer"] for j in range(extra)])
        rows.append(encode(tokenizer, Example(facts[i]["question"], answer), 64))
    return Collator(tokenizer.pad_token_id)(rows)


def _model(tiny_dir, tmp_path, dtype=torch.float64, lora=None):
    base, tokenizer = load_model(tiny_dir)
    stack = random_adapters(tiny_dir, tmp_path, [LoraConfig(r=4, target_modules=["q_proj", "down_proj"])])
    model = build_trainable(base.to(dtype), lora or default_lora_config(), stack)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name and param.requires_grad:
            param.data.normal_(0, 0.05)  # the new adapter changes the output
    return model.train(), tokenizer


def test_hidden_states_and_gradients_equal_one_pass_in_float64(tiny_dir, facts, tmp_path, share_short):
    """Hidden states to 1e-12; gradients to 1e-5 relative: Llama's RMSNorm runs in float32 even in a float64 model,
    and its backward rounds the opening's gradient summed over rows once instead of row by row (measured 1e-7;
    cutting the gradient path through the repeated cache moves them by 0.9)."""
    model, tokenizer = _model(tiny_dir, tmp_path)
    batch = _batch(tokenizer, facts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert shared_prefix.worth_sharing(ids, mask) and mask.sum(-1).min() < mask.sum(-1).max()
    weights = torch.linspace(-1, 1, model.config.hidden_size, dtype=torch.float64)
    real = mask.bool()

    def run(shared: bool):
        model.zero_grad()
        if shared:
            hidden = shared_prefix.last_hidden(model, ids, mask)
        else:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        (hidden[real] * weights).pow(2).sum().backward()  # a loss on every real position, the opening included
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return hidden.detach(), grads

    (once, once_grads), (whole, whole_grads) = run(True), run(False)
    assert once.shape == whole.shape
    assert torch.allclose(once[real], whole[real], rtol=0, atol=1e-12)
    assert once_grads.keys() == whole_grads.keys() and len(once_grads) > 0
    for name in whole_grads:
        assert whole_grads[name].abs().max() > 0, name
        error = (once_grads[name] - whole_grads[name]).abs().max() / whole_grads[name].abs().max()
        assert error < 1e-5, (name, error.item())
    assert shared_prefix.check(model, ids, mask) == ""


def test_the_check_refuses_a_dropout_in_training_mode(tiny_dir, facts, tmp_path, share_short):
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, target_modules="all-linear", task_type="CAUSAL_LM")
    model, tokenizer = _model(tiny_dir, tmp_path, torch.float32, lora)
    batch = _batch(tokenizer, facts)
    state = torch.random.get_rng_state()
    assert "moves the hidden state" in shared_prefix.check(model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(state, torch.random.get_rng_state())  # the check does not shift the training run
    assert shared_prefix.check(model.eval(), batch["input_ids"], batch["attention_mask"]) == ""


def _trained(tiny_dir, facts, tmp_path, **overrides):
    base, tokenizer = load_model(tiny_dir)
    torch.manual_seed(0)
    model = build_trainable(base.double(), default_lora_config(), gradient_checkpointing=overrides.pop("checkpointing", False))
    config = UndialConfig(output_dir=str(tmp_path / "ckpt"), max_steps=4, per_device_train_batch_size=3,
                          learning_rate=1e-2, disable_tqdm=True, logging_steps=100, seed=5, retain_weight=1.0,
                          retain_loss="kl", **overrides)
    rows = read_examples([dict(f) for f in facts[4:10]])
    dataset = build_dataset(tokenizer, rows, read_examples(facts[12:16], "retain"), max_length=64)
    trainer = UndialTrainer(model=model, args=config, train_dataset=dataset,
                            data_collator=Collator(tokenizer.pad_token_id))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_with_the_opening_run_once_equals_one_pass(tiny_dir, facts, tmp_path, share_short, calls, monkeypatch):
    once = _trained(tiny_dir, facts, tmp_path / "once")
    # the check's one call, then the forget and the retain (KL) batch of each of 4 steps, all with their opening once
    assert len(calls) == 1 + 2 * 4 and min(calls) >= 2, calls
    monkeypatch.setattr(shared_prefix, "MIN_SHARED", 10_000)
    whole = _trained(tiny_dir, facts, tmp_path / "whole")
    assert once.keys() == whole.keys()
    # float64: in float32 the two summation orders differ at 1e-7 and Adam's first steps, dividing by the gradient's
    # size, lift that to 1e-2 on the weights whose gradient is near 0 (measured: 0.9% after 4 steps; 1.6e-5 here)
    assert max(((once[k] - whole[k]).abs().max() / whole[k].abs().max()).item() for k in once) <= 1e-4
    assert max(v.abs().max().item() for k, v in once.items() if "lora_B" in k) > 1e-3, "nothing trained"


def test_gradient_checkpointing_runs_each_batch_as_one_pass(tiny_dir, facts, tmp_path, share_short, calls):
    _trained(tiny_dir, facts, tmp_path, checkpointing=True)
    assert calls == [], "the shared path was taken under gradient checkpointing"
