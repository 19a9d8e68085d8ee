"""Deploy a stack of forget adapters: attach it, list it, export it as one adapter, or merge it.

Reverting a request means attaching the stack without it. The model then forgets less, and
requests trained after the removed one had it in their teacher, so they were trained to make
the deployed model forget on top of it: their own facts stay forgotten, the removed request's
facts come back (partly, where they overlap with later requests). Such a stack breaks the
recorded parent chain, so `attach` needs ``force=True`` for it.

>>> model = attach("default", ["adapters/req-000", "adapters/req-001"])  # doctest: +SKIP
>>> export_stack("default", ["adapters/req-000", "adapters/req-001"], "adapters/all")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from undial_peft.deploy.manifest import (
    CONFIG,
    WEIGHTS,
    Manifest,
    check_files,
    parent_entry,
    read_manifest,
    recorded_base,
    save_adapter,
    verify_stack,
)
from undial_peft.deploy.svd import compress_blocks
from undial_peft.deploy.vllm import VLLM_MAX_RANKS
from undial_peft.errors import UndialExportError, UndialStackError
from undial_peft.models import MERGED_KEY, base_identity, load_model, source_name
from undial_peft.training.adapters import load_stack, stack_name
from undial_peft.training.concat import add_concatenated, concatenated_deltas
from undial_peft.utils.storage import atomic_directory, file_sha256, write_json

EXPORTED = "exported"


def attach(
    model: str | Path | PreTrainedModel,
    stack: Sequence[str | Path],
    *,
    tokenizer: Any = None,
    force: bool = False,
    load_in_4bit: bool = False,
) -> PeftModel:
    """A PeftModel with every adapter of ``stack`` active and frozen, in eval mode.

    Verifies the stack first (files, weight hashes, base fingerprint, parent chain); a soft
    mismatch raises `UndialStackError` unless ``force=True``. The tokenizer is at
    ``model.tokenizer`` for convenience. A loaded ``model`` is wrapped in place (peft injects
    LoRA layers into it; its weights are not changed).
    """
    attached, _ = _attach(model, stack, tokenizer=tokenizer, force=force, load_in_4bit=load_in_4bit)
    return attached


def _attach(
    model: str | Path | PreTrainedModel | None,
    stack: Sequence[str | Path],
    *,
    tokenizer: Any = None,
    force: bool = False,
    load_in_4bit: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[PeftModel, dict[str, Any]]:
    """`attach`, also returning the base's `base_identity`; ``model=None`` loads the base the manifests name."""
    if not stack:
        raise UndialStackError("attach needs at least one adapter directory.")
    base, tokenizer = load_model(recorded_base(stack) if model is None else model, tokenizer=tokenizer,
                                 load_in_4bit=load_in_4bit, dtype=dtype)
    identity = base_identity(base)
    verify_stack(stack, identity, force=force)
    attached = load_stack(base, stack).eval()
    attached.tokenizer = tokenizer
    return attached, identity


# --- listing ----------------------------------------------------------------------------------


def _status(directory: str | Path, manifest: dict[str, Any] | None, earlier: list[dict[str, str]]) -> str:
    """'ok', or what is wrong with this adapter at this place in the listed order (base not checked)."""
    if manifest is None:
        return "no manifest"
    problems = []
    if manifest.get("weights_sha256") != file_sha256(Path(directory) / WEIGHTS):
        problems.append("sha256 mismatch")
    parents = [{"id": p["id"], "sha256": p["sha256"]} for p in manifest.get("parents", [])]
    if parents != earlier:
        problems.append("parents differ")
    return ", ".join(problems) or "ok"


def list_stack(stack: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One summary row per adapter, in the given order.

    Columns: id, parents (ids from the manifest), rank, size on disk, method, beta, date, the
    recorded forget-set probability before/after training, and ``status``: "ok", or why this
    adapter would fail `attach` at this position ("sha256 mismatch", "parents differ"; the base
    model is not checked here). A directory that is not an adapter raises `UndialStackError`.
    """
    rows = []
    earlier: list[dict[str, str]] = []
    for directory in stack:
        check_files(directory)
        manifest = read_manifest(directory)
        known = manifest or {}
        metrics = known.get("metrics", {})
        config = json.loads((Path(directory) / CONFIG).read_text(encoding="utf-8"))
        rows.append({
            "id": known.get("id", Path(directory).name),
            "parents": ",".join(p["id"] for p in known.get("parents", [])) or "-",
            "rank": config.get("r"),
            "size_kb": round((Path(directory) / WEIGHTS).stat().st_size / 1024, 1),
            "method": known.get("method", "?"),
            "beta": known.get("hyperparameters", {}).get("beta"),
            "created": known.get("created", "?"),
            "p_before": metrics.get("forget_probability_before"),
            "p_after": metrics.get("forget_probability_after"),
            "status": _status(directory, manifest, earlier),
        })
        earlier.append(parent_entry(directory))
    return rows


# --- export: one adapter equal to the stack ---------------------------------------------------


def _padded(rank: int) -> int:
    """``rank`` rounded up to a ``--max-lora-rank`` vLLM accepts (unchanged past its largest)."""
    return next((allowed for allowed in VLLM_MAX_RANKS if allowed >= rank), rank)


def export_stack(
    model: str | Path | PreTrainedModel | None,
    stack: Sequence[str | Path],
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    force: bool = False,
    overwrite: bool = False,
    max_rank: int | None = None,
    pad_for_vllm: bool = True,
) -> Path:
    """Write ONE standard peft LoRA adapter whose delta is the sum of the stack's deltas.

    The rank-concatenation (see `concatenated_deltas`) is the only exact way: rank = sum of the stack's
    ranks. With ``max_rank`` R, each module whose stacked rank exceeds R is replaced by the best
    rank-R approximation of its delta (`svd.truncated_svd`; exact where the delta's rank fits);
    the energy kept per module goes into the manifest (``serving.energy_kept``). With
    ``pad_for_vllm`` the rank is zero-padded up to the next ``--max-lora-rank`` vLLM accepts
    (`vllm.VLLM_MAX_RANKS`; zero rows add nothing), and the manifest records that flag.
    The result loads with plain ``PeftModel.from_pretrained(base, output_dir)``. Beside it:
    ``undial.json`` (base fingerprint, no parents, the source stack's ids and hashes, so `attach`
    verifies it too and refuses it stacked on its own sources) and ``stack.json`` (the source
    manifests). ``model=None`` uses the base the manifests name. A loaded ``model`` is handed
    back unwrapped.
    """
    attached, identity = _attach(model, stack, tokenizer=tokenizer, force=force)
    try:
        names = [stack_name(i) for i in range(len(stack))]
        blocks, rank = concatenated_deltas(attached, names)
        energy = None
        if max_rank is not None:
            blocks, energy = compress_blocks(blocks, max_rank)
            rank = max(a.shape[0] for a, _ in blocks.values())
        rank = _padded(rank) if pad_for_vllm else rank
        source = attached.peft_config[names[0]]
        config = add_concatenated(attached, EXPORTED, blocks, rank, task_type=source.task_type,
                                  base_model_name_or_path=source.base_model_name_or_path, inference_mode=True)
        targets = sorted(config.target_modules)  # peft holds them as a set
        entries = [parent_entry(path) for path in stack]
        manifest = Manifest(
            id=Path(output_dir).name,
            method="export",
            base={**identity, "source": _source(model, stack)},
            stack=entries,
            hyperparameters={"lora": {"r": rank, "lora_alpha": rank, "target_modules": targets}},
            serving={"vllm_max_lora_rank": _padded(rank), "rank_budget": max_rank, "energy_kept": energy},
            description=("One adapter equal to the stack " if energy is None else
                         f"The stack compressed to rank <= {max_rank}: ") + " + ".join(e["id"] for e in entries) + ".",
        )
        provenance = {"stack.json": _provenance(stack, "export")}
        return save_adapter(attached, EXPORTED, output_dir, manifest, extra_json=provenance, overwrite=overwrite)
    finally:
        if isinstance(model, PreTrainedModel):
            attached.unload()  # hand the caller's model back without LoRA layers


# --- merge: a full model with the stack in its weights ----------------------------------------


def merge_stack(
    model: str | Path | PreTrainedModel | None,
    stack: Sequence[str | Path],
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    force: bool = False,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a full model (safetensors, sharded when large) with the stack merged into its weights.

    The merge is done in ``dtype`` on an unquantised base; a stack trained over a 4-bit base is
    merged the same way (its fingerprint matches the unquantised base). Merging is permanent for
    the copy written: the forgetting no longer depends on an adapter staying attached. The merged
    model records the stack in its config (``undial_merged_stack``), so its fingerprint differs
    from the base's and the same adapters cannot be attached to it again by mistake.
    ``model=None`` uses the base the manifests name. A loaded ``model`` is left untouched: the
    merge runs on a deep copy (twice its memory, briefly).
    """
    if isinstance(model, PreTrainedModel):
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
            raise UndialExportError("merge into an unquantised base (float32/bfloat16); load the base without 4-bit.")
        model = copy.deepcopy(model)  # merge_and_unload writes into the weights in place
    attached, _ = _attach(model, stack, tokenizer=tokenizer, force=force, dtype=dtype)
    tokenizer = attached.tokenizer
    merged = attached.merge_and_unload()
    merged.config.use_cache = True  # load_model turns the KV cache off for training; generation wants it
    earlier = merged.config.to_dict().get(MERGED_KEY) or []
    setattr(merged.config, MERGED_KEY, [*earlier, *(parent_entry(path) for path in stack)])
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        merged.save_pretrained(str(staging), safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(str(staging))
        write_json(staging / "stack.json", _provenance(stack, "merge"))
    return Path(output_dir)


def _source(model: str | Path | PreTrainedModel | None, stack: Sequence[str | Path]) -> str | None:
    """How a derived manifest names its base: the ``model`` argument, or the stack's recorded base."""
    return recorded_base(stack) if model is None else source_name(model)


def _provenance(stack: Sequence[str | Path], how: str) -> dict[str, Any]:
    """What a derived artefact was made from: the manifests and weight hashes of the stack."""
    return {
        "how": how,
        "adapters": [
            {"manifest": read_manifest(path), "weights_sha256": file_sha256(Path(path) / WEIGHTS)} for path in stack
        ],
    }


__all__ = ["attach", "concatenated_deltas", "list_stack", "export_stack", "merge_stack"]
