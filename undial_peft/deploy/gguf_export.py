"""Export forget adapters as GGUF LoRA adapters for llama.cpp (``--lora``, llama-server ``/lora-adapters``).

llama.cpp's rules, as its loader (``src/llama-adapter.cpp``) and converter (``convert_lora_to_gguf.py``)
apply them:
- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32),
  and ``general.architecture`` equal to the base model's;
- per adapted weight two tensors ``<base tensor name>.lora_a`` (numpy shape (r, in)) and ``.lora_b``
  ((out, r)), named after the base GGUF's tensors (``blk.3.attn_q.weight.lora_a``);
- at run time llama.cpp adds ``alpha / r * B @ (A @ x)`` with r read from each ``lora_b``;
- tensor names come from the ``gguf`` package's own name map (``gguf.get_tensor_name_map``, the
  table llama.cpp's converters use), for the architectures in `CONVERSIONS`;
- the llama converter stores q_proj / k_proj with their rows permuted (each head's two rotary halves
  interleaved), so the same permutation applies to the rows of B; the other mapped converters store
  linear weights as they are (phi3's fused qkv_proj / gate_up_proj become attn_qkv / ffn_up).

Two forms for a stack: one file (rank concatenation, exact) or one file per request (llama.cpp sums
the adapters it is given). See the README for which to choose.

>>> export_gguf("default", ["adapters/req-000", "adapters/req-001"], "adapters/all.gguf")  # doctest: +SKIP
[PosixPath('adapters/all.gguf')]
>>> export_gguf("default", ["adapters/req-000", "adapters/req-001"], "adapters/gguf", per_request=True)  # doctest: +SKIP
[PosixPath('adapters/gguf/00-req-000.gguf'), PosixPath('adapters/gguf/01-req-001.gguf')]
"""

from __future__ import annotations

import functools
import json
import logging
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PreTrainedModel

from undial_peft.deploy.manifest import parent_entry
from undial_peft.deploy.ollama import modelfile_path, write_modelfile
from undial_peft.deploy.stack import attach
from undial_peft.errors import UndialExportError
from undial_peft.models import fingerprint, local_path
from undial_peft.training.adapters import stack_name
from undial_peft.training.concat import concatenated_deltas
from undial_peft.utils.storage import atomic_directory, atomic_file, refuse_existing

logger = logging.getLogger(__name__)

# llama.cpp architecture name -> gguf.MODEL_ARCH, from the gguf package's own table.
ARCH_BY_NAME: dict[str, gguf.MODEL_ARCH] = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
# transformers model_types whose llama.cpp architecture is not the model_type itself (minus a
# "_text" suffix): convert_hf_to_gguf.py registers MistralForCausalLM on its llama class.
MODEL_TYPE_ALIASES = {"mistral": "llama"}
# The architectures whose conversion of linear weights was read in llama.cpp's convert_hf_to_gguf.py
# (B's rows must be in the order the converter stores the base's rows), and per architecture the
# modules whose rows it reorders: module leaf -> config field holding that module's head count.
# Any architecture not listed is refused: its converter may transform weights in ways not mirrored.
CONVERSIONS: dict[gguf.MODEL_ARCH, dict[str, str]] = {
    gguf.MODEL_ARCH.LLAMA: {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"},  # undo_permute
    gguf.MODEL_ARCH.QWEN2: {},  # Qwen2Model: renames only
    gguf.MODEL_ARCH.QWEN3: {},  # Qwen3Model (a Qwen2Model): renames only
    gguf.MODEL_ARCH.GEMMA2: {},  # Gemma2Model: norms + 1, nothing on linear layers
    gguf.MODEL_ARCH.GEMMA3: {},  # Gemma3Model: norms + 1, embedding rows cut to the vocabulary
    gguf.MODEL_ARCH.PHI3: {},  # Phi3MiniModel: fused qkv_proj / gate_up_proj stored as they are
}


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


def gguf_architecture(config: Any) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a transformers config, refused unless its conversion is mapped.

    The model_type names it (``gemma3_text`` -> ``gemma3``, ``mistral`` -> ``llama`` as llama.cpp's
    converter registers it), looked up in the gguf package's architecture names.

    >>> from transformers import Gemma3TextConfig
    >>> gguf_architecture(Gemma3TextConfig()).name
    'GEMMA3'
    """
    model_type = str(getattr(config, "model_type", None))
    return _mapped(ARCH_BY_NAME.get(MODEL_TYPE_ALIASES.get(model_type, model_type.removesuffix("_text"))),
                   f"model_type {model_type!r}")


def _mapped(arch: gguf.MODEL_ARCH | None, what: str) -> gguf.MODEL_ARCH:
    mapped = ", ".join(sorted(gguf.MODEL_ARCH_NAMES[a] for a in CONVERSIONS))
    fix = ("Export a peft adapter (stack export without --format gguf) and convert it with llama.cpp's "
           "convert_lora_to_gguf.py.")
    if arch is None:
        raise UndialExportError(f"the gguf package names no llama.cpp architecture for {what}; GGUF export maps {mapped}. {fix}")
    if arch not in CONVERSIONS:
        raise UndialExportError(f"GGUF export maps {mapped}, not {gguf.MODEL_ARCH_NAMES[arch]!r} ({what}): how "
                                f"llama.cpp's converter stores its weights is not mirrored here. {fix}")
    return arch


def gguf_file_architecture(path: str | Path) -> gguf.MODEL_ARCH:
    """The mapped architecture of a GGUF model file, read from its header only.

    ``gguf.GGUFReader`` (and transformers' config loader) parse every key first, the vocabulary
    included: 15-20 s for Gemma-3's 262k tokens. ``general.architecture`` comes first in files
    written by llama.cpp's converters, so this stops there.

    >>> gguf_file_architecture("gemma-3-270m-q4_k_m.gguf").name  # doctest: +SKIP
    'GEMMA3'
    """
    return _mapped(ARCH_BY_NAME.get(_header_string(Path(path), gguf.Keys.General.ARCHITECTURE)),
                   f"{Path(path).name}'s general.architecture")


# struct format of each fixed-size GGUF value type (strings and arrays are read by length).
_SCALARS = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
            gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
            gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
            gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d"}


def _header_string(path: Path, key: str) -> str | None:
    """The string value of ``key`` in a GGUF file's key/value section, reading no further than it."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UndialExportError(f"{path.name} is not a GGUF file.")
        version = handle.read(4)
        order = "<" if struct.unpack("<I", version)[0] < 0x10000 else ">"  # big-endian files swap the version

        def read(fmt: str) -> Any:
            return struct.unpack(order + fmt, handle.read(struct.calcsize(fmt)))[0]

        def skip(kind: int) -> None:
            if kind == gguf.GGUFValueType.STRING:
                handle.seek(read("Q"), 1)
            elif kind == gguf.GGUFValueType.ARRAY:
                item, count = read("I"), read("Q")
                if item in _SCALARS:
                    handle.seek(count * struct.calcsize(_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                handle.seek(struct.calcsize(_SCALARS[gguf.GGUFValueType(kind)]), 1)

        _, n_keys = read("Q"), read("Q")  # tensor count, key/value count
        for _ in range(n_keys):
            name = handle.read(read("Q")).decode("utf-8", "replace")
            kind = read("I")
            if name == key and kind == gguf.GGUFValueType.STRING:
                return handle.read(read("Q")).decode("utf-8")
            skip(kind)
    return None


@functools.lru_cache(maxsize=8)
def _name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def _text_config(config: Any) -> Any:
    """The text model's config: a multimodal config (Gemma3Config) nests it; a text config is its own."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def gguf_tensor_name(module_path: str, config: Any) -> str:
    """The base GGUF tensor adapted by the HF module ``module_path`` (e.g. ``blk.3.attn_q.weight``).

    >>> from transformers import Phi3Config
    >>> gguf_tensor_name("model.layers.1.mlp.gate_up_proj", Phi3Config(num_hidden_layers=2))
    'blk.1.ffn_up.weight'
    """
    arch = gguf_architecture(config)
    name_map = _name_map(arch, _text_config(config).num_hidden_layers)
    # Multimodal wrappers nest the text model under "language_model" (Gemma3ForConditionalGeneration:
    # model.language_model.layers.N); llama.cpp's converter drops that part of the name.
    hf_name = module_path.replace("language_model.", "")
    name = name_map.get_name(hf_name + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise UndialExportError(f"{module_path}: no llama.cpp {gguf.MODEL_ARCH_NAMES[arch]} tensor corresponds to this "
                                "module; retrain without it in target_modules.")
    return name


def gguf_lora_tensors(
    blocks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: Any
) -> tuple[dict[str, np.ndarray], float]:
    """GGUF tensors (name -> float32 array) and ``adapter.lora.alpha`` for per-module LoRA blocks.

    ``blocks`` maps HF module paths to (A, B) with every scaling already folded into A, so the
    module's delta is B @ A (what `concat.concatenated_deltas` returns). llama.cpp multiplies by
    alpha / r_t, r_t being the module's own rank, so A is written as A * r_t / alpha with one
    alpha for the file (the largest rank: scale 1 wherever the rank is full).
    """
    reordered = CONVERSIONS[gguf_architecture(config)]
    text = _text_config(config)
    alpha = float(max(a.shape[0] for a, _ in blocks.values()))
    tensors: dict[str, np.ndarray] = {}
    for path, (a, b) in blocks.items():
        if path.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head"):
            raise UndialExportError(f"{path}: LoRA on the embeddings or the LM head is not exported to GGUF; "
                                  "train with target_modules naming linear layers only (the default 'all-linear').")
        leaf = path.rsplit(".", 1)[-1]
        if leaf in reordered:
            b = b[llama_row_order(b.shape[0], getattr(text, reordered[leaf]))]  # (out, r), rows in GGUF order
        name = gguf_tensor_name(path, config)
        rank = a.shape[0]
        tensors[name + ".lora_a"] = (a.float() * (rank / alpha)).numpy()  # (r, in): ggml ne = [in, r]
        tensors[name + ".lora_b"] = b.float().contiguous().numpy()  # (out, r): ggml ne = [r, out]
    return tensors, alpha


def check_against_base(tensors: Mapping[str, np.ndarray], base_gguf: str | Path, architecture: str | None = None) -> None:
    """Refuse tensors that llama.cpp would refuse on this base: another architecture, unknown names
    or wrong shapes.

    Base GGUF shapes are ggml ``ne`` (reversed numpy order): a weight of HF shape (out, in) has
    ne = [in, out], and needs A with ne[0] = in and B with ne[1] = out.

    >>> check_against_base(tensors, "gemma-3-270m-q4_k_m.gguf", "gemma3")  # doctest: +SKIP
    """
    reader = gguf.GGUFReader(base_gguf)
    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    base_arch = field.contents() if field is not None else None
    if architecture is not None and base_arch != architecture:
        # llama.cpp refuses an adapter whose general.architecture differs from the model's.
        raise UndialExportError(f"the adapter is for {architecture!r} but {Path(base_gguf).name} is {base_arch!r}; "
                                "export against the base the adapters were trained on (--model).")
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


def base_architecture(
    model: str | Path | PreTrainedModel, base_gguf: str | Path | None = None
) -> gguf.MODEL_ARCH | None:
    """The base's llama.cpp architecture, refused unless mapped, read without loading any weight.

    A GGUF base (``base_gguf``, or ``model`` naming one) answers from its header, a loaded model
    from its config, anything else from its config file (``AutoConfig``). None for a GGUF file
    that is not there: loading the model reports that, with its fix.

    >>> base_architecture("gemma3-270m").name  # doctest: +SKIP
    'GEMMA3'
    """
    if isinstance(model, PreTrainedModel):
        return gguf_architecture(model.config)
    gguf_file = base_gguf or base_gguf_path(model)
    if gguf_file is not None and Path(gguf_file).is_file():
        return gguf_file_architecture(gguf_file)
    if gguf_file is not None:
        return None
    return gguf_architecture(AutoConfig.from_pretrained(str(local_path(model))))


def _ollama_base(model: str | Path | PreTrainedModel, base_gguf: str | Path | None) -> str:
    """What a Modelfile's FROM names: the base GGUF file, a local model directory (absolute), else the name."""
    gguf_file = base_gguf or base_gguf_path(model)
    if gguf_file is not None:
        return str(Path(gguf_file).resolve())
    if isinstance(model, PreTrainedModel):
        return str(model.name_or_path)
    path = local_path(model)
    return str(path.resolve()) if path.exists() else str(model)


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

    A single file also gets an Ollama recipe beside it, ``<output stem>.Modelfile`` (`write_modelfile`:
    ``FROM`` the base, ``ADAPTER`` the file). Per-request exports get none: Ollama takes one
    adapter per model, so serve those with llama.cpp, or export one file.
    """
    if not per_request:
        if Path(output).suffix != ".gguf":
            raise UndialExportError(f"{output}: a single-file export needs a .gguf file name (or use --per-request DIR).")
        refuse_existing(Path(output), overwrite)  # both files, before the load
        refuse_existing(modelfile_path(output), overwrite)
    # Refuse an unmapped architecture in seconds, not after loading the model (68 s for Gemma-3-270M).
    base_architecture(model, base_gguf)
    ollama_base = _ollama_base(model, base_gguf)
    attached = attach(model, stack, tokenizer=tokenizer, force=force)
    try:
        base = attached.get_base_model()
        names = [stack_name(i) for i in range(len(stack))]
        groups = [[name] for name in names] if per_request else [names]
        sources = [[stack[i]] for i in range(len(stack))] if per_request else [list(stack)]
        files = [_gguf_file(attached, group, base.config) for group in groups]
        architecture = gguf.MODEL_ARCH_NAMES[gguf_architecture(base.config)]
        base_gguf = base_gguf or base_gguf_path(model)
        for tensors, _ in files:
            if base_gguf is not None:
                check_against_base(tensors, base_gguf, architecture)
        base_print = fingerprint(base)
    finally:
        if isinstance(model, PreTrainedModel):
            attached.unload()  # hand the caller's model back without LoRA layers

    def metadata(paths: list[str | Path]) -> dict[str, str]:
        return {"undial.stack": json.dumps([parent_entry(p) for p in paths]), "undial.base_fingerprint": base_print}

    if not per_request:
        (tensors, alpha), = files
        path = write_gguf_lora(tensors, alpha, output, metadata=metadata(sources[0]), architecture=architecture,
                               overwrite=overwrite)
        write_modelfile(path, ollama_base, overwrite=overwrite)
        return [path]
    logger.info("no Ollama Modelfile for a per-request export: Ollama applies one adapter per model "
                "(export one file for it)")
    written = []
    with atomic_directory(output, overwrite=overwrite) as staging:
        for index, ((tensors, alpha), paths) in enumerate(zip(files, sources)):
            ident = parent_entry(paths[0])["id"]
            name = f"{index:02d}-{ident}.gguf"
            write_gguf_lora(tensors, alpha, staging / name, metadata=metadata(paths), architecture=architecture)
            written.append(Path(output) / name)
    return written


def _gguf_file(attached: Any, names: Sequence[str], config: Any) -> tuple[dict[str, np.ndarray], float]:
    blocks, _ = concatenated_deltas(attached, names)
    return gguf_lora_tensors(blocks, config)


__all__ = ["CONVERSIONS", "UndialExportError", "base_architecture", "check_against_base", "export_gguf",
           "gguf_architecture", "gguf_file_architecture", "gguf_lora_tensors", "gguf_tensor_name", "llama_row_order", "modelfile_path",
           "write_gguf_lora", "write_modelfile"]
