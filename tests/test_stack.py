"""Stacks end to end on the tiny memorised model: three sequential forget requests, then verify,
revert, list, export and merge them.

Forget sets: r0 = facts[0:4], r1 = facts[4:8], r2 = facts[8:12]; retain facts[12:16]. Request k
trains with r0..r{k-1} active and frozen. The trained stack is shared by every test of this
module (module-scoped fixtures); ``pytest -s`` prints the probability table and the numbers.

Bounds (answer probability = exp(-mean answer-token NLL); the memorised model gives ~0.99):
- a request's own facts, right after it is trained: < FORGOTTEN (0.4)
- earlier requests' facts after later requests: still < FORGOTTEN (no relearning)
- retain facts[12:16] after every step: > KEPT (0.6)
- export / merge logits equal the attached stack's within 1e-5 (fp32)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from undial_peft import UndialConfig
from undial_peft.cli import main as cli_main
from undial_peft.data.readers import read_examples
from undial_peft.deploy.manifest import CONFIG, WEIGHTS, read_manifest
from undial_peft.deploy.stack import attach, export_stack, list_stack, merge_stack
from undial_peft.errors import UndialStackError
from undial_peft.models import load_model
from undial_peft.tiny import tiny_llama
from undial_peft.training.forget import forget, mean_probability
from undial_peft.utils.storage import file_sha256
from undial_peft.utils.tables import dict_rows

FORGOTTEN, KEPT, TOLERANCE = 0.4, 0.6, 1e-5
GROUPS = {"r0 facts[0:4]": slice(0, 4), "r1 facts[4:8]": slice(4, 8), "r2 facts[8:12]": slice(8, 12),
          "retain facts[12:16]": slice(12, 16)}


def _config(**overrides) -> UndialConfig:
    """The settings of tests/test_trainer.py (forget ~0.99 -> ~0.3, retain ~0.8 for one request)."""
    settings = {"num_train_epochs": 30, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                "retain_weight": 1.0, "disable_tqdm": True, "logging_steps": 1000,
                # fixed length, every answer token adjusted: the figures below were measured so
                "max_steps": -1, "until_ratio": None, "max_retain_drop": None, "auto_key": False}
    return UndialConfig(**{**settings, **overrides})


def _probabilities(model, facts) -> dict[str, float]:
    config = _config()
    return {name: mean_probability(model, model.tokenizer, read_examples(facts[part]), config)
            for name, part in GROUPS.items()}


def _dir_hashes(directory: str | Path) -> dict[str, str]:
    """sha256 of every file in a directory (by name)."""
    return {p.name: file_sha256(p) for p in sorted(Path(directory).iterdir()) if p.is_file()}


def _format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    header = f"{'model':<24}" + "".join(f"{name:>22}" for name in GROUPS)
    lines = [f"{label:<24}" + "".join(f"{probs[name]:>22.3f}" for name in GROUPS) for label, probs in rows]
    return "\n".join([header, *lines])


@dataclass
class Trained:
    """The three-request stack and what was measured while building it."""

    stack: list[Path]
    table: list[tuple[str, dict[str, float]]]
    adapter_hashes: list[dict[str, dict[str, str]]]  # after step k: {adapter id: {file: sha256}}
    base_files_before: dict[str, str]
    base_tensors_before: dict[str, torch.Tensor]
    in_memory_base: torch.nn.Module  # the loaded base r2 was trained on


@pytest.fixture(scope="module")
def trained(tiny_dir, facts, tmp_path_factory) -> Trained:
    """Train r0, r1 (from the directory) and r2 (from a loaded model object) sequentially."""
    root = tmp_path_factory.mktemp("stack")
    base_files = _dir_hashes(tiny_dir)
    memory_base, tokenizer = load_model(tiny_dir)
    base_tensors = {k: v.clone() for k, v in memory_base.state_dict().items()}
    base = load_model(tiny_dir)[0]
    table = [("base", _probabilities(_with_tokenizer(base, tokenizer), facts))]
    stack: list[Path] = []
    hashes = []
    for k in range(3):
        # Retain: facts[12:16] first, then the not-yet-forgotten facts. NOTE: data.build_dataset pairs
        # forget row i with retain row i % len(retain), so with 4 forget rows only the first 4 retain
        # rows (facts[12:16]) are ever used.
        model_or_path = memory_base if k == 2 else tiny_dir
        path = forget(model_or_path, facts[4 * k: 4 * k + 4], root / f"r{k}", config=_config(), stack=list(stack),
                      retain=facts[12:] + facts[4 * k + 4: 12], tokenizer=tokenizer if k == 2 else None)
        stack.append(path)
        hashes.append({p.name: _dir_hashes(p) for p in stack})
        table.append((f"r0..r{k}", _probabilities(attach(tiny_dir, stack), facts)))
    print("\nanswer probability after each request (stack attached to the base):\n" + _format_table(table))
    return Trained(stack, table, hashes, base_files, base_tensors, memory_base)


def _with_tokenizer(model, tokenizer):
    model.tokenizer = tokenizer
    return model


def _batch(tiny_dir: str, facts) -> dict[str, torch.Tensor]:
    """All 16 question+answer texts, right-padded: input_ids and attention_mask (16, T)."""
    _, tokenizer = load_model(tiny_dir)
    texts = [f"{f['question']} {f['answer']}" for f in facts]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits  # (16, T, V)


def _masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over real (non-padding) positions."""
    return (a - b).abs()[mask.bool()].max().item()


# --- training a stack ---------------------------------------------------------------------------


def test_each_request_forgets_without_relearning_and_keeps_retain(trained):
    names = list(GROUPS)
    base = trained.table[0][1]
    assert all(base[name] > 0.95 for name in names), base
    for k in range(3):
        probs = trained.table[k + 1][1]
        assert probs[names[k]] < FORGOTTEN, (k, probs)  # this request's facts
        for earlier in names[:k]:
            assert probs[earlier] < FORGOTTEN, (k, earlier, probs)  # no relearning
        assert probs[names[3]] > KEPT, (k, probs)  # retain


def test_earlier_adapters_and_base_are_bit_identical(trained, tiny_dir):
    final = trained.adapter_hashes[-1]
    for k, snapshot in enumerate(trained.adapter_hashes):
        for adapter, files in snapshot.items():
            assert final[adapter] == files, f"{adapter} changed after training request {k + 1}.."
    assert WEIGHTS in final["r0"] and "undial.json" in final["r0"]
    assert _dir_hashes(tiny_dir) == trained.base_files_before
    reloaded, _ = load_model(tiny_dir)
    for state in (reloaded.state_dict(), trained.in_memory_base.state_dict()):
        assert state.keys() == trained.base_tensors_before.keys()  # no LoRA layers left behind
        assert all(torch.equal(value, trained.base_tensors_before[key]) for key, value in state.items())


def test_manifests_chain_parents_with_weight_hashes(trained):
    r0, r1, r2 = trained.stack
    entry = {name: {"id": p.name, "sha256": file_sha256(p / WEIGHTS)} for name, p in zip("012", trained.stack)}
    manifests = [read_manifest(p) for p in trained.stack]
    assert [m["parents"] for m in manifests] == [[], [entry["0"]], [entry["0"], entry["1"]]]
    assert all(m["weights_sha256"] == entry[str(i)]["sha256"] for i, m in enumerate(manifests))
    assert len({m["base"]["fingerprint"] for m in manifests}) == 1  # dir and loaded object: one base


# --- attach checks ------------------------------------------------------------------------------


def _copy(adapter: Path, where: Path) -> Path:
    target = where / adapter.name  # same name: the manifest id still matches
    shutil.copytree(adapter, target)
    return target


def test_attach_refuses_wrong_order_missing_parent_tampering_and_other_base(trained, tiny_dir, facts, tmp_path):
    r0, r1, r2 = trained.stack
    with pytest.raises(UndialStackError, match=r"r1: its parents are \['r0'\], but it sits after nothing.*force=True"):
        attach(tiny_dir, [r1, r0, r2])
    with pytest.raises(UndialStackError, match=r"its parents are \['r0', 'r1'\], but it sits after \['r0'\]"):
        attach(tiny_dir, [r0, r2])

    tampered = _copy(r0, tmp_path / "tampered")
    weights = tampered / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # tensor bytes, not the header: still a valid file
    weights.write_bytes(bytes(data))
    with pytest.raises(UndialStackError, match=r"does not match the sha256 in undial.json \(tampered or replaced\)"):
        attach(tiny_dir, [tampered])

    tokenizer = load_model(tiny_dir)[1]
    other = tmp_path / "other-base"
    tiny_llama(tokenizer, hidden_size=64, num_layers=2, seed=1).save_pretrained(other)  # same shapes, other weights
    tokenizer.save_pretrained(other)
    with pytest.raises(UndialStackError, match="trained on a different base model"):
        attach(other, [r0])

    # force=True turns each soft check into a warning; the stack then attaches as given.
    for base, stack in ((tiny_dir, [r1, r0, r2]), (tiny_dir, [r0, r2]), (tiny_dir, [tampered]), (other, [r0])):
        model = attach(base, stack, force=True)
        assert len(model.base_model.active_adapters) == len(stack)


def test_pickle_in_adapter_dir_is_refused_even_with_force(trained, tiny_dir, tmp_path):
    unsafe = _copy(trained.stack[0], tmp_path)
    (unsafe / "adapter_model.bin").write_bytes(b"not really a pickle")
    for force in (False, True):
        with pytest.raises(UndialStackError, match=r"pickle files \['adapter_model.bin'\] are refused"):
            attach(tiny_dir, [unsafe], force=force)


# --- revert -------------------------------------------------------------------------------------


def test_revert_by_attaching_without_a_request_brings_its_facts_back(trained, tiny_dir, facts):
    r0, r1, r2 = trained.stack
    full = trained.table[-1][1]
    reverted = _probabilities(attach(tiny_dir, [r0, r2], force=True), facts)
    print("\nrevert r1:\n" + _format_table([("r0+r1+r2", full), ("r0+r2 (r1 reverted)", reverted)]))
    names = list(GROUPS)
    # r1's facts come back: well above their forgotten value (not fully to their r0-only value, since r0
    # and r2 also push them down: all facts share one template in this tiny model).
    assert reverted[names[1]] > max(3 * full[names[1]], full[names[1]] + 0.1), (full, reverted)
    # r0's and r2's facts stay low-ish: r1 had also pushed them down a little (collateral), which goes too.
    assert reverted[names[0]] < FORGOTTEN and reverted[names[2]] < FORGOTTEN, reverted
    assert reverted[names[3]] > 0.5, reverted  # r1's retain term goes with it: retain dips, but holds


# --- listing ------------------------------------------------------------------------------------


def test_describe_table_and_cli_list(trained, capsys):
    rows = list_stack(trained.stack)
    assert [row["id"] for row in rows] == ["r0", "r1", "r2"]
    assert [row["parents"] for row in rows] == ["-", "r0", "r0,r1"]
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert all(row["rank"] == 8 and row["method"] == "undial" and row["beta"] == 10.0 for row in rows)
    assert all(row["p_after"] < row["p_before"] for row in rows[:1])  # r0 started from the memorised model
    text = dict_rows(rows)
    lines = text.splitlines()
    assert lines[0].split() == list(rows[0]) and len(lines) == 4
    assert list_stack([trained.stack[1]])[0]["status"] == "parents differ"  # r1 listed without r0

    assert cli_main(["stack", "list", *map(str, trained.stack)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == text
    with capsys.disabled():
        print("\nundial-peft stack list r0 r1 r2:\n" + out)
    assert cli_main(["stack", "list", str(trained.stack[0].parent / "missing")]) == 2  # one-line user error
    assert "no such adapter directory" in capsys.readouterr().err


def test_adapter_size_on_disk(trained, tiny_dir):
    base, _ = load_model(tiny_dir)
    # LoRA on every linear layer but the head: r * (in + out) float32 values per layer.
    linears = [m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    payload = sum(8 * (m.in_features + m.out_features) for m in linears) * 4
    sizes = [(p / WEIGHTS).stat().st_size for p in trained.stack]
    print(f"\nadapter weights on disk: {[round(s / 1024, 1) for s in sizes]} KB (LoRA payload {payload / 1024:.1f} KB)")
    assert all(payload < size < payload + 16 * 1024 for size in sizes), (sizes, payload)


# --- export and merge ---------------------------------------------------------------------------

# Loads the exported adapter and the merged models with transformers + peft only: importing
# undial_peft in this process fails, so nothing of ours can take part.
PLAIN_LOAD = textwrap.dedent("""
    import sys
    sys.modules["undial_peft"] = None  # any import of undial_peft now raises ImportError
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, export_dir, merged_dir, merged4_dir, batch_file, out_file = sys.argv[1:]
    batch = torch.load(batch_file)
    out = {}
    with torch.no_grad():
        exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export_dir).eval()
        out["export"] = exported(**batch).logits
        out["export_rank"] = torch.tensor(exported.peft_config["default"].r)
        out["merge"] = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(**batch).logits
        out["merge4"] = AutoModelForCausalLM.from_pretrained(merged4_dir).eval()(**batch).logits
    torch.save(out, out_file)
""")


@dataclass
class Artefacts:
    export: Path
    merged: Path
    merged4: Path
    stack4: list[Path]
    batch: dict[str, torch.Tensor]
    plain: dict[str, torch.Tensor]  # logits from the plain (undial-free) loads
    attached: torch.Tensor  # logits of the attached three-request stack


@pytest.fixture(scope="module")
def artefacts(trained, tiny_dir, facts, tmp_path_factory) -> Artefacts:
    """Export and merge the stack, merge a stack trained over a 4-bit base, then load all three plainly."""
    root = tmp_path_factory.mktemp("artefacts")
    export = export_stack(tiny_dir, trained.stack, root / "exported")
    merged = merge_stack(tiny_dir, trained.stack, root / "merged")
    stack4: list[Path] = []
    quick = _config(num_train_epochs=1, max_steps=6)  # equality of logits needs no good forgetting
    for k in range(2):
        stack4.append(forget(tiny_dir, facts[4 * k: 4 * k + 4], root / f"q{k}", config=quick, stack=list(stack4),
                             retain=facts[12:], load_in_4bit=True))
    merged4 = merge_stack(tiny_dir, stack4, root / "merged4")
    batch = _batch(tiny_dir, facts)
    torch.save(batch, root / "batch.pt")
    script = root / "plain_load.py"
    script.write_text(PLAIN_LOAD, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), tiny_dir, str(export), str(merged), str(merged4),
                    str(root / "batch.pt"), str(root / "plain.pt")], check=True, env=env, timeout=300)
    plain = torch.load(root / "plain.pt")
    attached = _logits(attach(tiny_dir, trained.stack), batch)
    return Artefacts(export, merged, merged4, stack4, batch, plain, attached)


def test_export_is_one_standard_lora_equal_to_the_stack(artefacts, trained, tiny_dir):
    config = json.loads((artefacts.export / CONFIG).read_text())
    # 8 + 8 + 8 = 24, zero-padded to 32: a --max-lora-rank vLLM accepts
    assert config["r"] == 32 and config["lora_alpha"] == 32 and not config.get("use_rslora")
    assert int(artefacts.plain["export_rank"]) == 32
    with safe_open(artefacts.export / WEIGHTS, framework="pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    assert all(shape[0] == 32 for key, shape in shapes.items() if "lora_A" in key)  # (R, in)
    assert all(shape[1] == 32 for key, shape in shapes.items() if "lora_B" in key)  # (out, R)
    diff = _masked_max_diff(artefacts.plain["export"], artefacts.attached, artefacts.batch["attention_mask"])
    size = (artefacts.export / WEIGHTS).stat().st_size / 1024
    print(f"\nexport: rank 24 (padded to 32), {size:.1f} KB, max |logit diff| vs attached stack = {diff:.2e}")
    assert diff < TOLERANCE, diff
    assert (artefacts.export / "stack.json").is_file()
    assert [a["manifest"]["id"] for a in json.loads((artefacts.export / "stack.json").read_text())["adapters"]] == [
        "r0", "r1", "r2"]
    # The export carries its own manifest: it attaches verified, alone, but not on top of its sources.
    assert _masked_max_diff(_logits(attach(tiny_dir, [artefacts.export]), artefacts.batch), artefacts.attached,
                            artefacts.batch["attention_mask"]) < TOLERANCE
    with pytest.raises(UndialStackError, match="parents"):
        attach(tiny_dir, [trained.stack[0], artefacts.export])


def test_merge_writes_a_plain_model_equal_to_the_stack(artefacts):
    names = {p.name for p in artefacts.merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "stack.json"} <= names, names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    diff = _masked_max_diff(artefacts.plain["merge"], artefacts.attached, artefacts.batch["attention_mask"])
    print(f"\nmerge: max |logit diff| vs attached stack = {diff:.2e}")
    assert diff < TOLERANCE, diff


def test_merge_of_a_stack_trained_on_a_4bit_base_into_the_fp32_base(artefacts, tiny_dir):
    assert read_manifest(artefacts.stack4[1])["parents"][0]["id"] == "q0"
    want = _logits(attach(tiny_dir, artefacts.stack4), artefacts.batch)  # fp32 base + the 4-bit-trained stack
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir), artefacts.batch)
    mask = artefacts.batch["attention_mask"]
    assert _masked_max_diff(want, base, mask) > 1e-3  # the stack did change the model
    diff = _masked_max_diff(artefacts.plain["merge4"], want, mask)
    print(f"\nmerge of 4-bit-trained stack into fp32: max |logit diff| vs attached = {diff:.2e}")
    assert diff < TOLERANCE, diff


def test_export_of_mixed_lora_settings_is_exact(tiny_dir, facts, tmp_path):
    """Stacks whose adapters differ (rsLoRA, other ranks/targets, an embedding) still export exactly.

    Built without training: random B makes each adapter non-zero. No manifests, so plain peft
    adapters (attached with a warning); peft's own "cat" merge mis-scales rsLoRA adapters.
    """
    configs = [
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                   layers_to_transform=[0], layers_pattern="layers", lora_dropout=0.0),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    ]
    torch.manual_seed(0)
    stack = []
    for i, lora in enumerate(configs):
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), lora)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.data.normal_(0, 0.05)
        peft_model.save_pretrained(tmp_path / f"plain{i}")
        stack.append(tmp_path / f"plain{i}")
    batch = _batch(tiny_dir, facts)
    want = _logits(attach(tiny_dir, stack), batch)
    exported = export_stack(tiny_dir, stack, tmp_path / "exported")
    got = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), exported), batch)
    assert json.loads((exported / CONFIG).read_text())["r"] == 16  # 4 + 8 where both apply, padded to 16
    diff = _masked_max_diff(got, want, batch["attention_mask"])
    assert diff < TOLERANCE, diff
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir), batch)
    assert _masked_max_diff(want, base, batch["attention_mask"]) > 1e-2  # not trivially equal


def test_export_and_merge_leave_a_loaded_base_untouched(trained, tiny_dir, tmp_path):
    base, tokenizer = load_model(tiny_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    export_stack(base, trained.stack[:1], tmp_path / "e", tokenizer=tokenizer)
    merge_stack(base, trained.stack[:1], tmp_path / "m", tokenizer=tokenizer)
    state = base.state_dict()
    assert state.keys() == before.keys()  # LoRA layers removed again
    assert all(torch.equal(v, before[k]) for k, v in state.items())
    assert json.loads((tmp_path / "e" / CONFIG).read_text())["r"] == 8  # a one-adapter stack exports at its rank
