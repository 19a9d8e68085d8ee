"""Several LoRA adapters as ONE: concatenate their ranks, which sums their deltas exactly.

Used twice: `deploy.stack.export_stack` writes a stack as one adapter, and `adapters.build_trainable`
runs the frozen stack below a new request as one adapter (`fuse`), so a step over ten earlier requests
runs one LoRA pair per module instead of ten.

>>> blocks, rank = concatenated_deltas(peft_model, ["stack_0", "stack_1"])  # doctest: +SKIP
>>> add_concatenated(peft_model, "fused", blocks, rank)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

from undial_peft.errors import UndialStackError

Blocks = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A_cat (R, in), B_cat (out, R))


def lora_pair(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of adapter ``name`` in one layer, or None where that adapter does not touch it.

    Shapes: Linear A (r, in), B (out, r); Embedding A (r, vocab), B (dim, r). Either way the layer
    adds ``scaling * B @ A`` to its weight (transposed for embeddings), so rank blocks concatenate
    along A's dim 0 and B's dim 1.
    """
    if name in layer.lora_A:
        pair = (layer.lora_A[name].weight, layer.lora_B[name].weight)
    elif name in layer.lora_embedding_A:
        pair = (layer.lora_embedding_A[name], layer.lora_embedding_B[name])
    else:
        return None
    if pair[0].ndim != 2 or pair[1].ndim != 2:
        raise UndialStackError(f"adapter {name}: only Linear and Embedding LoRA layers can be concatenated (found a conv layer).")
    if getattr(layer, "lora_variant", {}).get(name) is not None or layer.use_dora.get(name) or layer.lora_bias.get(name):
        raise UndialStackError(
            f"adapter {name}: DoRA / LoRA-bias / other LoRA variants are not a plain sum B @ A and cannot be "
            "exported as one LoRA; merge the stack into the base instead (stack merge)."
        )
    return pair


def concatenated_deltas(model: PeftModel, names: Sequence[str]) -> tuple[Blocks, int]:
    """Per LoRA module path: (A_cat, B_cat) with the scalings folded into A; and the common rank R.

    For one module touched by adapters i = 1..k (ranks r_i, scalings s_i = alpha_i / r_i, or
    alpha_i / sqrt(r_i) with rsLoRA, per module when rank/alpha patterns are used):

        A_cat = cat_i(s_i * A_i, dim=0)   # (sum r_i, in)
        B_cat = cat_i(B_i, dim=1)         # (out, sum r_i)
        B_cat @ A_cat = sum_i s_i * B_i @ A_i   (the stack's delta; exact but for float rounding)

    Every module gets the same rank R = max over modules of sum r_i (= the sum of the ranks for
    adapters that target the same modules); `add_concatenated` zero-pads a module with a smaller
    sum, which adds nothing, and uses lora_alpha = R, i.e. scaling 1, and no rsLoRA.

    Why not peft's ``add_weighted_adapter(combination_type="cat")`` (peft 0.21.2)? It computes the
    same blocks and, for adapters with identical plain-LoRA settings (what `forget` writes by
    default), gives the same logits (max diff 2.8e-7 on the tiny model, as ours). But it copies
    adapter 0's config for the result: with rsLoRA the result's scaling is R / sqrt(R), not 1
    (logits off by 0.65 for an rsLoRA r=4 + LoRA r=8 stack), and a one-adapter stack silently
    takes its "linear" path instead. Writing the blocks ourselves keeps every case exact.
    """
    for name in names:
        if getattr(model.peft_config[name], "modules_to_save", None):
            raise UndialStackError(f"adapter {name}: modules_to_save (full module copies) cannot be exported as a LoRA.")
    blocks: Blocks = {}
    for path, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        a_parts, b_parts = [], []
        for name in names:
            pair = lora_pair(layer, name)
            if pair is not None:
                a_parts.append(pair[0].detach().float() * layer.scaling[name])  # (r_i, in)
                b_parts.append(pair[1].detach().float())  # (out, r_i)
        if a_parts:
            blocks[path] = (torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1))  # (sum r_i, in), (out, sum r_i)
    if not blocks:
        raise UndialStackError("the stack has no LoRA layers to export.")
    rank = max(a.shape[0] for a, _ in blocks.values())
    return blocks, rank


def target_modules(model: torch.nn.Module, paths: Sequence[str]) -> list[str]:
    """Short leaf names (``q_proj``) when they select exactly ``paths`` in ``model``, else the full paths.

    peft matches a list entry against a module name by equality or by ``"." + entry`` suffix, so
    a full path selects exactly that module.
    """
    leaves = {path.rsplit(".", 1)[-1] for path in paths}
    selected = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == set(paths) else sorted(paths)


def add_concatenated(model: PeftModel, name: str, blocks: Blocks, rank: int, **config: object) -> LoraConfig:
    """Add adapter ``name`` of rank ``rank`` holding ``blocks`` (zero-padded past each block's rank).

    ``config`` goes to the LoraConfig (task_type, base_model_name_or_path, inference_mode). The
    adapter's scaling is 1 (lora_alpha = r): the blocks carry the scalings. Returns the config.
    """
    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                      target_modules=target_modules(model.base_model.model, list(blocks)), **config)
    model.add_adapter(name, lora)
    for path, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or path not in blocks:
            continue
        a_cat, b_cat = blocks[path]
        a_new, b_new = lora_pair(layer, name) or (None, None)
        if a_new is None:
            raise UndialStackError(f"{path}: the concatenated adapter did not reach this module (peft target matching).")
        with torch.no_grad():
            a_new.zero_()  # (R, in); rows past sum r_i stay zero
            b_new.zero_()  # (out, R)
            a_new[: a_cat.shape[0]] = a_cat.to(a_new.dtype)
            b_new[:, : b_cat.shape[1]] = b_cat.to(b_new.dtype)
    return lora


def fuse(model: PeftModel, names: Sequence[str], into: str) -> None:
    """Replace adapters ``names`` of ``model`` by ONE adapter ``into`` with the same summed delta.

    The deltas are concatenated in float32, so a fused stack's logits equal the separate stack's up to
    float rounding: SmolLM2-135M with nine random r=8 adapters that move its logits by up to 5.3, max
    difference 4.6e-5 (the sums run in another order); `tests/test_concat.py` checks 1e-5 on the tiny
    model. A forward then runs one LoRA pair per module, not len(names).
    """
    blocks, rank = concatenated_deltas(model, names)
    source = model.peft_config[names[0]]
    add_concatenated(model, into, blocks, rank, task_type=source.task_type,
                     base_model_name_or_path=source.base_model_name_or_path, inference_mode=True)
    model.base_model.set_adapter(into, inference_mode=True)  # peft warns when an active adapter is deleted
    for name in names:
        model.delete_adapter(name)
