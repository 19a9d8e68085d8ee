"""``verify="llama.cpp"``: the new adapter is measured in llama.cpp after training, and a miss there is reported.

The engine is replaced by a recording stand-in (llama-cpp-python builds from source; the slow test in
test_llama_cpp.py runs the real one): it receives the base GGUF, the GGUF LoRA files and the rows.
"""

from __future__ import annotations

import gguf
import pytest
from conftest import write_tiny_gguf

from undial_peft import UndialConfig
from undial_peft.deploy import in_llama_cpp
from undial_peft.deploy.manifest import read_manifest
from undial_peft.errors import UndialConfigError
from undial_peft.training.forget import forget
from undial_peft.training.stopping import describe_outcome

ROWS = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is {w}."} for i, w in enumerate(["red", "blue", "green"])]


def _settings(**extra) -> UndialConfig:
    return UndialConfig(**{"max_steps": 2, "min_steps": 0, "auto_key": False, "seed": 0, "disable_tqdm": True,
                           "guard": "none", "verify": "llama.cpp", **extra})


@pytest.fixture
def engine(monkeypatch):
    """A stand-in llama.cpp: 0.8 per row on the deployed stack, ``after`` with the new adapter."""
    calls = []

    def score(base, loras, rows, threads=None):
        files = [gguf.GGUFReader(path) for path in loras]
        calls.append({"base": base, "loras": loras, "rows": rows,
                      "types": [f.fields[gguf.Keys.General.TYPE].contents() for f in files]})
        return [0.8] * len(rows) if not loras else [score.after] * len(rows)

    monkeypatch.setattr(in_llama_cpp, "unavailable", lambda: None)
    monkeypatch.setattr(in_llama_cpp, "key_probabilities", score)
    score.calls, score.after = calls, 0.1
    return score


def test_forget_measures_the_adapter_in_llama_cpp_and_records_it(tmp_path, engine):
    base = write_tiny_gguf(tmp_path / "tiny.gguf")
    path = forget(str(base), ROWS, tmp_path / "req", config=_settings())
    before, after = engine.calls
    assert before["loras"] == [] and after["types"] == ["adapter"]  # the base alone, then base + the new adapter
    assert before["base"] == after["base"] == base
    assert len(after["rows"]) == 3 and all(len(r["positions"]) == len(r["targets"]) for r in after["rows"])
    figures = read_manifest(path)["deployed"]["llama_cpp"]
    assert figures["forget_before"] == pytest.approx(0.8) and figures["forget_after"] == pytest.approx(0.1)
    assert figures["reached"] is True and figures["form"] == "llama.cpp, tiny.gguf"
    assert read_manifest(path)["hyperparameters"]["verify"] == "llama.cpp"


def test_a_miss_in_llama_cpp_is_never_reported_as_reached(tmp_path, engine):
    engine.after = 0.76  # 0.95x: PyTorch may reach its 0.9x target, llama.cpp misses it
    base = write_tiny_gguf(tmp_path / "tiny.gguf")
    path = forget(str(base), ROWS, tmp_path / "req", config=_settings(until_ratio=0.9, learning_rate=5e-2))
    stopping = read_manifest(path)["stopping"]
    assert stopping["llama_cpp"]["reached"] is False and stopping["llama_cpp"]["missed_by"] > 0
    line = describe_outcome(stopping)
    assert "MISSED" in line and "llama.cpp" in line
    if stopping["stopped"] == "target":
        assert "NOT in llama.cpp" in line


def test_the_stack_is_the_deployed_model_before_the_request(tmp_path, engine):
    base = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = forget(str(base), ROWS[:2], tmp_path / "one", config=_settings(verify="none"))
    forget(str(base), ROWS[2:], tmp_path / "two", stack=[first], config=_settings())
    before, after = engine.calls
    assert len(before["loras"]) == 1 and len(after["loras"]) == 1  # one file each: the stack, the stack + new


def test_verify_llama_cpp_is_refused_up_front(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(UndialConfigError, match="give the model as a .gguf file"):
        forget(tiny_dir, ROWS, tmp_path / "dir", config=_settings())
    monkeypatch.setattr(in_llama_cpp.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv(in_llama_cpp.ENV, raising=False)
    with pytest.raises(UndialConfigError, match="pip install llama-cpp-python"):
        forget(str(write_tiny_gguf(tmp_path / "tiny.gguf")), ROWS, tmp_path / "gguf", config=_settings())
    assert not (tmp_path / "dir").exists() and not (tmp_path / "gguf").exists()
    with pytest.raises(UndialConfigError, match="verify"):
        UndialConfig(verify="vllm")
