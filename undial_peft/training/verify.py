"""Measure a new adapter on the model as it will be served, not only on the model it was trained on.

An adapter trained over a 4-bit (NF4) base is deployed on the full-precision base: the LoRA weights
learned to move an NF4 model, and the same weights move the full-precision model less (measured with
examples/two_models.py: SmolLM2 0.11x of the forget key probability on NF4, 0.54x served; Gemma-3-270M
0.09x and 0.28x). `served_copy` loads the base the way `attach` serves it and puts the stack and the
new adapter's weights on it; `measure_served` measures the forget rows' key probability and greedy
answers with and without the new adapter. ``forget`` records the result in the
manifest (``deployed``) and never calls a target reached that the deployed form misses.

>>> verdict({"forget_before": 0.8, "forget_after": 0.2}, until_ratio=0.2, until_prob=None)
{'target': 0.16000000000000003, 'reached': False, 'missed_by': 0.03999999999999998}
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from undial_peft.deploy import in_llama_cpp as engine
from undial_peft.deploy.gguf_export import (
    base_architecture,
    base_gguf_path,
    gguf_architecture,
    gguf_lora_tensors,
    write_gguf_lora,
)
from undial_peft.errors import UndialConfigError
from undial_peft.models import load_model
from undial_peft.training.adapters import NEW, adapter_state, build_trainable, frozen_adapters
from undial_peft.training.concat import concatenated_deltas
from undial_peft.training.silence import named_rows
from undial_peft.training.stopping import key_probabilities, stopping_target

logger = logging.getLogger(__name__)


def verdict(figures: dict[str, float], until_ratio: float | None, until_prob: float | None) -> dict[str, Any]:
    """The stopping target applied to deployed figures: the target, whether it holds, and by how much it is missed."""
    after = figures["forget_after"]
    target = stopping_target(figures["forget_before"], until_ratio, until_prob)
    if target is None:
        return {"target": None, "reached": None, "missed_by": None}
    return {"target": target, "reached": after <= target, "missed_by": max(0.0, after - target)}


def describe_deployed(figures: dict[str, Any]) -> str:
    """One line: the forget key probability as served, and whether the target holds there.

    >>> describe_deployed({"form": "full-precision base (float32)", "forget_before": 0.7, "forget_after": 0.238,
    ...                    "target": 0.14, "reached": False, "missed_by": 0.098})
    'as served (full-precision base (float32)): forget key probability 0.700 -> 0.238 (0.34x); target 0.140 MISSED by 0.098'
    >>> describe_deployed({"form": "f", "forget_before": 0.7, "forget_after": 0.07, "asked": 6, "said_before": 6,
    ...                    "said_after": 2, "reached": True, "target": 0.14})
    'as served (f): forget key probability 0.700 -> 0.070 (0.10x), greedy answers saying their key 6 -> 2 of 6; target 0.140 reached'
    """
    before, after = figures["forget_before"], figures["forget_after"]
    text = f"as served ({figures['form']}): forget key probability {before:.3f} -> {after:.3f}"
    text += f" ({after / before:.2f}x)" if before > 0 else ""
    if figures.get("asked"):
        text += f", greedy answers saying their key {figures['said_before']} -> {figures['said_after']} of {figures['asked']}"
    if figures.get("finish_steps"):
        text += f", after {figures['finish_steps']} more steps on it"
    if figures.get("reached") is True:
        text += f"; target {figures['target']:.3f} reached"
    elif figures.get("reached") is False:
        text += f"; target {figures['target']:.3f} MISSED by {figures['missed_by']:.3f}"
    return text


SERVED_FORM = "full-precision base (float32)"


def served_copy(model: str | Path, trained: torch.nn.Module, lora: LoraConfig, stack: Sequence[str | Path]) -> Any:
    """``model`` loaded as it is served (float32, as `attach` loads it), with ``stack`` below a trainable
    copy of ``trained``'s new adapter (`NEW`), e.g. one trained over a 4-bit base. A stack of two or more
    runs fused (`build_trainable`): `attach`'s separate adapters up to float rounding (4.6e-5 on logits)."""
    # save_embedding_layers=False: peft's "auto" would look the base up on the hub (see manifest.save_adapter)
    state = get_peft_model_state_dict(trained, adapter_name=NEW, save_embedding_layers=False)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    base, _ = load_model(model)
    served = build_trainable(base, lora, stack)
    set_peft_model_state_dict(served, weights, adapter_name=NEW)
    return served


def measure_served(served: torch.nn.Module, forget_rows: Sequence[dict[str, list]], tokenizer: Any,
                   one_line: bool = False, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """The forget rows on ``served`` without and with the new adapter (the stack stays on): mean key
    probability, and how many greedy answers say their key (`silence.named_rows`, of ``asked`` keyed rows).
    ``before``: an earlier result on the same served base, whose "before" figures (the stack alone) are kept."""
    earlier = frozen_adapters(served)
    figures: dict[str, Any] = {"form": SERVED_FORM}
    if before is not None:  # the stack alone has not changed: only the new adapter's side is measured again
        figures.update({k: before[k] for k in ("forget_before", "said_before", "asked")})
    for when, active in (("before", earlier), ("after", [*earlier, NEW])):
        if f"forget_{when}" in figures:
            continue
        with adapter_state(served, active=active):
            figures[f"forget_{when}"] = float(key_probabilities(served, forget_rows, tokenizer.pad_token_id).mean())
            named, figures["asked"] = named_rows(served, tokenizer, forget_rows, one_line)
            figures[f"said_{when}"] = len(named)
    return figures


def measure_llama_cpp(trained: Any, base_gguf: str | Path, forget_rows: Sequence[dict[str, list]],
                      work: str | Path) -> dict[str, Any]:
    """Mean forget key probability in llama.cpp on ``base_gguf``: with the stack, and with the stack + new adapter.

    Both forms are written as ONE GGUF LoRA file each (`export_gguf`'s tensors: the rank-concatenated
    deltas), in ``work``; the deployed model before the request is the base alone when the stack is empty.
    """
    config = trained.get_base_model().config
    architecture = gguf.MODEL_ARCH_NAMES[gguf_architecture(config)]

    def lora_file(names: list[str], path: Path) -> list[Path]:
        if not names:
            return []
        tensors, alpha = gguf_lora_tensors(concatenated_deltas(trained, names)[0], config)
        return [write_gguf_lora(tensors, alpha, path, architecture=architecture)]

    earlier = frozen_adapters(trained)
    rows = engine.rows_for_llama_cpp(forget_rows)
    before = engine.key_probabilities(base_gguf, lora_file(earlier, Path(work) / "before.gguf"), rows)
    after = engine.key_probabilities(base_gguf, lora_file([*earlier, NEW], Path(work) / "after.gguf"), rows)
    return {"form": f"llama.cpp, {Path(base_gguf).name}", "forget_before": sum(before) / len(before),
            "forget_after": sum(after) / len(after)}


def llama_cpp_base(model: Any, verify: str) -> Path | None:
    """The base GGUF that ``verify="llama.cpp"`` runs, checked up front; None without that check."""
    if verify != "llama.cpp":
        return None
    base_gguf = base_gguf_path(model)
    if base_gguf is None:
        raise UndialConfigError("--verify llama.cpp runs the base GGUF: give the model as a .gguf file or a packaged "
                                "alias (e.g. --model default), not a model directory or a loaded model.")
    reason = engine.unavailable()
    if reason is not None:
        raise UndialConfigError(f"--verify llama.cpp: {reason}.")
    base_architecture(model, base_gguf)  # an architecture the GGUF export does not map is refused here
    return base_gguf


def in_llama_cpp(
    trained: Any, base_gguf: Path, features: Sequence[dict[str, list]], config: Any,
    deployed: dict[str, Any] | None, stopper: Any,
) -> dict[str, Any]:
    """The forget rows measured in llama.cpp (the stack and the new adapter as one GGUF LoRA file), with the
    stopping target applied; added to ``deployed`` under ``llama_cpp``. A miss is reported, not trained on:
    llama.cpp cannot train."""
    with tempfile.TemporaryDirectory(prefix="undial-llama-cpp-") as work:
        figures = measure_llama_cpp(trained, base_gguf, features, work)
    figures.update(verdict(figures, config.until_ratio, config.until_prob))
    (logger.warning if figures["reached"] is False else logger.info)("%s", describe_deployed(figures))
    if stopper is not None and stopper.outcome:
        stopper.outcome["llama_cpp"] = figures  # the card and the CLI line read it from the outcome
    return {**(deployed or {}), "llama_cpp": figures}
