"""Merge a stack into a copy of the model and round-trip its weights through NF4 or int8.

Re-quantisation is the attack on a MERGED unlearned model (Zhang et al., "Catastrophic Failure
of LLM Unlearning via Quantization", 2024): the small weight changes that suppress a fact can
round away. Round-tripping every linear weight through bitsandbytes' own quantiser gives the
weights a 4-bit / 8-bit deployment computes with, on any device (CPU included), without writing
a model to disk. The LM head stays unquantised, as transformers' bitsandbytes loading keeps it.

>>> # merged = merged_copy(peft_model); requantise_(merged, "nf4")  -> number of layers rounded
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from undial_peft.errors import UndialConfigError

SCHEMES = ("nf4", "int8")
NF4_BLOCKSIZE = 64  # bitsandbytes' default block size for 4-bit weights


def merged_copy(model: Any) -> torch.nn.Module:
    """A plain model with the active adapters of ``model`` (a PeftModel) merged in; ``model`` is untouched."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise UndialConfigError("the model is already quantised: merge the stack into the unquantised base to re-quantise it.")
    return copy.deepcopy(model).merge_and_unload()


def base_copy(model: Any) -> torch.nn.Module:
    """A plain copy of the base of ``model`` (a PeftModel), adapters removed without merging."""
    return copy.deepcopy(model).unload()


def round_trip(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """``weight`` (out, in) after quantise + dequantise, in its own dtype.

    nf4: blockwise NF4 with double-quantised scales (``load_in_4bit`` with
    ``bnb_4bit_use_double_quant``, as `undial_peft.models.four_bit_config`); int8: LLM.int8's
    row-wise absmax int8 of the fp16 weight (``load_in_8bit``).

    >>> round_trip(torch.ones(4, 64), "nf4").allclose(torch.ones(4, 64))
    True
    """
    import bitsandbytes.functional as bnbf

    if scheme == "nf4":
        packed, state = bnbf.quantize_4bit(weight.float(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).to(weight.dtype)  # (out, in)
    if scheme == "int8":
        codes, scales, _ = bnbf.int8_vectorwise_quant(weight.half())  # (out, in) int8, (out,) absmax
        return bnbf.int8_vectorwise_dequant(codes, scales).to(weight.dtype)
    raise UndialConfigError(f"unknown quantisation scheme {scheme!r}; use one of {SCHEMES}.")


@torch.no_grad()
def requantise_(model: torch.nn.Module, scheme: str) -> int:
    """Round-trip every ``nn.Linear`` weight but the LM head in place; returns how many.

    >>> # requantise_(merged_copy(model), "int8")  -> 210
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.weight.copy_(round_trip(module.weight, scheme))
            count += 1
    if count == 0:
        raise UndialConfigError("no linear layer to re-quantise: is this a transformer language model?")
    return count
