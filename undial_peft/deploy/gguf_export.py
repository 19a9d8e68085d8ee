"""Export forget adapters as GGUF LoRA adapters for llama.cpp (``--lora``, llama-server ``/lora-adapters``).

llama.cpp's rules, as its loader (``src/llama-adapter.cpp``) and converter (``convert_lora_to_gguf.py``)
apply them:
- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32),
  and ``general.architecture`` equal to the base model's;
- per adapted weight two tensors ``<base tensor name>.lora_a`` (numpy shape (r, in)) and ``.lora_b``
  ((out, r)), named after the base GGUF's tensors (``blk.3.attn_q.weight.lora_a``);
- at run time llama.cpp adds ``alpha / r * B @ (A @ x)`` with r read from each ``lora_b``;
- the llama converter stores q_proj / k_proj with their rows permuted (each head's two rotary halves
  interleaved), so the same permutation applies to the rows of B.

Two forms for a stack: one file (rank concatenation, exact) or one file per request (llama.cpp sums
the adapters it is given). See the README for which to choose.

>>> export_gguf("default", ["adapters/req-000", "adapters/req-001"], "adapters/all.gguf")  # doctest: +SKIP
[PosixPath('adapters/all.gguf')]
>>> export_gguf("default", ["adapters/req-000", "adapters/req-001"], "adapters/gguf", per_request=True)  # doctest: +SKIP
[PosixPath('adapters/gguf/00-req-000.gguf'), PosixPath('adapters/gguf/01-req-001.gguf')]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from undial_peft.deploy.manifest import parent_entry
from undial_peft.deploy.stack import attach, concatenated_deltas
from undial_peft.errors import UndialExportError
from undial_peft.models import fingerprint, local_path
from undial_peft.training.adapters import stack_name
from undial_peft.utils.storage import atomic_directory, atomic_file

# transformers model_type -> llama.cpp architecture, for the architectures whose tensor names and
# row order we map; anything else is refused rather than exported with guessed names.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
# Modules whose rows the llama converter permutes, and the config field giving their head count.
PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


def llama_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row index map of the llama converter's q/k permutation: GGUF row i is HF row ``order[i]``.

    HF stores each head's rows as [first rotary half, second half]; llama.cpp's rope pairs
    neighbouring rows, so the converter interleaves the halves (head h, row j of half k ->
    GGUF row h*d + 2j + k).

    >>> llama_row_order(8, 2).tolist()
    [0, 2, 1, 3, 4, 6, 5, 7]
    """
    if rows % (2 * n_head):
        raise UndialExportError(f"{rows} rows do not split into {n_head} heads of two rotary halves.")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def gguf_tensor_name(module_path: str, config: Any) -> str:
    """The base GGUF tensor adapted by the HF module ``module_path`` (e.g. ``blk.3.attn_q.weight``)."""
    arch = _architecture(config)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    name = name_map.get_name(module_path + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise UndialExportError(f"{module_path}: no llama.cpp tensor corresponds to this module; retrain without it "
                              "in target_modules.")
    return name


def _architecture(config: Any) -> gguf.MODEL_ARCH:
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise UndialExportError(
            f"GGUF export maps the llama architecture only, not {config.model_type!r}. Export a peft adapter "
            "(stack export without --format gguf) and convert it with llama.cpp's convert_lora_to_gguf.py."
        )
    return arch


def gguf_lora_tensors(
    blocks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: Any
) -> tuple[dict[str, np.ndarray], float]:
    """GGUF tensors (name -> float32 array) and ``adapter.lora.alpha`` for per-module LoRA blocks.

    ``blocks`` maps HF module paths to (A, B) with every scaling already folded into A, so the
    module's delta is B @ A (what `stack.concatenated_deltas` returns). llama.cpp multiplies by
    alpha / r_t, r_t being the module's own rank, so A is written as A * r_t / alpha with one
    alpha for the file (the largest rank: scale 1 wherever the rank is full).
    """
    _architecture(config)
    alpha = float(max(a.shape[0] for a, _ in blocks.values()))
    tensors: dict[str, np.ndarray] = {}
    for path, (a, b) in blocks.items():
        if path.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head"):
            raise UndialExportError(f"{path}: LoRA on the embeddings or the LM head is not exported to GGUF; "
                                  "train with target_modules naming linear layers only (the default 'all-linear').")
        leaf = path.rsplit(".", 1)[-1]
        if leaf in PERMUTED:
            b = b[llama_row_order(b.shape[0], getattr(config, PERMUTED[leaf]))]  # (out, r), rows in GGUF order
        name = gguf_tensor_name(path, config)
        rank = a.shape[0]
        tensors[name + ".lora_a"] = (a.float() * (rank / alpha)).numpy()  # (r, in): ggml ne = [in, r]
        tensors[name + ".lora_b"] = b.float().contiguous().numpy()  # (out, r): ggml ne = [r, out]
    return tensors, alpha


def check_against_base(tensors: Mapping[str, np.ndarray], base_gguf: str | Path) -> None:
    """Refuse tensors that llama.cpp would refuse on this base: unknown names or wrong shapes.

    Base GGUF shapes are ggml ``ne`` (reversed numpy order): a weight of HF shape (out, in) has
    ne = [in, out], and needs A with ne[0] = in and B with ne[1] = out.
    """
    reader = gguf.GGUFReader(base_gguf)
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        b = tensors[base + ".lora_b"]
        if base not in shapes:
            raise UndialExportError(f"{base} is not a tensor of {Path(base_gguf).name}; export against the base the "
                                  "adapters were trained on (--model).")
        if shapes[base][:2] != [a.shape[1], b.shape[0]]:
            raise UndialExportError(f"{base}: the adapter is {b.shape[0]}x{a.shape[1]} but the base tensor is "
                                  f"{shapes[base][1]}x{shapes[base][0]}; export against the right base (--model).")


def write_gguf_lora(
    tensors: Mapping[str, np.ndarray], alpha: float, path: str | Path, *, metadata: Mapping[str, str] | None = None,
    architecture: str = "llama", overwrite: bool = False,
) -> Path:
    """Write one GGUF LoRA file atomically (a temporary file beside it, then a rename).

    ``metadata`` adds string key/values (provenance: ids and hashes, never data).
    """
    path = Path(path)
    with atomic_file(path, overwrite=overwrite) as temporary:
        writer = gguf.GGUFWriter(temporary, arch=architecture)  # writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(path.stem)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        for name, array in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def base_gguf_path(model: str | Path | PreTrainedModel) -> Path | None:
    """The base GGUF file to check names and shapes against, when the base was given as one."""
    if isinstance(model, PreTrainedModel):
        return None
    path = local_path(model)
    return path if path.suffix == ".gguf" else None


def export_gguf(
    model: str | Path | PreTrainedModel,
    stack: Sequence[str | Path],
    output: str | Path,
    *,
    per_request: bool = False,
    tokenizer: Any = None,
    base_gguf: str | Path | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write the stack as llama.cpp GGUF LoRA adapters; returns the files written.

    ``per_request=False``: ``output`` is one ``.gguf`` file whose delta is the stack's sum (rank
    concatenation). ``per_request=True``: ``output`` is a new directory with one file per adapter,
    ``NN-<id>.gguf``, to pass together (``--lora a.gguf --lora b.gguf``). The stack is verified like
    `attach` does (base fingerprint, parent chain); a loaded ``model`` is handed back unwrapped.
    Tensor names and shapes are checked against ``base_gguf`` (default: ``model`` when it names a
    GGUF file, as "default" does).
    """
    attached = attach(model, stack, tokenizer=tokenizer, force=force)
    try:
        base = attached.get_base_model()
        names = [stack_name(i) for i in range(len(stack))]
        groups = [[name] for name in names] if per_request else [names]
        sources = [[stack[i]] for i in range(len(stack))] if per_request else [list(stack)]
        files = [_gguf_file(attached, group, base.config) for group in groups]
        base_gguf = base_gguf or base_gguf_path(model)
        for tensors, _ in files:
            if base_gguf is not None:
                check_against_base(tensors, base_gguf)
        base_print = fingerprint(base)
    finally:
        if isinstance(model, PreTrainedModel):
            attached.unload()  # hand the caller's model back without LoRA layers

    def metadata(paths: list[str | Path]) -> dict[str, str]:
        return {"undial.stack": json.dumps([parent_entry(p) for p in paths]), "undial.base_fingerprint": base_print}

    if not per_request:
        if Path(output).suffix != ".gguf":
            raise UndialExportError(f"{output}: a single-file export needs a .gguf file name (or use --per-request DIR).")
        (tensors, alpha), = files
        return [write_gguf_lora(tensors, alpha, output, metadata=metadata(sources[0]), overwrite=overwrite)]
    written = []
    with atomic_directory(output, overwrite=overwrite) as staging:
        for index, ((tensors, alpha), paths) in enumerate(zip(files, sources)):
            ident = parent_entry(paths[0])["id"]
            name = f"{index:02d}-{ident}.gguf"
            write_gguf_lora(tensors, alpha, staging / name, metadata=metadata(paths))
            written.append(Path(output) / name)
    return written


def _gguf_file(attached: Any, names: Sequence[str], config: Any) -> tuple[dict[str, np.ndarray], float]:
    blocks, _ = concatenated_deltas(attached, names)
    return gguf_lora_tensors(blocks, config)


__all__ = ["UndialExportError", "check_against_base", "export_gguf", "gguf_lora_tensors", "gguf_tensor_name",
           "llama_row_order", "write_gguf_lora"]
