"""One adapter for vLLM-style servers: the rules check, and the rank budget (SVD of the summed deltas)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import random_adapters
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from undial_peft.cli import main as cli_main
from undial_peft.deploy.manifest import CONFIG, read_manifest
from undial_peft.deploy.stack import attach, export_stack
from undial_peft.deploy.svd import truncated_svd
from undial_peft.deploy.vllm import check_vllm, vllm_max_lora_rank

# --- the rules check ----------------------------------------------------------------------------

VALID = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False,
         "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "peft_type": "LORA"}


def _adapter(where: Path, config: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A hand-written adapter directory: two layers of q_proj / v_proj at rank ``config['r']``."""
    where.mkdir(parents=True)
    (where / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    if tensors is None:
        r = config["r"]
        tensors = {}
        for layer in range(2):
            for name in ("q_proj", "v_proj"):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.zeros(r, 16)  # (r, in)
                tensors[f"{prefix}.lora_B.weight"] = torch.zeros(16, r)  # (out, r)
    save_file(tensors, where / "adapter_model.safetensors")
    return where


@pytest.mark.parametrize(("change", "named"), [
    ({"r": 24}, "r=24 exceeds max_lora_rank 16"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "bias"),
])
def test_each_config_rule_violated_once_is_named(tmp_path, change, named):
    assert check_vllm(_adapter(tmp_path / "ok", VALID), max_lora_rank=16) == []
    problems = check_vllm(_adapter(tmp_path / "bad", {**VALID, **change}), max_lora_rank=16)
    assert len(problems) == 1 and named in problems[0], problems


def test_each_tensor_rule_violated_once_is_named(tmp_path):
    base = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 16),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 8)}
    cases = {
        "target modules": {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 30),
                           "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(16, 8)},
        "rank:": {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16),
                  "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.zeros(16, 4)},
        "tensors:": {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.zeros(16)},
    }
    for i, (named, extra) in enumerate(cases.items()):
        problems = check_vllm(_adapter(tmp_path / str(i), VALID, {**base, **extra}))
        assert len(problems) == 1 and problems[0].startswith(named), problems
    assert check_vllm(_adapter(tmp_path / "flag", VALID), max_lora_rank=12)[0].startswith("--max-lora-rank 12")


def test_vllm_max_lora_rank_rounds_up_to_an_allowed_value():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 24, 300, 512)] == [1, 8, 8, 16, 32, 320, 512]
    with pytest.raises(ValueError, match="--max-rank"):
        vllm_max_lora_rank(513)


# --- truncated SVD against hand-made and dense references ----------------------------------------


def test_truncated_svd_keeps_the_largest_singular_values_of_a_hand_made_delta():
    torch.manual_seed(0)
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(40, 5, dtype=torch.float64))  # (out, 5) orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(30, 5, dtype=torch.float64))  # (in, 5)
    b, a = (u * sigma).float(), v.T.float()  # B = U diag(sigma) (40, 5), A = V^T (5, 30): delta = U S V^T
    result = truncated_svd(a, b, max_rank=2)
    assert result.a.shape == (2, 30) and result.b.shape == (40, 2)
    assert result.energy_kept == pytest.approx((25 + 9) / (25 + 9 + 4 + 1 + 0.25), rel=1e-6)
    error = torch.linalg.matrix_norm((b @ a).double() - (result.b @ result.a).double())
    assert error.item() == pytest.approx(math.sqrt(4 + 1 + 0.25), rel=1e-5)  # the discarded singular values


def test_truncated_svd_matches_the_dense_svd_and_is_exact_when_the_rank_fits():
    torch.manual_seed(1)
    a, b = torch.randn(12, 50), torch.randn(60, 12)  # stacked rank 12
    dense = torch.linalg.svdvals((b @ a).double())  # independent: SVD of the (60, 50) product
    result = truncated_svd(a, b, max_rank=5)
    error = torch.linalg.matrix_norm((b @ a).double() - (result.b @ result.a).double())
    assert error.item() == pytest.approx(dense[5:].square().sum().sqrt().item(), rel=1e-4)
    # two copies of one rank-6 delta: stacked rank 12, true rank 6, so a budget of 6 loses nothing
    a6, b6 = torch.randn(6, 50), torch.randn(60, 6)
    twice = truncated_svd(torch.cat([a6, a6]), torch.cat([b6, b6], dim=1), max_rank=6)
    assert twice.a.shape[0] == 6 and twice.energy_kept == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(twice.b @ twice.a, 2 * b6 @ a6, atol=1e-4)


# --- export with a rank budget on the tiny model ------------------------------------------------


def _random_adapters(tiny_dir: str, where: Path, count: int) -> list[Path]:
    """``count`` plain peft r=8 adapters on every linear layer, with random non-zero B."""
    return random_adapters(tiny_dir, where, [LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                        lora_dropout=0.0) for _ in range(count)])


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["Where was Zorbel born? Zorbel was born in Kavara."], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits  # (1, T, V)


def test_export_with_a_rank_budget_is_exact_when_it_fits_and_reports_energy(tiny_dir, tmp_path, capsys):
    stack = _random_adapters(tiny_dir, tmp_path, 3)  # stacked rank 24
    attached = attach(tiny_dir, stack)
    want = _logits(attached, attached.tokenizer)

    def exported(max_rank: int | None, name: str) -> tuple[torch.Tensor, dict]:
        path = export_stack(tiny_dir, stack, tmp_path / name, max_rank=max_rank)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(path))
        return _logits(model, attached.tokenizer), read_manifest(path)

    fits, manifest = exported(24, "fits")
    assert (fits - want).abs().max() < 1e-5 and set(manifest["serving"]["energy_kept"].values()) == {1.0}
    squeezed, manifest = exported(8, "r8")
    energy = manifest["serving"]["energy_kept"]
    assert json.loads((tmp_path / "r8" / CONFIG).read_text())["r"] == 8
    assert all(0.0 < e < 1.0 for e in energy.values()) and (squeezed - want).abs().max() > 1e-3
    assert check_vllm(tmp_path / "r8", max_lora_rank=8) == []
    # the CLI prints the verdict, the flag to pass and the energy summary
    assert cli_main(["stack", "export", "--model", tiny_dir, "--max-rank", "16", "--out", str(tmp_path / "cli"),
                     *map(str, stack)]) == 0
    out = capsys.readouterr().out
    assert "vLLM ok (rank 16); serve with --enable-lora --max-lora-rank 16" in out and "energy kept" in out
    assert cli_main(["stack", "check", "--max-lora-rank", "8", str(tmp_path / "fits")]) == 0
    assert "r=32 exceeds max_lora_rank 8" in capsys.readouterr().out
