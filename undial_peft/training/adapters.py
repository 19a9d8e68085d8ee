"""Which LoRA adapters are active and which train: one context manager owns that state.

Inside a PEFT model the earlier forget requests of a stack are named ``stack_0 .. stack_{k-1}``
and the adapter being trained is ``NEW``. The student runs with all of them active; the teacher
runs with only the stack active, i.e. the model as deployed before this request. `build_trainable`
fuses a stack of two or more into one frozen adapter ``FUSED`` (`concat.fuse`: the same summed
delta, one LoRA pair per module); `frozen_adapters` names what a model holds below ``NEW``.

>>> with adapter_state(peft_model, active=["stack_0"]):  # doctest: +SKIP
...     teacher_out = peft_model(**batch)
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import PreTrainedModel

from undial_peft.errors import UndialStackError
from undial_peft.training.concat import fuse

logger = logging.getLogger(__name__)

NEW = "forget_new"
FUSED = "stack_fused"


def stack_name(index: int) -> str:
    """The name the index-th adapter of a stack gets inside a PEFT model."""
    return f"stack_{index}"


def frozen_adapters(model: PeftModel) -> list[str]:
    """The adapters below ``NEW``: the teacher's active set (``[]`` without a stack).

    >>> frozen_adapters(build_trainable(base, default_lora_config(), ["a", "b"]))  # doctest: +SKIP
    ['stack_fused']
    """
    return [name for name in model.peft_config if name != NEW]


def _is_param_of(name: str, adapters: Collection[str]) -> bool:
    # peft names adapter parameters "...lora_A.<adapter>.weight"
    return "lora_" in name and any(f".{adapter}." in name for adapter in adapters)


def _activate_with_peft(model: PeftModel, active: Sequence[str], trainable: Collection[str]) -> None:
    # The tuner-level call takes a list; with inference_mode=True it freezes every adapter, and
    # only then do we switch on gradients for the adapters that train. (Without inference_mode
    # peft would make every active adapter trainable, earlier requests included.) It walks every
    # module of the model twice: ~67 ms per call on SmolLM2-135M.
    model.base_model.set_adapter(list(active), inference_mode=True)
    for name, param in model.named_parameters():
        if _is_param_of(name, trainable):
            param.requires_grad_(True)


@dataclass
class _Switch:
    """The LoRA layers and parameters of one PEFT model, found once, so a switch touches only them."""

    adapters: tuple[str, ...]  # the adapters present when it was built; another set means rebuild
    layers: list[BaseTunerLayer]
    params: list[torch.nn.Parameter]  # every parameter, for restoring requires_grad
    lora: list[tuple[str | None, torch.nn.Parameter]]  # (adapter name, parameter) of the LoRA weights
    probes: list[tuple[str, torch.nn.Parameter]]  # (name, parameter): one LoRA weight per adapter

    def is_current(self, model: PeftModel) -> bool:
        """Whether the model still holds these LoRA weights. Deleting an adapter and adding one of the
        same name gives the same adapter names but new weights, so names alone cannot tell."""
        if self.adapters != tuple(model.peft_config):
            return False
        try:
            return all(model.get_parameter(name) is param for name, param in self.probes)
        except AttributeError:  # the probed weight is gone
            return False


_SWITCHES: weakref.WeakKeyDictionary[PeftModel, _Switch] = weakref.WeakKeyDictionary()


def _switch(model: PeftModel) -> _Switch | None:
    """The cached switch of ``model``, or None where peft's own walk is needed (merged layers,
    auxiliary wrappers such as modules_to_save, variants with frozen sub-weights)."""
    adapters = tuple(model.peft_config)
    cached = _SWITCHES.get(model)
    if cached is None or not cached.is_current(model):
        modules = list(model.modules())
        if any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules):
            return None
        layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        named = list(model.named_parameters())
        owned = [(next((a for a in adapters if _is_param_of(n, [a])), None), n, p) for n, p in named if "lora_" in n]
        probes: dict[str, tuple[str, torch.nn.Parameter]] = {}
        for adapter, name, param in owned:  # the first LoRA weight of each adapter
            if adapter is not None:
                probes.setdefault(adapter, (name, param))
        cached = _SWITCHES[model] = _Switch(adapters, layers, [p for _, p in named], [(a, p) for a, _, p in owned],
                                            list(probes.values()))
    if any(layer.merged or getattr(layer, "frozen_peft_weight_names", None) for layer in cached.layers):
        return None
    return cached


def _activate(model: PeftModel, active: Sequence[str], trainable: Collection[str]) -> None:
    """Exactly ``active`` adapters on; only the LoRA weights of ``trainable`` require grad.

    Same end state as peft's ``set_adapter(active, inference_mode=True)`` plus gradients on for
    ``trainable``, but it sets each LoRA layer's active list directly on layers found once.
    """
    switch = _switch(model)
    if switch is None:
        _activate_with_peft(model, active, trainable)
        return
    names = list(active)
    for layer in switch.layers:
        layer._active_adapter = names  # what BaseTunerLayer.set_adapter stores
    model.base_model.active_adapter = names
    for adapter, param in switch.lora:
        param.requires_grad_(adapter in trainable)


@contextlib.contextmanager
def adapter_state(model: PeftModel, active: Sequence[str], trainable: Collection[str] = ()) -> Iterator[PeftModel]:
    """Run with exactly ``active`` adapters on and only ``trainable`` ones requiring grad.

    The previous active set and every parameter's ``requires_grad`` are restored on exit, even
    when the body raises.
    """
    previous_active = list(model.base_model.active_adapters)
    switch = _switch(model)
    params = switch.params if switch is not None else list(model.parameters())
    previous_grad = [param.requires_grad for param in params]
    try:
        _activate(model, active, trainable)
        yield model
    finally:
        _activate(model, previous_active, trainable=())
        for param, grad in zip(params, previous_grad):
            param.requires_grad_(grad)


def default_lora_config() -> LoraConfig:
    """r=8, alpha=16 on every linear layer but the LM head; no dropout, so the fresh student equals the teacher."""
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _check_lora(lora: LoraConfig, base: PreTrainedModel) -> None:
    targets = lora.target_modules
    if targets is not None and not isinstance(targets, str) and len(targets) == 0:
        raise UndialStackError("LoraConfig.target_modules is empty: name modules to adapt, or use 'all-linear'.")
    head = base.get_output_embeddings()
    head_name = next((name for name, module in base.named_modules() if module is head), "lm_head")
    named = [targets] if isinstance(targets, str) else list(targets or [])
    if head_name in named or head_name.split(".")[-1] in named:
        raise UndialStackError(f"LoRA must not target the LM head ({head_name!r}): the teacher and student share it.")


def _freeze_dropout(model: PeftModel, adapters: Collection[str]) -> None:
    # A frozen stack adapter is part of the teacher; dropout in it would make the teacher noisy.
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for adapter in adapters:
                if adapter in dropouts:
                    dropouts[adapter] = torch.nn.Identity()


def load_stack(base: PreTrainedModel, stack: Sequence[str | Path]) -> PeftModel:
    """Wrap ``base`` with a verified stack of adapter directories, all active and frozen."""
    model = PeftModel.from_pretrained(base, str(stack[0]), adapter_name=stack_name(0), is_trainable=False)
    for index, directory in enumerate(stack[1:], start=1):
        model.load_adapter(str(directory), adapter_name=stack_name(index), is_trainable=False)
    names = [stack_name(i) for i in range(len(stack))]
    _freeze_dropout(model, names)
    _activate(model, names, trainable=())
    return model


def build_trainable(
    base: PreTrainedModel,
    lora: LoraConfig,
    stack: Sequence[str | Path] = (),
    gradient_checkpointing: bool = False,
    fuse_stack: bool = True,
) -> PeftModel:
    """A PEFT model with the (verified) stack active and frozen, plus a new trainable adapter ``NEW``.

    4-bit bases go through ``prepare_model_for_kbit_training``; with gradient checkpointing the
    input embeddings are made to require grad, without which LoRA would silently not train. With
    ``fuse_stack`` a stack of two or more runs as ONE frozen adapter (`FUSED`), the rank-concatenation
    of its adapters: same delta up to float rounding, but each forward runs one LoRA pair per module
    instead of len(stack) (SmolLM2-135M, nine earlier requests: see docs/stacks.md for the step times).
    Stacks that cannot be concatenated (DoRA, modules_to_save) stay separate.
    """
    _check_lora(lora, base)
    if getattr(base, "is_loaded_in_4bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    try:
        if stack:
            model = load_stack(base, stack)
            if fuse_stack and len(stack) > 1:
                try:
                    fuse(model, [stack_name(i) for i in range(len(stack))], into=FUSED)
                except UndialStackError as err:  # raised before anything is changed
                    logger.info("the stack runs as %d separate adapters: %s", len(stack), err)
            model.add_adapter(NEW, lora)
        else:
            model = get_peft_model(base, lora, adapter_name=NEW)
    except ValueError as err:  # peft's message for targets that match nothing
        raise UndialStackError(f"LoRA config does not fit this model: {err}") from None
    _activate(model, [*frozen_adapters(model), NEW], trainable=[NEW])
    return model
