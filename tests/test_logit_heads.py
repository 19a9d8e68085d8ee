"""Heads whose logits are not lm_head(last hidden): the trainer measures it and uses full logits.

The fused UNDIAL loss and the hidden-state caches rebuild logits as lm_head(hidden). Granite divides
them by ``logits_scaling`` and Gemma-2 soft-caps them, so there the trainer must fall back to the
live teacher and full logits; a plain head keeps the fused path and the cache, whatever stray
fields its config carries.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

from undial_peft import UndialConfig
from undial_peft.data.encoding import Collator, build_dataset
from undial_peft.data.readers import read_examples
from undial_peft.models import load_model
from undial_peft.tiny import word_tokenizer
from undial_peft.training import loss as L
from undial_peft.training.adapters import adapter_state, build_trainable, default_lora_config
from undial_peft.training.trainer import UndialTrainer

MISMATCH = "lm_head(hidden) != logits"
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False, "use_cache": False}


def _tokenizer(facts):
    return word_tokenizer([f["question"] + " " + f["answer"] for f in facts])


def _granite(tokenizer) -> GraniteForCausalLM:
    """Granite divides lm_head(hidden) by logits_scaling."""
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, logits_scaling=8.0, **SIZES)
    return _confident(GraniteForCausalLM(config))


def _gemma2(tokenizer) -> Gemma2ForCausalLM:
    """Gemma-2 soft-caps logits at 30 * tanh(z / 30)."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, head_dim=16,
                          final_logit_softcapping=30.0, **SIZES)
    return _confident(Gemma2ForCausalLM(config))


def _confident(model: torch.nn.Module) -> torch.nn.Module:
    """Scale a random head to logits of the size a trained model gives (~10-40, not ~0.1).

    Near 0 every softmax is almost uniform and tanh is linear, so neither scaling nor soft-capping
    would change a loss or the logits measurably.
    """
    model.lm_head.weight.data.mul_(100.0)
    return model


def _trainer(model, tokenizer, facts, tmp_path, retain: bool = False, **overrides) -> UndialTrainer:
    torch.manual_seed(0)
    peft_model = build_trainable(model, default_lora_config())
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)  # student != teacher
    extra = {"retain_weight": 1.0, "retain_loss": "kl"} if retain else {}
    config = UndialConfig(output_dir=str(tmp_path / "ckpt"), disable_tqdm=True, max_steps=2, logging_steps=100,
                          per_device_train_batch_size=4, **{**extra, **overrides})
    retain_rows = read_examples(facts[12:16], "retain") if retain else None
    dataset = build_dataset(tokenizer, read_examples(facts[:4]), retain_rows, max_length=64)
    return UndialTrainer(model=peft_model, args=config, train_dataset=dataset,
                         data_collator=Collator(tokenizer.pad_token_id))


def _reference_loss(trainer: UndialTrainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNDIAL loss from the model's own full logits, student and teacher (new adapter off)."""
    model, inputs = trainer.model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), adapter_state(model, active=[]):
        teacher = model(**inputs).logits  # (B, T, V)
    student = model(**inputs).logits  # (B, T, V)
    return L.undial_loss(student, teacher, batch["labels"], trainer.args.beta)


def _mismatch_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if MISMATCH in r.getMessage()]


def test_granite_logits_scaling_falls_back_to_full_logits(facts, tmp_path, caplog):
    tokenizer = _tokenizer(facts)
    trainer = _trainer(_granite(tokenizer), tokenizer, facts, tmp_path, retain=True)
    batch = next(iter(trainer.get_train_dataloader()))
    with caplog.at_level(logging.INFO, logger="undial_peft.training.trainer"):
        forget = trainer._forget_loss(trainer.model, batch, None)
        reference = _reference_loss(trainer, batch)
        # lm_head(hidden) is 8x the logits: a fused loss would be that of a much sharper teacher
        assert forget.item() == pytest.approx(reference.item(), rel=1e-5)
        assert not trainer._fused()
        cache = trainer._build_teacher_cache()
        trainer.current_gradient_accumulation_steps = 1  # set by train(); the retain loss reads it
        trainer.compute_loss(trainer.model, batch)
    assert cache is None or (cache.hidden is None and cache.retain_hidden is None)
    logs = _mismatch_logs(caplog)
    assert len(logs) == 1, logs  # one reason, once per trainer
    assert "ratio 8" in logs[0] and "using the live teacher and full logits" in logs[0]


def test_gemma2_soft_capping_falls_back_to_full_logits(facts, tmp_path, caplog):
    tokenizer = _tokenizer(facts)
    trainer = _trainer(_gemma2(tokenizer), tokenizer, facts, tmp_path, retain=True)
    batch = next(iter(trainer.get_train_dataloader()))
    with caplog.at_level(logging.INFO, logger="undial_peft.training.trainer"):
        cache = trainer._build_teacher_cache()
        assert not trainer._fused()
        forget = trainer._forget_loss(trainer.model, batch, None)
    assert cache is None or (cache.hidden is None and cache.retain_hidden is None)
    assert forget.item() == pytest.approx(_reference_loss(trainer, batch).item(), rel=1e-5)
    assert len(_mismatch_logs(caplog)) == 1


def test_plain_head_keeps_the_fused_loss_and_the_cache_whatever_its_config_says(tiny_dir, facts, tmp_path, caplog):
    base, tokenizer = load_model(tiny_dir)
    # Fields a Llama ignores: only what the head computes decides, not what the config names.
    base.config.final_logit_softcapping = 30.0
    base.config.logit_scale = 0.5
    trainer = _trainer(base, tokenizer, facts, tmp_path, retain=True)
    model = trainer.model
    forwards = []
    model.base_model.model.model.register_forward_hook(lambda *_: forwards.append(1))
    model.eval()
    rng, active = torch.get_rng_state(), list(model.base_model.active_adapters)
    with caplog.at_level(logging.INFO, logger="undial_peft.training.trainer"):
        assert trainer._fused()
        # the check ran once (one forward of one row) and left no trace: RNG, mode and adapters as they were
        assert len(forwards) == 1
        assert torch.equal(torch.get_rng_state(), rng) and not model.training
        assert list(model.base_model.active_adapters) == active
        cache = trainer._build_teacher_cache()
        filled = len(forwards)
        assert trainer._fused() and trainer._fused() and len(forwards) == filled
    assert cache is not None and cache.hidden is not None and cache.retain_hidden is not None
    assert not _mismatch_logs(caplog) and "live teacher" not in caplog.text
    batch = next(iter(trainer.get_train_dataloader()))
    fused = trainer._forget_loss(model, batch, None)
    assert fused.item() == pytest.approx(_reference_loss(trainer, batch).item(), rel=1e-5)
