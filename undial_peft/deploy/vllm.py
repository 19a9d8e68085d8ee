"""Rules of engines that apply ONE LoRA adapter per request (vLLM; TGI and SGLang load the same
PEFT format), checked on an adapter directory because they cannot run here.

From vLLM's own code (``vllm/config`` LoRAConfig, ``vllm/lora/peft_helper.py`` PEFTHelper,
``vllm/lora/models.py`` LoRAModel.from_local_checkpoint):
- ``--max-lora-rank`` is one of `VLLM_MAX_RANKS` (default 16) and the adapter's ``r`` must not
  exceed it;
- one scaling for all modules: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). PEFTHelper keeps
  only the fields it knows, so ``rank_pattern`` / ``alpha_pattern`` are silently dropped and every
  module's tensors must have rank ``r``;
- no ``modules_to_save``, no DoRA (``use_dora``), ``bias == "none"`` and no LoRA bias tensors
  (needs the engine's bias support);
- every tensor belongs to a module whose last name is one the model supports (``q_proj`` ...
  ``down_proj`` for Llama); embedding / LM-head LoRA is not accepted by default.

>>> check_vllm("adapters/all")  # doctest: +SKIP
[]
>>> vllm_max_lora_rank(24)
32
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path

from safetensors import safe_open

from undial_peft.deploy.manifest import CONFIG, WEIGHTS
from undial_peft.errors import UndialExportError

VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
# The linear layers vLLM's Llama-family models accept LoRA on (q/k/v and gate/up are packed there).
LLAMA_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts for an adapter of rank ``rank``."""
    for allowed in VLLM_MAX_RANKS:
        if rank <= allowed:
            return allowed
    raise UndialExportError(f"rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_MAX_RANKS[-1]}; export with --max-rank.")


def check_vllm(
    adapter_dir: str | Path,
    max_lora_rank: int | None = None,
    supported_modules: Collection[str] = LLAMA_LORA_MODULES,
) -> list[str]:
    """Violations of vLLM's single-adapter rules (see the module docstring); empty when it loads.

    Args:
        adapter_dir: a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
        max_lora_rank: the server's ``--max-lora-rank``; None checks against the largest allowed.
        supported_modules: module names the served model takes LoRA on (default: Llama's).
    """
    directory = Path(adapter_dir)
    config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    problems = []
    rank = int(config.get("r", 0))
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one vLLM accepts {VLLM_MAX_RANKS}")
    limit = max_lora_rank if max_lora_rank is not None else VLLM_MAX_RANKS[-1]
    if rank > limit:
        problems.append(f"rank: r={rank} exceeds max_lora_rank {limit}")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            problems.append(f"{field}: vLLM ignores per-module ranks/alphas (one scaling lora_alpha/r for all modules)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save: {config['modules_to_save']} (full module copies) are not supported")
    if config.get("use_dora"):
        problems.append("use_dora: DoRA is not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias: only bias='none' without LoRA bias tensors loads on a default server")
    problems += _tensor_problems(directory / WEIGHTS, rank, supported_modules)
    return problems


def _tensor_problems(weights: Path, rank: int, supported: Collection[str]) -> list[str]:
    """Tensor-level rules: known key layout, supported module names, every module at rank r."""
    unexpected, bad_rank, unknown = set(), set(), []
    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():
            match = _KEY.match(key)
            if match is None:
                unknown.append(key)  # e.g. lora_magnitude_vector (DoRA) or lora_B bias
                continue
            module, part = match["module"], match["part"]
            if module.rsplit(".", 1)[-1] not in supported or "embedding" in part:
                unexpected.add(module)
            shape = handle.get_slice(key).get_shape()
            if shape[0 if part.endswith("A") else 1] != rank:
                bad_rank.add(module)
    problems = []
    if unknown:
        problems.append(f"tensors: {len(unknown)} keys are not LoRA A/B weights (first: {unknown[0]})")
    if unexpected:
        problems.append(f"target modules: {sorted(unexpected)[:3]}... ({len(unexpected)}) are not among {sorted(supported)}")
    if bad_rank:
        problems.append(f"rank: {len(bad_rank)} modules have tensors whose rank is not r={rank} (first: {sorted(bad_rank)[0]})")
    return problems
