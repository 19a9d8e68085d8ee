"""Training on a tiny memorised model: what changes, what must not, and whether it forgets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_varied_facts
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from undial_peft import UndialConfig
from undial_peft.data.encoding import Collator, build_dataset
from undial_peft.data.readers import read_examples
from undial_peft.deploy.stack import attach
from undial_peft.errors import UndialTrainingError
from undial_peft.models import load_model
from undial_peft.training.adapters import NEW, adapter_state, build_trainable, default_lora_config
from undial_peft.training.forget import forget, mean_probability
from undial_peft.training.trainer import UndialTrainer


def _trainer(model, tokenizer, rows, tmp_path, **overrides) -> UndialTrainer:
    config = UndialConfig(output_dir=str(tmp_path / "ckpt"), disable_tqdm=True, **{"max_steps": 3, **overrides})
    dataset = build_dataset(tokenizer, read_examples(rows), max_length=64)
    return UndialTrainer(model=model, args=config, train_dataset=dataset, data_collator=Collator(tokenizer.pad_token_id))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_only_the_new_adapter_changes(tiny_dir, facts, tmp_path):
    base, tokenizer = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config())
    before = _snapshot(model)
    _trainer(model, tokenizer, facts[:4], tmp_path, learning_rate=1e-2).train()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "nothing trained"
    assert all(f".{NEW}." in name and "lora_" in name for name in changed), sorted(changed)[:5]
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)


def test_fresh_adapter_student_equals_teacher_and_beta_zero_gives_zero_gradient(tiny_dir, facts, tmp_path):
    base, tokenizer = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config())
    trainer = _trainer(model, tokenizer, facts[:4], tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad(), adapter_state(model, active=[]):
        teacher = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(teacher, student)  # lora_B starts at zero
    for beta, zero in ((0.0, True), (10.0, False)):
        trainer.args.beta = beta  # bypasses the config's beta > 0 check on purpose
        model.zero_grad()
        trainer.compute_loss(model, batch).backward()
        largest = max(p.grad.abs().max().item() for p in model.parameters() if p.requires_grad)
        assert (largest < 1e-7) is zero, (beta, largest)


def test_adapter_state_restores_on_exception(tiny_dir):
    base, _ = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config())
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError), adapter_state(model, active=[]):
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("boom")
    assert list(model.base_model.active_adapters) == [NEW]
    assert grads == {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_fused_and_full_logits_paths_agree(tiny_dir, facts, tmp_path, chunk):
    base, tokenizer = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config())
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # make student != teacher
    trainer = _trainer(model, tokenizer, facts[:4], tmp_path, loss_chunk_size=chunk)
    batch = next(iter(trainer.get_train_dataloader()))
    reference = _trainer(model, tokenizer, facts[:4], tmp_path, loss_chunk_size=0).compute_loss(model, batch)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(reference.item(), rel=1e-5)


def test_gradient_checkpointing_still_trains_lora(tiny_dir, facts, tmp_path):
    base, tokenizer = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config(), gradient_checkpointing=True)
    _trainer(model, tokenizer, facts[:4], tmp_path, max_steps=2, learning_rate=1e-2).train()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B stayed zero: inputs did not require grad"


def test_non_finite_loss_stops_training(tiny_dir, facts, tmp_path):
    base, tokenizer = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config())
    trainer = _trainer(model, tokenizer, facts[:4], tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.args.beta = float("nan")
    with pytest.raises(UndialTrainingError, match="non-finite"):
        trainer.compute_loss(model, batch)


def test_forget_lowers_forget_probability_and_keeps_retain(tiny_dir, facts, tmp_path):
    """Bounds: forget-set probability from ~0.99 to < 0.4; retained facts stay > 0.6."""
    config = UndialConfig(num_train_epochs=30, learning_rate=1e-3, per_device_train_batch_size=4,
                          retain_weight=1.0, disable_tqdm=True, logging_steps=100,
                          max_steps=-1, until_ratio=None, max_retain_drop=None, auto_key=False)  # fixed length
    base_before = _snapshot(AutoModelForCausalLM.from_pretrained(tiny_dir))
    path = forget(tiny_dir, facts[:4], tmp_path / "req-0", config=config, retain=facts[4:])
    assert _snapshot(AutoModelForCausalLM.from_pretrained(tiny_dir)).keys() == base_before.keys()
    model = attach(tiny_dir, [path])
    tokenizer = model.tokenizer
    forget_p = mean_probability(model, tokenizer, read_examples(facts[:4]), config)
    retain_p = mean_probability(model, tokenizer, read_examples(facts[12:]), config)
    base_model, _ = load_model(tiny_dir)
    assert mean_probability(base_model, tokenizer, read_examples(facts[:4]), config) > 0.95
    assert all(torch.equal(v, base_before[k]) for k, v in base_model.state_dict().items())
    assert forget_p < 0.4, forget_p
    assert retain_p > 0.6, retain_p


@pytest.mark.parametrize("method", ["undial", "npo"])
def test_two_accumulation_steps_equal_one_double_batch(tiny_dir, tmp_path, method):
    # Answers of 1, 2 and 4 sentences: the two micro-batches hold different numbers of answer
    # tokens, so normalising each micro-batch by its own count would not give the big batch's step.
    rows = make_varied_facts(8)
    settings = {"num_train_epochs": 3, "learning_rate": 1e-3, "max_length": 64, "seed": 0, "disable_tqdm": True,
                "method": method, "max_steps": -1, "until_ratio": None}  # fixed length: 3 steps each
    one = forget(tiny_dir, rows, tmp_path / "one", config=UndialConfig(per_device_train_batch_size=8, **settings))
    two = forget(tiny_dir, rows, tmp_path / "two",
                 config=UndialConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, **settings))
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    trained = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert trained > 1e-3, "the adapter did not train"
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, f"max |W(8 x 1) - W(4 x 2)| = {diff:.2e} after 3 steps (a step moves weights up to 1e-3)"


def test_cached_adapter_switch_matches_peft_set_adapter(tiny_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from undial_peft.training.adapters import _activate, _activate_with_peft

    base, _ = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config())
    model.add_adapter("other", default_lora_config())
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    ids = torch.tensor([[3, 4, 5, 6]])

    def state():
        layers = [tuple(m.active_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)]
        return layers, {n: p.requires_grad for n, p in model.named_parameters()}, tuple(model.base_model.active_adapters)

    outputs = {}
    for active in ([], [NEW], ["other"], ["other", NEW]):
        for trainable in ((), [NEW], ["other"]):
            _activate_with_peft(model, active, trainable)
            expected = state()
            _activate(model, [NEW], ())  # leave that state, then switch the cached way
            _activate(model, active, trainable)
            assert state() == expected, (active, trainable)
        with torch.no_grad():
            outputs[tuple(active)] = model(input_ids=ids).logits
    assert len({round(o.sum().item(), 4) for o in outputs.values()}) == 4, "each active set computes its own output"


def test_cached_adapter_switch_sees_an_adapter_deleted_and_added_again(tiny_dir):
    # Same adapter names before and after, new weights: a switch cached by name alone would set
    # requires_grad on the deleted weights and leave the new ones frozen.
    from undial_peft.training.adapters import adapter_state

    base, _ = load_model(tiny_dir)
    model = build_trainable(base, default_lora_config())
    for _ in range(2):
        model.add_adapter("again", default_lora_config())
        with adapter_state(model, [NEW, "again"], trainable=["again"]):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable and all(".again." in n for n in trainable), sorted(trainable)[:3]
        model.delete_adapter("again")
