"""A real llama.cpp reproduces the forgetting of a GGUF-exported adapter (slow; needs llama-cpp-python).

End to end on the embedded SmolLM2: trains the demo adapter and a second request stacked on it,
exports both to GGUF (one file, and one file per request), runs ``examples/llama_cpp_check.py``
and requires every tolerance stated there. llama-cpp-python is found in this interpreter or in
the one named by ``UNDIAL_LLAMA_CPP_PYTHON``; without it the test is skipped, saying how to build it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from undial_peft import UndialConfig
from undial_peft.data.packaged import demo_facts
from undial_peft.demo import run_demo
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
