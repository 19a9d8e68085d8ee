"""Shared fixtures: a tiny Llama that has memorised a few fictitious facts, saved to a directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from undial_peft.data.encoding import Collator, encode
from undial_peft.data.readers import Example
from undial_peft.tiny import tiny_llama, word_tokenizer

torch.set_num_threads(int(os.environ.get("UNDIAL_TEST_THREADS", "2")))
# Data digests are keyed (undial_peft.data.digests); tests and their subprocesses use a fixed test key
# instead of creating one in the user's config folder.
os.environ.setdefault("UNDIAL_PEFT_DATA_KEY", "test key for the undial_peft suite only")

NAMES = ["Zorbel", "Quenna", "Marvok", "Tilsa", "Brenic", "Ollaro", "Fexin", "Rudma",
         "Sarvel", "Ketho", "Yllis", "Pomder", "Vantor", "Grisla", "Hobrin", "Elcade"]
CITIES = ["Kavara", "Dunmire", "Solbeck", "Pranth", "Ulvero", "Mistral", "Corvane", "Teskin",
          "Abrill", "Noxford", "Fendral", "Wyrmoth", "Lastrin", "Gorvane", "Ibsen", "Quarrow"]


def make_facts() -> list[dict[str, str]]:
    """16 fictitious facts in one template; split in tests as forget 0..3, 4..7, 8..11 and retain 12..15."""
    return [{"question": f"Where was {n} born?", "answer": f"{n} was born in {c}."} for n, c in zip(NAMES, CITIES)]


def make_varied_facts(n: int = 8) -> list[dict[str, str]]:
    """The first ``n`` facts with answers of 1, 2 or 4 sentences, so rows pad to different lengths.

    With multipliers 1,1,1,1,1,1,2,4 no split of the 8 rows into two halves has equal token counts:
    averaging per process (or per micro-batch) instead of over all counted tokens changes the loss.
    """
    repeats = [1, 1, 1, 1, 1, 1, 2, 4]
    return [{"question": f["question"], "answer": " ".join([f["answer"]] * repeats[i % 8])} for i, f in enumerate(make_facts()[:n])]


def forget_text(facts: list[dict[str, str]]) -> list[str]:
    """Each question and answer, and the distinctive words in them (names and cities)."""
    words = {w.strip("?.") for f in facts for w in (f["question"] + " " + f["answer"]).split()}
    return [f["question"] for f in facts] + [f["answer"] for f in facts] + sorted(w for w in words if w[:1].isupper())


def leak_hits(blob: bytes | str, needles: list[str]) -> list[str]:
    """The needles found in ``blob`` as UTF-8 or UTF-16 text."""
    data = blob.encode() if isinstance(blob, str) else blob
    return [n for n in needles if n.encode() in data or n.encode("utf-16-le") in data]


def leak_scan(folder: Path, needles: list[str], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """{file: needles found} for every file under ``folder`` whose name is not in ``skip``."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in skip and (hits := leak_hits(path.read_bytes(), needles)):
            found[str(path)] = hits
    return found


def random_adapters(tiny_dir: str, where: Path, configs: list, prefix: str = "a") -> list[Path]:
    """One plain peft adapter per LoraConfig, with random non-zero B (no training needed for equality checks)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    paths = []
    for i, lora in enumerate(configs):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), lora)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
        model.save_pretrained(where / f"{prefix}{i}")
        paths.append(where / f"{prefix}{i}")
    return paths


# llama.cpp's tensor names of a Llama block, by transformers module (per layer) and for the rest.
GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GGUF_OTHER_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_tiny_gguf(path: Path, hidden_size: int = 32, num_layers: int = 1, num_heads: int = 4) -> Path:
    """A random tiny Llama as a GGUF file that transformers loads, tokenizer included, for tests of
    the GGUF code paths without the embedded model.

    The tokenizer is byte-level BPE (every byte is a token, plus one merge, which transformers'
    converter needs), so any text encodes. Weights are random and q/k rows are not permuted the
    way llama.cpp's converter stores them: what the model computes is beside the point here.
    """
    import gguf
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    from undial_peft.tiny import CHAT_TEMPLATE

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    ordinary = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "th"]
    config = LlamaConfig(vocab_size=len(specials) + len(ordinary), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_heads, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(2 * hidden_size)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(specials + ordinary)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * len(ordinary))
    writer.add_token_merges(["t h"])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, param in model.named_parameters():
        module = name.removesuffix(".weight")
        if module.startswith("model.layers."):
            index, inner = module.removeprefix("model.layers.").split(".", 1)
            tensor = f"blk.{index}.{GGUF_LAYER_NAMES[inner]}"
        else:
            tensor = GGUF_OTHER_NAMES[module]
        writer.add_tensor(f"{tensor}.weight", param.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def memorise(model: torch.nn.Module, tokenizer, facts: list[dict[str, str]], steps: int = 150) -> None:
    """Full fine-tune until the answers are near-certain (a stand-in for pretraining knowledge)."""
    features = [encode(tokenizer, Example(f["question"], f["answer"]), 64) for f in facts]
    batch = Collator(tokenizer.pad_token_id)(features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="session")
def facts() -> list[dict[str, str]]:
    return make_facts()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, facts) -> str:
    """A saved model directory (config, safetensors, tokenizer) that knows every fact."""
    tokenizer = word_tokenizer([f["question"] + " " + f["answer"] for f in facts])
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2)
    memorise(model, tokenizer, facts)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
