"""4-bit (bitsandbytes NF4) LoRA gradients equal those of an fp32 model holding the dequantised weights."""

from __future__ import annotations

import pytest
import torch

from undial_peft.adapters import adapter_state, build_trainable, default_lora_config
from undial_peft.data import Collator, encode, read_examples
from undial_peft.evaluate import score
from undial_peft.loss import undial_loss
from undial_peft.models import load_model

bnb = pytest.importorskip("bitsandbytes")


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    """UNDIAL loss after a teacher pass, as the trainer runs it; returns LoRA gradients by name."""
    with torch.no_grad(), adapter_state(model, active=[]):
        teacher = model(**batch).logits
    model.zero_grad()
    undial_loss(model(**batch).logits, teacher, batch["labels"], beta=10.0).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_four_bit_lora_gradients_match_dequantised_fp32(tiny_dir, facts):
    quantised, tokenizer = load_model(tiny_dir, load_in_4bit=True)
    layers = [m for m in quantised.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "nothing was quantised"
    dense, _ = load_model(tiny_dir)
    dense_modules = dict(dense.named_modules())
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense_modules[name].weight.data.copy_(weight.float())
    models = [build_trainable(m, default_lora_config()) for m in (quantised, dense)]
    torch.manual_seed(0)
    shared = {name: torch.randn_like(p) * 0.05 for name, p in models[1].named_parameters() if p.requires_grad}
    for model in models:
        for name, param in model.named_parameters():
            if name in shared:
                param.data.copy_(shared[name])  # same non-zero LoRA weights in both
    rows = read_examples(facts[:4])
    # An eval-mode no-grad forward first: on AVX512-BF16 CPUs this is what corrupts later gradients.
    score(models[0], tokenizer, rows)
    batch = Collator(tokenizer.pad_token_id)([encode(tokenizer, row, 64) for row in rows])
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    got, want = (_lora_grads(model.train(), batch) for model in models)
    assert got.keys() == want.keys()
    worst = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)
    print(f"4-bit vs dequantised fp32 LoRA gradients: worst relative error {worst:.2e} over {len(want)} tensors")
    assert worst <= 1e-4, worst
