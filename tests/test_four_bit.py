"""4-bit (bitsandbytes NF4) LoRA gradients equal those of an fp32 model holding the dequantised weights,
with the full-logit loss and with the fused head loss; on CUDA where present, on CPU otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from undial_peft.data.encoding import Collator, encode
from undial_peft.data.readers import read_examples
from undial_peft.evals.report import score
from undial_peft.models import four_bit_config, load_model
from undial_peft.training.adapters import adapter_state, build_trainable, default_lora_config
from undial_peft.training.loss import undial_loss, undial_loss_from_hidden
from undial_peft.training.silence import ROUND_STEPS

bnb = pytest.importorskip("bitsandbytes")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lora_grads(model, batch, fused: bool) -> dict[str, torch.Tensor]:
    """UNDIAL loss after a teacher pass, as the trainer runs it; returns LoRA gradients by name."""
    head = {"output_hidden_states": True, "logits_to_keep": 1} if fused else {}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **head}  # no labels: no HF loss
    with torch.no_grad(), adapter_state(model, active=[]):
        teacher = model(**inputs)
    model.zero_grad()
    student = model(**inputs)
    if fused:  # (B, T, H) hidden states through the chunked head, as with loss_chunk_size > 0
        loss = undial_loss_from_hidden(student.hidden_states[-1], teacher.hidden_states[-1],
                                       model.get_output_embeddings(), batch["labels"], beta=10.0, chunk_size=8)
    else:  # (B, T, V) logits
        loss = undial_loss(student.logits, teacher.logits, batch["labels"], beta=10.0)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [False, True], ids=["full-logits", "fused-head"])
def test_four_bit_lora_gradients_match_dequantised_fp32(tiny_dir, facts, fused):
    quantised, tokenizer = load_model(tiny_dir, load_in_4bit=True)  # on CUDA when present (device_map)
    layers = [m for m in quantised.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "nothing was quantised"
    assert quantised.device.type == DEVICE.type
    dense, _ = load_model(tiny_dir)
    dense_modules = dict(dense.named_modules())
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense_modules[name].weight.data.copy_(weight.float().cpu())
    dense.to(DEVICE)
    models = [build_trainable(m, default_lora_config()) for m in (quantised, dense)]
    torch.manual_seed(0)
    shared = {name: torch.randn_like(p) * 0.05 for name, p in models[1].named_parameters() if p.requires_grad}
    for model in models:
        for name, param in model.named_parameters():
            if name in shared:
                param.data.copy_(shared[name])  # same non-zero LoRA weights in both
    rows = read_examples(facts[:4])
    # An eval-mode no-grad forward first: on AVX512-BF16 CPUs this is what corrupts later gradients.
    score(models[0], tokenizer, rows)
    batch = Collator(tokenizer.pad_token_id)([encode(tokenizer, row, 64) for row in rows])
    batch = {key: batch[key].to(DEVICE) for key in ("input_ids", "attention_mask", "labels")}  # where the models are
    got, want = (_lora_grads(model.train(), batch, fused) for model in models)
    assert got.keys() == want.keys()
    worst = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)
    print(f"4-bit vs dequantised fp32 LoRA gradients ({DEVICE.type}, {'fused' if fused else 'full'} loss): "
          f"worst relative error {worst:.2e} over {len(want)} tensors")
    assert worst <= 1e-4, worst


def test_an_already_loaded_four_bit_model_gets_cpu_repacking_disabled(tiny_dir):
    """load_model returns a caller's model as is, but must still switch off bitsandbytes' CPU repacking."""
    _, tokenizer = load_model(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=four_bit_config())
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(hasattr(m, "support_avx512bf16_for_cpu") for m in layers)
    for module in layers:
        module.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on a CPU with AVX512-BF16
    returned, _ = load_model(model, tokenizer=tokenizer)
    assert returned is model
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


def test_a_four_bit_run_is_measured_on_the_full_precision_base_it_is_served_on(tiny_dir, facts, tmp_path):
    """forget --4bit records the forget rows' key probability on the float32 base (as `attach` serves the
    adapter), measured independently here; the stopping line never calls a target reached there that is not."""
    from undial_peft import UndialConfig, attach, forget
    from undial_peft.deploy.manifest import read_manifest
    from undial_peft.training.stopping import describe_outcome, key_probabilities

    rows = facts[:4]
    config = UndialConfig(max_steps=3, min_steps=0, until_ratio=0.9, auto_key=False, learning_rate=1e-2, beta=3.0)
    out = forget(tiny_dir, rows, tmp_path / "req-4bit", config=config, load_in_4bit=True)
    deployed = read_manifest(out)["deployed"]
    assert deployed["form"] == "full-precision base (float32)"

    served = attach(tiny_dir, [out])  # float32 base + the adapter, as deployed
    tokenizer = served.tokenizer
    features = [encode(tokenizer, e, 512, "auto") for e in read_examples(rows)]
    after = float(key_probabilities(served, features, tokenizer.pad_token_id).mean())
    with served.disable_adapter():
        before = float(key_probabilities(served, features, tokenizer.pad_token_id).mean())
    assert deployed["forget_before"] == pytest.approx(before, rel=1e-5)
    assert deployed["forget_after"] == pytest.approx(after, rel=1e-5)
    assert deployed["reached"] == (after <= 0.9 * before)

    outcome = {"stopped": "target", "step": 3, "forget_before": 0.8, "forget_after": 0.1, "target": 0.16,
               "deployed": {**deployed, "forget_before": 0.7, "forget_after": 0.3, "target": 0.14, "reached": False,
                            "missed_by": 0.16}}
    line = describe_outcome(outcome)
    assert "NOT as served" in line and "MISSED by 0.160" in line and "target reached;" not in line


def test_a_four_bit_miss_as_served_trains_on_at_full_precision(tiny_dir, facts, tmp_path, monkeypatch):
    """Where the float32 base misses the target, training goes on there and that adapter is saved."""
    from undial_peft import UndialConfig, forget
    from undial_peft.deploy.manifest import read_manifest
    from undial_peft.training import forget as api

    measured = []

    def first_misses(served, rows, tokenizer, one_line, before=None):
        figures = real(served, rows, tokenizer, one_line, before)
        measured.append(figures)
        return {**figures, "forget_after": figures["forget_before"]} if len(measured) == 1 else figures

    real = api.measure_served
    monkeypatch.setattr(api, "measure_served", first_misses)
    config = UndialConfig(max_steps=2, min_steps=0, until_ratio=0.9, auto_key=False, learning_rate=1e-2, beta=3.0)
    out = forget(tiny_dir, facts[:4], tmp_path / "req-4bit", config=config, load_in_4bit=True)
    manifest = read_manifest(out)
    deployed = manifest["deployed"]
    assert len(measured) == 2 and deployed["before_finish"]["reached"] is False
    assert 1 <= deployed["finish_steps"] <= 2
    assert manifest["metrics"]["steps"] == manifest["stopping"]["step"] + deployed["finish_steps"]
    assert deployed["forget_after"] == pytest.approx(measured[1]["forget_after"])  # measured after the finish


def test_a_four_bit_run_counts_greedy_answers_on_the_served_base(tiny_dir, facts, tmp_path):
    """The served figures say how many greedy answers still name their key, counted on the float32 base;
    checked against greedy answers taken independently from the saved adapter attached as served."""
    from undial_peft import UndialConfig, attach, forget
    from undial_peft.deploy.manifest import read_manifest
    from undial_peft.evals.report import greedy_answers
    from undial_peft.training.silence import says

    rows = [{**f, "key": f["answer"].split()[-1].rstrip(".")} for f in facts[:4]]  # keyed on the city
    config = UndialConfig(max_steps=3, min_steps=0, until_ratio=0.9, learning_rate=1e-2, beta=3.0, silence_rounds=0,
                          finish_on_served=False)
    out = forget(tiny_dir, rows, tmp_path / "req-4bit", config=config, load_in_4bit=True)
    deployed = read_manifest(out)["deployed"]

    def said(model, tokenizer) -> int:
        answers = greedy_answers(model, tokenizer, [r["question"] for r in rows], max_new_tokens=32, batch_size=1)
        return sum(says(a, r["key"]) for a, r in zip(answers, rows))

    base, tokenizer = load_model(tiny_dir)
    assert deployed["asked"] == 4
    assert deployed["said_before"] == said(base, tokenizer) == 4  # the memorised tiny model says every city
    assert deployed["said_after"] == said(attach(base, [out], tokenizer=tokenizer), tokenizer)


def test_served_answers_that_still_say_a_key_get_silence_rounds_at_full_precision(tiny_dir, facts, tmp_path):
    """A 4-bit run whose target holds as served, but whose served greedy answers still say a key, trains on
    at the served precision with silence rounds on the served model's own answers."""
    from undial_peft import UndialConfig, forget
    from undial_peft.deploy.manifest import read_manifest

    rows = [{**f, "key": f["answer"].split()[-1].rstrip(".")} for f in facts[:4]]
    # A weak target (0.95x) holds as served within 4 steps while the memorised tiny model still says a city.
    config = UndialConfig(max_steps=4, min_steps=0, until_ratio=0.95, learning_rate=3e-3, silence_rounds=1)
    out = forget(tiny_dir, rows, tmp_path / "req-4bit", config=config, load_in_4bit=True)
    manifest = read_manifest(out)
    deployed = manifest["deployed"]
    first = deployed["before_finish"]
    assert first["reached"] is True and first["said_after"] > 0  # the case this covers: met, yet still said
    assert deployed["silence"]["asked"] == 4 and deployed["silence"]["rounds"] == 1
    assert deployed["finish_steps"] >= deployed["silence"]["steps"] == ROUND_STEPS
    assert manifest["metrics"]["steps"] == (manifest["stopping"]["step"] + deployed["finish_steps"])
