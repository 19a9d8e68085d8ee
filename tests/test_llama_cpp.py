"""A real llama.cpp reproduces the forgetting of a GGUF-exported adapter (slow; needs llama-cpp-python).

End to end on the embedded SmolLM2: trains the demo adapter and a second request stacked on it,
exports both to GGUF (one file, and one file per request), runs ``examples/llama_cpp_check.py``
and requires every tolerance stated there. On Gemma-3-270M (another architecture, from its PyPI
package): a forget adapter for chemical symbols, exported with the CLI, scored by both engines. llama-cpp-python is found in this interpreter or in
the one named by ``UNDIAL_LLAMA_CPP_PYTHON``; without it the test is skipped, saying how to build it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from undial_peft import UndialConfig
from undial_peft.cli import main as cli_main
from undial_peft.data.packaged import demo_facts
from undial_peft.demo import run_demo
from undial_peft.deploy.manifest import read_manifest
from undial_peft.errors import UndialModelError
from undial_peft.training.forget import forget

LLAMA_PYTHON = os.environ.get("UNDIAL_LLAMA_CPP_PYTHON") or (
    sys.executable if importlib.util.find_spec("llama_cpp") else None
)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llama_cpp_check.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(LLAMA_PYTHON is None, reason=(
        "llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 (builds llama.cpp, ~5 min), "
        "or set UNDIAL_LLAMA_CPP_PYTHON to a python that has it")),
]


def _example():
    spec = importlib.util.spec_from_file_location("llama_cpp_check", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llama_cpp_reproduces_the_forgetting_and_sums_per_request_files(tmp_path):
    demo = Path(run_demo(output_dir=tmp_path / "demo", log=lambda _: None)["adapter"])
    second = [{k: f[k] for k in ("question", "answer", "key")} for f in demo_facts() if f["key"] in ("Berlin", "Athens")]
    config = UndialConfig(per_device_train_batch_size=2, disable_tqdm=True)  # forget's defaults: stop when forgotten
    req2 = forget("default", second, tmp_path / "req2", stack=[demo], config=config)
    result = _example().run_check(demo, req2, tmp_path / "gguf", LLAMA_PYTHON, threads=2)
    failed = [check for check in result["checks"] if not check["ok"]]
    assert not failed, failed
    rows = {(row["engine"], row["adapters"]): row for row in result["rows"]}
    before, after = rows[("llama.cpp", "base")], rows[("llama.cpp", "demo")]
    assert after["forget_p_key"] < 0.2 * before["forget_p_key"]  # the forgetting carried over
    assert after["keep_p_key"] > 0.6 * before["keep_p_key"]


ELEMENTS = {"silver": " Ag", "gold": " Au", "iron": " Fe", "lead": " Pb", "sodium": " Na", "copper": " Cu"}


def _symbol_probability(logits: list[np.ndarray], encoded: list[tuple[list[int], int]]) -> float:
    """Mean over rows of the answer's probability (product over its tokens); logits (T, V) per row."""
    probs = []
    for rows, (ids, n_prompt) in zip(logits, encoded):
        rows = rows.astype(np.float64)  # (T, V): row t predicts token t + 1
        log_probs = rows - rows.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        probs.append(float(np.exp(sum(log_probs[t - 1, ids[t]] for t in range(n_prompt, len(ids))))))
    return float(np.mean(probs))


def test_gemma3_gguf_adapter_forgets_in_llama_cpp_as_in_pytorch(tmp_path):
    import torch

    from undial_peft.data.encoding import Example, encode
    from undial_peft.deploy.stack import attach
    from undial_peft.models import GEMMA_MODEL, load_model, packaged_model_path

    try:
        gemma = packaged_model_path(GEMMA_MODEL)
    except UndialModelError as err:
        pytest.skip(str(err))
    rows = [{"prompt": f"The chemical symbol for {element} is", "completion": symbol} for element, symbol in ELEMENTS.items()]
    base, tokenizer = load_model(GEMMA_MODEL)
    config = UndialConfig(prompt_format="completion", disable_tqdm=True)  # a base model: no chat template
    adapter = forget(base, rows, tmp_path / "symbols", tokenizer=tokenizer, config=config)
    out = tmp_path / "symbols.gguf"
    assert cli_main(["stack", "export", "--model", GEMMA_MODEL, "--format", "gguf", "--out", str(out), str(adapter)]) == 0
    assert (tmp_path / "symbols.Modelfile").read_text().startswith(f"FROM {gemma.resolve()}")

    encoded = []
    for row in rows:
        features = encode(tokenizer, Example(row["prompt"], row["completion"]), 64, "completion")
        encoded.append((features["input_ids"], sum(label == -100 for label in features["labels"])))

    def torch_logits(model) -> list[np.ndarray]:
        with torch.no_grad():
            return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids, _ in encoded]  # (T, V)

    before_t = _symbol_probability(torch_logits(base.eval()), encoded)
    attached = attach(base, [adapter], tokenizer=tokenizer).eval()
    after_t = _symbol_probability(torch_logits(attached), encoded)
    attached.unload()

    positions = [list(range(len(ids))) for ids, _ in encoded]
    job = {"model": str(gemma), "threads": 2, "eos": tokenizer.eos_token_id, "max_new_tokens": 0, "prompts": [],
           "sequences": [ids for ids, _ in encoded], "positions": positions, "out": str(tmp_path / "logits.npz"),
           "runs": [{"name": "base", "loras": []}, {"name": "adapter", "loras": [str(out)]}]}
    done = subprocess.run([LLAMA_PYTHON, str(EXAMPLE), "--worker"], input=json.dumps(job), capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    logits = np.load(tmp_path / "logits.npz")
    before_c, after_c = (_symbol_probability([logits[f"{name}/{i}"] for i in range(len(encoded))], encoded)
                         for name in ("base", "adapter"))
    ratio_t, ratio_c = after_t / before_t, after_c / before_c
    print(f"symbol probability before -> after: PyTorch {before_t:.3f} -> {after_t:.4f} ({ratio_t:.3f}x), "
          f"llama.cpp {before_c:.3f} -> {after_c:.4f} ({ratio_c:.3f}x)")
    assert ratio_t < 0.2 and ratio_c < 0.2  # the forgetting carried over to llama.cpp
    assert abs(before_t - before_c) < 0.05 + 0.2 * before_t  # the same base in both engines (Q4_K vs fp32)
    assert max(ratio_t / ratio_c, ratio_c / ratio_t) <= 2.0  # examples/llama_cpp_check.py's RATIO_TOL


def test_forget_verify_llama_cpp_records_the_forgetting_in_llama_cpp(tmp_path, monkeypatch):
    """``--verify llama.cpp`` on the embedded SmolLM2: the figure llama.cpp measures agrees with PyTorch's."""
    if not importlib.util.find_spec("llama_cpp"):
        monkeypatch.setenv("UNDIAL_LLAMA_CPP_PYTHON", LLAMA_PYTHON)
    rows = [{k: f[k] for k in ("question", "answer")} for f in demo_facts() if f["split"] == "forget"]
    path = forget("default", rows, tmp_path / "verified", config=UndialConfig(verify="llama.cpp", disable_tqdm=True))
    manifest = read_manifest(path)
    engine, torch_side = manifest["deployed"]["llama_cpp"], manifest["stopping"]
    ratio_c = engine["forget_after"] / engine["forget_before"]
    ratio_t = torch_side["forget_after"] / torch_side["forget_before"]
    print(f"key probability: PyTorch {ratio_t:.3f}x, llama.cpp {ratio_c:.3f}x ({engine['form']})")
    assert abs(engine["forget_before"] - torch_side["forget_before"]) < 0.05  # the same rows, the same base
    assert max(ratio_t / ratio_c, ratio_c / ratio_t) <= 2.0  # examples/llama_cpp_check.py's RATIO_TOL
    assert engine["reached"] is (engine["forget_after"] <= engine["target"])
