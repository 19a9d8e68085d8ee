"""GGUF LoRA export checked structurally on the tiny Llama and on tiny random models of every mapped
architecture (no llama.cpp needed).

The delta llama.cpp will add for each module, alpha / r * B @ A read back from the file, must
equal peft's own delta of the stack (``get_delta_weight``) with q/k rows permuted the way
llama.cpp's converter stores them; the permutation is checked against a hand-written index
formula and against transformers' GGUF loader, which undoes it. Names and shapes are checked
against a base GGUF written here with llama.cpp's tensor names typed out by hand; for the other
architectures, against names typed out per architecture (and present in llama.cpp's tensor list
for that architecture) and against the HF lora_B rows, permuted for llama and mistral only.
"""

from __future__ import annotations

import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import random_adapters, write_tiny_gguf
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from undial_peft.cli import main as cli_main
from undial_peft.deploy import gguf_export
from undial_peft.deploy import stack as stack_module
from undial_peft.deploy.gguf_export import check_against_base, export_gguf, gguf_lora_tensors, llama_row_order
from undial_peft.deploy.stack import attach
from undial_peft.errors import UndialExportError
from undial_peft.tiny import word_tokenizer

# HF module -> llama.cpp tensor, typed from llama.cpp's llama tensor names (not from our name map).
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def plain_stack(tiny_dir, tmp_path_factory) -> list[Path]:
    """Two untrained adapters with random B: rsLoRA r=4 on q/k/v of layer 0, then LoRA r=8 on all linear layers."""
    configs = [
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
                   layers_to_transform=[0], layers_pattern="layers", lora_dropout=0.0),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    ]
    return random_adapters(tiny_dir, tmp_path_factory.mktemp("gguf-stack"), configs, prefix="req")


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def _gguf_deltas(path: Path) -> dict[str, np.ndarray]:
    """What llama.cpp adds per base tensor: alpha / r * B @ A, r read from B (numpy (out, r))."""
    fields, tensors = _read(path)
    alpha = fields["adapter.lora.alpha"]
    return {name[: -len(".lora_b")]: alpha / b.shape[1] * (b.astype(np.float64) @ tensors[name[:-1] + "a"])
            for name, b in tensors.items() if name.endswith(".lora_b")}


def _interleave_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order, by index: GGUF row h*d + 2j + k holds HF row h*d + k*d/2 + j."""
    d = weight.shape[0] // n_head
    out = np.empty_like(weight)
    for h in range(n_head):
        for j in range(d // 2):
            for k in range(2):
                out[h * d + 2 * j + k] = weight[h * d + k * d // 2 + j]
    return out


def _peft_deltas(tiny_dir: str, stack: list[Path]) -> tuple[dict[str, np.ndarray], object]:
    """Per llama.cpp tensor name: the stack's delta from peft's own get_delta_weight, in GGUF row order."""
    attached = attach(tiny_dir, stack)
    config = attached.get_base_model().config
    deltas = {}
    for path, layer in attached.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        delta = sum(layer.get_delta_weight(name).double() for name in layer.lora_A).numpy()  # (out, in)
        layer_index, module = path.split(".layers.")[1].split(".", 1)
        if module.endswith("q_proj"):
            delta = _interleave_rows(delta, config.num_attention_heads)
        elif module.endswith("k_proj"):
            delta = _interleave_rows(delta, config.num_key_value_heads)
        deltas[f"blk.{layer_index}.{LLAMA_NAMES[module]}.weight"] = delta
    return deltas, config


def test_gguf_file_adds_the_stack_delta_in_llama_cpp_row_order(tiny_dir, plain_stack, tmp_path):
    (path,) = export_gguf(tiny_dir, plain_stack, tmp_path / "all.gguf")
    fields, tensors = _read(path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == 12.0  # the largest rank: 4 + 8 on layer 0's q/k/v
    assert "undial.stack" in fields and "undial.base_fingerprint" in fields
    want, _ = _peft_deltas(tiny_dir, plain_stack)
    got = _gguf_deltas(path)
    assert sorted(got) == sorted(want) and len(got) == 2 * 7  # 2 layers x 7 linear modules
    assert {tensors[f"{name}.lora_b"].shape[1] for name in got} == {8, 12}  # per-module ranks, no padding
    for name in want:
        assert np.abs(got[name] - want[name]).max() < 1e-6, name
    q = "blk.0.attn_q.weight"
    # Without the permutation the q delta would differ: the check can fail.
    assert np.abs(_interleave_rows(want[q], 4) - want[q]).max() > 1e-3


def test_row_order_is_what_transformers_gguf_loader_undoes():
    rows, n_head = 32, 4
    weight = np.random.default_rng(0).normal(size=(rows, 3))
    permuted = weight[llama_row_order(rows, n_head).numpy()]
    np.testing.assert_array_equal(permuted, _interleave_rows(weight, n_head))
    restored = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_head)
    np.testing.assert_array_equal(restored, weight)


def _write_base(model: torch.nn.Module, path: Path, swap: str | None = None) -> Path:
    """A GGUF base with llama.cpp's names for the tiny model's linear weights (HF (out, in) -> ne [in, out])."""
    writer = gguf.GGUFWriter(path, arch="llama")
    for name, param in model.named_parameters():
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        layer_index, module = name.split(".layers.")[1].removesuffix(".weight").split(".", 1)
        array = param.detach().numpy()
        if swap and LLAMA_NAMES[module] == swap:
            array = array.T.copy()
        writer.add_tensor(f"blk.{layer_index}.{LLAMA_NAMES[module]}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_names_and_shapes_match_a_base_gguf_as_llama_cpp_checks(tiny_dir, plain_stack, tmp_path):
    (path,) = export_gguf(tiny_dir, plain_stack, tmp_path / "all.gguf")
    base_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base = gguf.GGUFReader(_write_base(base_model, tmp_path / "base.gguf"))
    ne = {t.name: [int(n) for n in t.shape] for t in base.tensors}
    lora = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(path).tensors}
    for name, a_ne in lora.items():
        if name.endswith(".lora_a"):
            target, b_ne = name[: -len(".lora_a")], lora[name[:-1] + "b"]
            # llama-adapter.cpp: base ne[0] == a ne[0], base ne[1] == b ne[1], a ne[1] == b ne[0] (= rank)
            assert ne[target][0] == a_ne[0] and ne[target][1] == b_ne[1] and a_ne[1] == b_ne[0], name
    _, tensors = _read(path)
    check_against_base(tensors, tmp_path / "base.gguf")
    with pytest.raises(UndialExportError, match="right base"):
        check_against_base(tensors, _write_base(base_model, tmp_path / "swapped.gguf", swap="attn_v"))
    tensors["blk.9.attn_q.weight.lora_a"] = tensors["blk.0.attn_q.weight.lora_a"]
    tensors["blk.9.attn_q.weight.lora_b"] = tensors["blk.0.attn_q.weight.lora_b"]
    with pytest.raises(UndialExportError, match="not a tensor of base.gguf"):
        check_against_base(tensors, tmp_path / "base.gguf")
    with pytest.raises(UndialExportError, match="for 'gemma3' but base.gguf is 'llama'"):
        check_against_base(tensors, tmp_path / "base.gguf", "gemma3")  # llama.cpp refuses another architecture


def test_one_file_per_request_sums_to_the_single_file(tiny_dir, plain_stack, tmp_path):
    (single,) = export_gguf(tiny_dir, plain_stack, tmp_path / "all.gguf")
    files = export_gguf(tiny_dir, plain_stack, tmp_path / "parts", per_request=True)
    assert [f.name for f in files] == ["00-req0.gguf", "01-req1.gguf"]
    total: dict[str, np.ndarray] = {}
    for path in files:
        for name, delta in _gguf_deltas(path).items():
            total[name] = total.get(name, 0) + delta
    want = _gguf_deltas(single)
    assert sorted(total) == sorted(want)
    assert max(np.abs(total[n] - want[n]).max() for n in want) < 1e-6
    assert _read(files[0])[0]["adapter.lora.alpha"] == 4.0  # rsLoRA r=4 alone: scale folded into A


def test_refusals_name_the_fix(tiny_dir, plain_stack, tmp_path):
    block = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 8), torch.zeros(8, 2))}
    with pytest.raises(UndialExportError, match="not mirrored here.*convert_lora_to_gguf"):
        gguf_lora_tensors(block, types.SimpleNamespace(model_type="gpt2", num_hidden_layers=1))  # llama.cpp has gpt2
    with pytest.raises(UndialExportError, match="no llama.cpp architecture for model_type 'nonesuch'.*convert_lora_to_gguf"):
        gguf_lora_tensors(block, types.SimpleNamespace(model_type="nonesuch", num_hidden_layers=1))
    vision = {"model.vision_tower.encoder.layers.0.self_attn.q_proj": (torch.zeros(2, 8), torch.zeros(8, 2))}
    with pytest.raises(UndialExportError, match="no llama.cpp gemma3 tensor.*target_modules"):
        gguf_lora_tensors(vision, _gemma3_multimodal())  # the text GGUF holds no vision tower
    embedding = {"model.embed_tokens": (torch.zeros(2, 50), torch.zeros(8, 2))}
    with pytest.raises(UndialExportError, match="target_modules"):
        gguf_lora_tensors(embedding, types.SimpleNamespace(model_type="llama", num_hidden_layers=1))
    with pytest.raises(UndialExportError, match=r"\.gguf file name"):
        export_gguf(tiny_dir, plain_stack, tmp_path / "all")
    target = tmp_path / "kept.gguf"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        export_gguf(tiny_dir, plain_stack, target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf"]


def test_cli_gguf_export(tiny_dir, plain_stack, tmp_path, capsys):
    stack = [str(p) for p in plain_stack]
    assert cli_main(["stack", "export", "--model", tiny_dir, "--format", "gguf", "--out", str(tmp_path / "a.gguf"), *stack]) == 0
    assert cli_main(["stack", "export", "--model", tiny_dir, "--format", "gguf", "--per-request",
                     "--out", str(tmp_path / "parts"), *stack]) == 0
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["00-req0.gguf", "01-req1.gguf"]
    assert sorted(p.name for p in tmp_path.glob("*.Modelfile")) == ["a.Modelfile"]
    assert "a.Modelfile (Ollama: ollama create NAME -f" in capsys.readouterr().out
    assert cli_main(["stack", "export", "--model", tiny_dir, "--per-request", "--out", str(tmp_path / "x"), *stack]) == 2
    assert "--format gguf" in capsys.readouterr().err


# --- every mapped architecture, on tiny random models -------------------------------------------------

# HF module -> llama.cpp tensor, typed out per architecture from llama.cpp's tensor names (not from
# the gguf name map the export uses). phi3 keeps its fused projections: one tensor each.
SPLIT_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
PHI3_NAMES = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
SIZES = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _gemma3_multimodal() -> Gemma3Config:
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3Config(text_config=Gemma3TextConfig(**SIZES, head_dim=8), vision_config=vision, mm_tokens_per_image=4)


# name: (config, llama.cpp architecture, module names, q/k rows permuted)
ARCHS = {
    "llama": (lambda: LlamaConfig(**SIZES), "llama", SPLIT_NAMES, True),
    "mistral": (lambda: MistralConfig(**SIZES), "llama", SPLIT_NAMES, True),  # llama.cpp stores Mistral as llama
    "qwen2": (lambda: Qwen2Config(**SIZES), "qwen2", SPLIT_NAMES, False),
    "qwen3": (lambda: Qwen3Config(**SIZES, head_dim=8), "qwen3", SPLIT_NAMES, False),
    "gemma2": (lambda: Gemma2Config(**SIZES, head_dim=8), "gemma2", SPLIT_NAMES, False),
    "gemma3_text": (lambda: Gemma3TextConfig(**SIZES, head_dim=8), "gemma3", SPLIT_NAMES, False),
    "gemma3": (_gemma3_multimodal, "gemma3", SPLIT_NAMES, False),
    "phi3": (lambda: Phi3Config(**SIZES), "phi3", PHI3_NAMES, False),
}


def _tiny_arch_base(config, where: Path) -> Path:
    """A random tiny model of ``config``'s architecture saved with a tokenizer (what `load_model` reads)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(where)
    word_tokenizer(["a b c d e"]).save_pretrained(where)
    return where


def _hf_module(name: str) -> tuple[int, str]:
    """(layer, module under the layer) of a decoder-layer LoRA key, the multimodal nesting dropped."""
    layer, module = name.split(".layers.", 1)[1].split(".", 1)
    return int(layer), module


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_mapped_architecture_gets_llama_cpp_names_shapes_and_row_order(arch, tmp_path):
    make_config, arch_name, names, permuted = ARCHS[arch]
    config = make_config()
    base = _tiny_arch_base(config, tmp_path / "base")
    # All linear layers of the text model (a multimodal model's vision tower has no tensor in the text GGUF).
    leaves = "|".join(sorted({m.split(".")[-1] for m in names}))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=rf"^(?!.*vision).*\.({leaves})$")
    (adapter,) = random_adapters(str(base), tmp_path, [lora], prefix="adapter")
    hf = {key: value for key, value in load_file(adapter / "adapter_model.safetensors").items() if "vision" not in key}
    (path,) = export_gguf(str(base), [adapter], tmp_path / "out.gguf")
    fields, tensors = _read(path)
    assert fields["general.architecture"] == arch_name
    templates = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch_name.upper()]]}
    assert {f"blk.{{bid}}.{tensor}" for tensor in names.values()} <= templates  # llama.cpp's arch has them
    text = config.get_text_config()
    want = {f"blk.{i}.{tensor}.weight.lora_{ab}" for i in range(text.num_hidden_layers) for tensor in names.values()
            for ab in "ab"}
    assert sorted(tensors) == sorted(want)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    weights = {_hf_module(n.removesuffix(".weight")): p for n, p in base_model.named_parameters()
               if ".layers." in n and "vision" not in n and n.endswith("proj.weight")}
    heads = {"self_attn.q_proj": text.num_attention_heads, "self_attn.k_proj": text.num_key_value_heads}
    for key, b_hf in hf.items():
        if ".lora_B." not in key:
            continue
        layer, module = _hf_module(key.split(".lora_B.")[0])
        name = f"blk.{layer}.{names[module]}.weight"
        out, inner = weights[(layer, module)].shape
        b, a = tensors[name + ".lora_b"], tensors[name + ".lora_a"]
        assert b.shape == (out, 4) and a.shape == (4, inner), name  # numpy (out, r) / (r, in): ggml ne reversed
        expected = b_hf.numpy()
        if permuted and module in heads:
            expected = expected[llama_row_order(out, heads[module]).numpy()]
            assert np.abs(expected - b_hf.numpy()).max() > 1e-3  # the permutation moves rows: the check can fail
        np.testing.assert_array_equal(b, expected, err_msg=name)


def _no_loading(*args, **kwargs):
    raise AssertionError("the base model was loaded")


def test_an_unmapped_architecture_is_refused_before_any_weight_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "attach", _no_loading)
    monkeypatch.setattr(stack_module, "load_model", _no_loading)
    directory = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40).save_pretrained(directory)  # a config, no weights
    with pytest.raises(UndialExportError, match="not 'gpt2'.*convert_lora_to_gguf"):
        export_gguf(str(directory), [tmp_path / "adapter"], tmp_path / "out.gguf")
    base = gguf.GGUFWriter(tmp_path / "base.gguf", arch="gpt2")  # llama.cpp serves gpt2; its conversion is not mapped
    base.add_token_list([f"t{i}" for i in range(100)])
    base.write_header_to_file()
    base.write_kv_data_to_file()
    base.close()
    with pytest.raises(UndialExportError, match="not 'gpt2' \\(base.gguf's general.architecture\\)"):
        export_gguf(str(tmp_path / "base.gguf"), [tmp_path / "adapter"], tmp_path / "out.gguf")
    with pytest.raises(UndialExportError, match="not 'gpt2'"):  # a separate base_gguf is read the same way
        export_gguf(str(directory), [tmp_path / "adapter"], tmp_path / "out.gguf", base_gguf=tmp_path / "base.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_header_reader_skips_arrays_and_strings_like_gguf_reader(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(path)
    # The chat template comes after the token list (strings), token types (ints) and merges.
    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    assert gguf_export._header_string(path, key) == reader.fields[key].contents()
    assert gguf_export._header_string(path, "no.such.key") is None
    assert gguf_export.gguf_file_architecture(path) == gguf.MODEL_ARCH.LLAMA


def test_single_file_export_writes_an_ollama_modelfile_per_request_none(tiny_dir, plain_stack, tmp_path):
    base_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base = _write_base(base_model, tmp_path / "my base.gguf")  # a space: FROM must quote the path
    (path,) = export_gguf(tiny_dir, plain_stack, tmp_path / "out" / "all.gguf", base_gguf=base)
    recipe = tmp_path / "out" / "all.Modelfile"
    assert recipe.read_text() == f'FROM "{base.resolve()}"\nADAPTER ./all.gguf\n'
    # Without a GGUF base, FROM names the model directory; the ADAPTER path is relative to the Modelfile.
    export_gguf(tiny_dir, plain_stack, tmp_path / "out" / "dir.gguf")
    assert (tmp_path / "out" / "dir.Modelfile").read_text() == f"FROM {Path(tiny_dir).resolve()}\nADAPTER ./dir.gguf\n"
    with pytest.raises(FileExistsError):  # an existing recipe is refused before anything is written
        (tmp_path / "out" / "new.Modelfile").write_text("mine")
        export_gguf(tiny_dir, plain_stack, tmp_path / "out" / "new.gguf")
    assert not (tmp_path / "out" / "new.gguf").exists() and (tmp_path / "out" / "new.Modelfile").read_text() == "mine"
    export_gguf(tiny_dir, plain_stack, tmp_path / "parts", per_request=True)  # Ollama takes one adapter: no recipe
    assert not list(tmp_path.rglob("parts*.Modelfile")) and not list((tmp_path / "parts").glob("*Modelfile"))
