"""A frozen stack trains as ONE concatenated adapter: same teacher as the separate adapters, fewer LoRA pairs.

The separate adapters, as `attach` serves them, are the reference: the fused stack's logits must equal
theirs (float32, 1e-5), for adapters of different ranks, scalings (rsLoRA) and target modules.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapters
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from undial_peft.training.adapters import (
    FUSED,
    NEW,
    adapter_state,
    build_trainable,
    default_lora_config,
    frozen_adapters,
    load_stack,
)

TOLERANCE = 1e-5
MIXED = [
    LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    LoraConfig(r=2, lora_alpha=7, target_modules=["o_proj"]),
]


@pytest.fixture(scope="module")
def mixed_stack(tiny_dir, tmp_path_factory):
    return random_adapters(tiny_dir, tmp_path_factory.mktemp("concat"), MIXED)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, T, V)


def _ids(model) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))


def test_fused_stack_is_one_frozen_adapter_with_the_separate_stacks_logits(tiny_dir, mixed_stack):
    served = load_stack(AutoModelForCausalLM.from_pretrained(tiny_dir), mixed_stack).eval()
    ids = _ids(served)
    want = _logits(served, ids)
    base_only = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), ids)
    assert (want - base_only).abs().max() > 1e-2  # the stack moves the logits: equality below means something

    model = build_trainable(AutoModelForCausalLM.from_pretrained(tiny_dir), default_lora_config(), mixed_stack).eval()
    assert frozen_adapters(model) == [FUSED]
    with adapter_state(model, active=[FUSED]):
        teacher = _logits(model, ids)
    student = _logits(model, ids)  # FUSED + the fresh NEW (B = 0): the teacher again
    assert (teacher - want).abs().max() < TOLERANCE
    assert (student - want).abs().max() < TOLERANCE
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(f".{NEW}." in name for name in trainable)
    assert model.peft_config[FUSED].r == 4 + 8  # q_proj, v_proj: 4 + 8 (the largest sum); o_proj 8 + 2, zero-padded


def test_fusing_can_be_turned_off_and_two_adapters_are_fused_too(tiny_dir, mixed_stack):
    separate = build_trainable(AutoModelForCausalLM.from_pretrained(tiny_dir), default_lora_config(), mixed_stack,
                               fuse_stack=False)
    assert frozen_adapters(separate) == ["stack_0", "stack_1", "stack_2"]
    two = build_trainable(AutoModelForCausalLM.from_pretrained(tiny_dir), default_lora_config(), mixed_stack[:2])
    one = build_trainable(AutoModelForCausalLM.from_pretrained(tiny_dir), default_lora_config(), mixed_stack[:1])
    assert frozen_adapters(two) == [FUSED] and frozen_adapters(one) == ["stack_0"]  # one adapter: nothing to fuse


def test_a_stack_that_cannot_be_concatenated_stays_separate(tiny_dir, tmp_path):
    dora = random_adapters(tiny_dir, tmp_path, [LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]),
                                                LoraConfig(r=4, target_modules=["q_proj"])])
    served = load_stack(AutoModelForCausalLM.from_pretrained(tiny_dir), dora).eval()
    model = build_trainable(AutoModelForCausalLM.from_pretrained(tiny_dir), default_lora_config(), dora).eval()
    assert frozen_adapters(model) == ["stack_0", "stack_1"]
    ids = _ids(served)
    with adapter_state(model, active=frozen_adapters(model)):
        assert (_logits(model, ids) - _logits(served, ids)).abs().max() < TOLERANCE


def test_a_stack_over_a_4bit_base_fuses_to_the_same_teacher(tiny_dir, mixed_stack):
    # `forget --4bit` with a stack: the fused adapter sits on bitsandbytes' Linear4bit layers.
    pytest.importorskip("bitsandbytes")
    from undial_peft.models import load_model

    served = load_stack(load_model(tiny_dir, load_in_4bit=True)[0], mixed_stack).eval()
    model = build_trainable(load_model(tiny_dir, load_in_4bit=True)[0], default_lora_config(), mixed_stack).eval()
    assert frozen_adapters(model) == [FUSED]
    ids = _ids(served).to(served.device)
    with adapter_state(model, active=[FUSED]):
        assert (_logits(model, ids) - _logits(served, ids)).abs().max() < TOLERANCE  # measured 2.5e-7; the stack moves them 0.8
