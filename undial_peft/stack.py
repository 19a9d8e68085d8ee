"""Deploy a stack of forget adapters: attach it, list it, export it as one adapter, or merge it.

Reverting a request means attaching the stack without it. The model then forgets less, and
requests trained after the removed one had it in their teacher, so they were trained to make
the deployed model forget on top of it: their own facts stay forgotten, the removed request's
facts come back (partly, where they overlap with later requests).

>>> model = attach("default", ["adapters/req-000", "adapters/req-001"])  # doctest: +SKIP
>>> export_stack("default", ["adapters/req-000", "adapters/req-001"], "adapters/all")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from .adapters import load_stack, stack_name
from .manifest import (
    WEIGHTS,
    atomic_directory,
    file_sha256,
    read_manifest,
    save_adapter,
    verify_stack,
    write_json,
)
from .models import fingerprint, load_model

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
    ``model.tokenizer`` for convenience.
    """
    if not stack:
        raise ValueError("attach needs at least one adapter directory.")
    base, tokenizer = load_model(model, tokenizer=tokenizer, load_in_4bit=load_in_4bit)
    verify_stack(stack, fingerprint(base), force=force)
    attached = load_stack(base, stack).eval()
    attached.tokenizer = tokenizer
    return attached


def describe(stack: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One summary row per adapter: id, parents, size, beta, date and recorded metrics."""
    rows = []
    for directory in stack:
        manifest = read_manifest(directory) or {}
        metrics = manifest.get("metrics", {})
        rows.append({
            "id": manifest.get("id", Path(directory).name),
            "parents": ",".join(p["id"] for p in manifest.get("parents", [])) or "-",
            "size_kb": round((Path(directory) / WEIGHTS).stat().st_size / 1024, 1),
            "method": manifest.get("method", "?"),
            "beta": manifest.get("hyperparameters", {}).get("beta"),
            "created": manifest.get("created", "?"),
            "p_before": metrics.get("forget_probability_before"),
            "p_after": metrics.get("forget_probability_after"),
        })
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A plain aligned text table of dict rows (same keys)."""
    if not rows:
        return "(empty)"

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    keys = list(rows[0])
    table = [keys, *([cell(row[key]) for key in keys] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in table)


def export_stack(
    model: str | Path | PreTrainedModel,
    stack: Sequence[str | Path],
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    force: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ONE standard peft LoRA adapter equal to the sum of the stack.

    Uses peft's rank-concatenating merge (``combination_type="cat"``), the only exact one: the
    delta of the result is B_cat @ A_cat = sum_i s_i * B_i @ A_i. Its rank is the sum of the
    stack's ranks. The manifests of the stack are kept in ``stack.json`` beside the adapter.
    """
    attached = attach(model, stack, tokenizer=tokenizer, force=force)
    names = [stack_name(i) for i in range(len(stack))]
    attached.add_weighted_adapter(names, [1.0] * len(names), adapter_name=EXPORTED, combination_type="cat")
    provenance = {"stack.json": _provenance(stack, "export")}
    return save_adapter(attached, EXPORTED, output_dir, extra_json=provenance, overwrite=overwrite)


def merge_stack(
    model: str | Path | PreTrainedModel,
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
    the copy written: the forgetting no longer depends on an adapter staying attached.
    """
    if isinstance(model, PreTrainedModel) and getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("merge into an unquantised base (float32/bfloat16); load the base without 4-bit.")
    base, tokenizer = load_model(model, tokenizer=tokenizer, dtype=dtype)
    verify_stack(stack, fingerprint(base), force=force)
    merged = load_stack(base, stack).merge_and_unload()
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        merged.save_pretrained(str(staging), safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(str(staging))
        write_json(staging / "stack.json", _provenance(stack, "merge"))
    return Path(output_dir)


def _provenance(stack: Sequence[str | Path], how: str) -> dict[str, Any]:
    """What a derived artefact was made from: the manifests and weight hashes of the stack."""
    return {
        "how": how,
        "adapters": [
            {"manifest": read_manifest(path), "weights_sha256": file_sha256(Path(path) / WEIGHTS)} for path in stack
        ],
    }


__all__ = ["attach", "describe", "export_stack", "format_rows", "merge_stack"]
