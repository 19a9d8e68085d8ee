"""The guard without a retain set: bank prompts in the request's format, answered by the teacher, kept by KL."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from undial_peft import UndialConfig
from undial_peft.data.encoding import encode
from undial_peft.data.packaged import guard_bank
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.data.readers import Example
from undial_peft.deploy.manifest import read_manifest
from undial_peft.errors import UndialConfigError
from undial_peft.tiny import tiny_llama, word_tokenizer
from undial_peft.training import teacher_rows
from undial_peft.training.adapters import NEW, adapter_state, build_trainable, default_lora_config
from undial_peft.training.forget import forget
from undial_peft.training.guard import guard_rows
from undial_peft.training.trainer import UndialTrainer

BANK = guard_bank()


def _bank_model(chat: bool):
    """A random tiny model whose word vocabulary holds every bank word, so prompts encode without <unk>."""
    texts = [row[name] for row in BANK for name in ("question", "stub")]
    tokenizer = word_tokenizer(texts, chat_template=chat)
    return build_trainable(tiny_llama(tokenizer, hidden_size=32, num_layers=1), default_lora_config()), tokenizer


def test_the_bank_spans_many_relations_and_each_subject_is_in_both_prompts():
    assert 60 <= len(BANK) <= 80 and len({row["relation"] for row in BANK}) >= 10
    for row in BANK:
        assert set(row) == {"relation", "subject", "question", "stub"}, row
        assert row["subject"].lower() in row["question"].lower() and row["subject"].lower() in row["stub"].lower(), row
    assert len({row["question"] for row in BANK}) == len(BANK)


@pytest.mark.parametrize("chat", [True, False])
def test_guard_rows_are_asked_in_the_request_format(chat):
    model, tokenizer = _bank_model(chat)
    fmt = PromptFormat.resolve("auto", tokenizer)  # chat where the tokenizer has a template, else completion
    rows = guard_rows(model, tokenizer, "auto", [], teacher_adapters=[], size=13, new_tokens=4)
    assert len(rows) >= 10
    field = "question" if chat else "stub"
    by_prompt = {row[field]: row for row in BANK}
    assert all(row.prompt in by_prompt for row in rows)
    assert len({by_prompt[row.prompt]["relation"] for row in rows}) == len(rows)  # round-robin: one per relation
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for row in rows:
        ids = encode(tokenizer, row, 128, fmt)["input_ids"]
        prompt = fmt.prompt_ids(tokenizer, row.prompt)
        assert ids[: len(prompt)] == prompt
        assert (assistant in prompt) is chat  # the chat template's generation prompt, or the stub verbatim
        if not chat:
            assert prompt == tokenizer(row.prompt).input_ids
            assert "\n" not in row.answer


def test_guard_rows_follow_a_template_with_the_stub():
    model, tokenizer = _bank_model(chat=True)
    rows = guard_rows(model, tokenizer, "Question : {prompt}", [], teacher_adapters=[], size=3, new_tokens=3)
    assert [row.prompt for row in rows] == [row["stub"] for row in BANK[::6][:3]]


def test_guard_rows_leave_out_what_the_request_forgets():
    model, tokenizer = _bank_model(chat=True)
    every = guard_rows(model, tokenizer, "chat", [Example("Who are you?", "Nobody.")], [], size=100, new_tokens=2)
    assert len(every) == len(BANK)  # an unrelated forget row removes nothing
    same_prompt = Example("  what is the CAPITAL of peru ", "Lima.")  # case, spaces and "?" differ
    subject_in_answer = Example("Which gas?", "Neon glows red.")  # the bank's "neon" row asks this subject
    rows = guard_rows(model, tokenizer, "chat", [same_prompt, subject_in_answer], [], size=100, new_tokens=2)
    prompts = {row.prompt for row in rows}
    assert "What is the capital of Peru?" not in prompts
    assert "What is the chemical symbol for neon?" not in prompts
    assert len(rows) == len(BANK) - 2


def test_guard_rows_are_deterministic_and_come_from_the_teacher():
    model, tokenizer = _bank_model(chat=False)
    first = guard_rows(model, tokenizer, "completion", [], teacher_adapters=[], size=8, new_tokens=4)
    assert first == guard_rows(model, tokenizer, "completion", [], teacher_adapters=[], size=8, new_tokens=4)
    for name, param in model.named_parameters():  # a trained new adapter must not change the teacher's answers
        if "lora_B" in name:
            param.data.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    assert guard_rows(model, tokenizer, "completion", [], teacher_adapters=[], size=8, new_tokens=4) == first
    student = guard_rows(model, tokenizer, "completion", [], teacher_adapters=[NEW], size=8, new_tokens=4)
    assert student != first  # the adapter does change the answers, so the check above could fail


def test_guard_settings_are_checked():
    for bad in ({"guard": "retain"}, {"guard_weight": 0.0}, {"guard_weight": float("nan")}, {"guard_rows": 0}):
        with pytest.raises(UndialConfigError, match=next(iter(bad))):
            UndialConfig(**bad)


def _settings(**extra) -> UndialConfig:
    return UndialConfig(**{"max_steps": 3, "until_ratio": None, "auto_key": False, "learning_rate": 1e-2, "seed": 0,
                           "per_device_train_batch_size": 4, "disable_tqdm": True, **extra})


def test_forget_with_the_bank_guard_trains_a_kl_retain_term(tiny_dir, facts, tmp_path, monkeypatch):
    seen = []
    original = UndialTrainer._retain_loss

    def recording(self, model, inputs):
        loss = original(self, model, inputs)
        seen.append((self.args.retain_loss, self.args.retain_weight, loss.item()))
        return loss

    monkeypatch.setattr(UndialTrainer, "_retain_loss", recording)
    path = forget(tiny_dir, facts[:4], tmp_path / "guarded", config=_settings(guard="bank", guard_weight=3.0, guard_rows=8))
    assert seen and all(kind == "kl" and weight == 3.0 for kind, weight, _ in seen)
    assert max(loss for *_, loss in seen) > 0  # zero at step 1 (student == teacher), then the student moves
    manifest = read_manifest(path)
    assert manifest["data"]["guard_rows"] == 8
    assert {k: manifest["hyperparameters"][k] for k in ("guard", "guard_weight", "guard_rows")} == \
        {"guard": "bank", "guard_weight": 3.0, "guard_rows": 8}
    assert manifest["stopping"] == {"stopped": "fixed_length"}  # no retain watch for guard rows


def test_guard_none_asks_nothing_and_bank_changes_the_adapter(tiny_dir, facts, tmp_path, monkeypatch):
    calls = []
    real = teacher_rows.guard_rows
    monkeypatch.setattr(teacher_rows, "guard_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = forget(tiny_dir, facts[:4], tmp_path / "plain", config=_settings(guard="none"))
    assert not calls and "guard_rows" not in read_manifest(plain)["data"]
    guarded = forget(tiny_dir, facts[:4], tmp_path / "guarded", config=_settings(guard="bank", guard_rows=8))
    assert calls
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (plain, guarded))
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-6


def test_guard_is_skipped_with_user_retain_data(tiny_dir, facts, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(teacher_rows, "guard_rows", lambda *a, **k: calls.append(1) or [])
    path = forget(tiny_dir, facts[:4], tmp_path / "kept", retain=facts[12:],
                  config=_settings(guard="bank", retain_weight=1.0, max_retain_drop=None))
    manifest = read_manifest(path)
    assert not calls and "guard_rows" not in manifest["data"] and manifest["hyperparameters"]["guard"] == "none"


@pytest.mark.parametrize(("method", "expected"), [("undial", "neighbours"), ("npo", "none"), ("ga", "none")])
def test_the_default_guard_is_neighbours_for_undial_only(tiny_dir, facts, tmp_path, monkeypatch, method, expected):
    """Baselines run as published; UNDIAL without retain data gets the neighbours guard."""
    calls = []
    real = teacher_rows.guard_rows
    monkeypatch.setattr(teacher_rows, "guard_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = forget(tiny_dir, facts[:4], tmp_path / method, config=_settings(method=method, guard_rows=8))
    manifest = read_manifest(path)
    assert manifest["hyperparameters"]["guard"] == expected
    assert bool(calls) == (expected == "neighbours")
    assert ("guard_rows" in manifest["data"]) == (expected == "neighbours")


def test_an_epoch_run_keeps_its_epoch_at_the_forget_rows(tiny_dir, facts, tmp_path):
    """Guard rows pair with forget rows: 64 of them must not stretch a fixed-epoch run 16-fold."""
    config = UndialConfig(max_steps=-1, num_train_epochs=2, until_ratio=None, auto_key=False, seed=0,
                          per_device_train_batch_size=4, disable_tqdm=True, guard="neighbours")
    path = forget(tiny_dir, facts[:4], tmp_path / "epochs", config=config)
    manifest = read_manifest(path)
    assert manifest["data"]["guard_rows"] == 4
    assert manifest["metrics"]["steps"] == 2  # 4 rows, batch 4, 2 epochs


def _stacked_model(tiny_dir, tmp_path):
    """The tiny model with one random frozen adapter ("stack_0") and a fresh zero NEW adapter on top."""
    from conftest import random_adapters
    from peft import LoraConfig

    from undial_peft.models import load_model

    stack = random_adapters(tiny_dir, tmp_path, [LoraConfig(r=4, target_modules=["q_proj", "v_proj"])])
    base, tokenizer = load_model(tiny_dir)
    return build_trainable(base, default_lora_config(), stack), tokenizer


def _first_retain_loss(model, tokenizer, dataset, args, anchor):
    """The trainer's retain loss on its first batch (teacher cache as ``args`` says), and that batch."""
    from undial_peft.data.encoding import Collator

    trainer = UndialTrainer(model=model, args=args, train_dataset=dataset, stack=["stack_0"], retain_teacher=anchor,
                            data_collator=Collator(tokenizer.pad_token_id))
    trainer.teacher_cache = trainer._build_teacher_cache()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which these tests skip
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return trainer._retain_loss(model, batch).item(), batch


def _base_to_stack_kl(model, batch):
    """Reference in float64 from full logits: KL(base || stack) per retain answer position (N,), and the (B, T-1) mask."""
    retain = {"input_ids": batch["retain_input_ids"], "attention_mask": batch["retain_attention_mask"]}
    mask = batch["retain_labels"][:, 1:] != -100  # (B, T-1): positions predicting an answer token
    with torch.no_grad():
        with adapter_state(model, active=[]):
            teacher = model(**retain).logits[:, :-1][mask].double().log_softmax(-1)  # (N, V)
        student = model(**retain).logits[:, :-1][mask].double().log_softmax(-1)  # (N, V), NEW is still zero
    return (teacher.exp() * (teacher - student)).sum(-1), mask


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_a_guard_anchored_on_the_base_takes_its_kl_against_the_base_not_the_stack(tiny_dir, facts, tmp_path, cache):
    from undial_peft.data.encoding import build_dataset

    model, tokenizer = _stacked_model(tiny_dir, tmp_path)
    rows = [Example(f["question"], f["answer"]) for f in facts]
    dataset = build_dataset(tokenizer, rows[:4], rows[4:8], max_length=64)
    args = _settings(retain_loss="kl", retain_weight=1.0, teacher_cache=cache, output_dir=str(tmp_path / "ckpt"))
    stack, _ = _first_retain_loss(model, tokenizer, dataset, args, None)  # the default anchor: the stack
    base, batch = _first_retain_loss(model, tokenizer, dataset, args, [])
    per_position, mask = _base_to_stack_kl(model, batch)
    reference = per_position.sum().item() / mask.sum().item()
    assert stack == pytest.approx(0.0, abs=1e-6)  # student = stack + a zero adapter
    assert base == pytest.approx(reference, rel=1e-4) and reference > 1e-4


def test_a_base_anchored_guard_leaves_out_answers_the_stack_forgot_on_purpose(monkeypatch):
    from undial_peft.training import guard as guard_module

    model, tokenizer = _bank_model(chat=False)
    rows = [Example(BANK[i]["stub"], " x") for i in range(3)]
    per_token = {  # per row: answer-token probabilities under the base, then under the stack
        "base": [[0.9, 0.8], [0.9, 0.8], [0.5, 0.5]],
        "stack": [[0.45, 0.8], [0.9, 0.08], [0.5, 0.16]],  # 0.5x (drift: kept), 0.1x (forgotten), 0.32x (kept)
    }
    calls = []

    def answer_logprobs(model, features, pad):
        name = "base" if not calls else "stack"
        calls.append(name)
        return [torch.tensor(p).log() for p in per_token[name]]

    monkeypatch.setattr(guard_module, "_answer_logprobs", answer_logprobs)
    kept = guard_module.drop_forgotten(model, tokenizer, rows, "completion", stack=["stack_0"])
    assert kept == [rows[0], rows[2]] and calls == ["base", "stack"]
    assert guard_module.drop_forgotten(model, tokenizer, rows, "completion", stack=[]) == rows and len(calls) == 2


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_the_guard_kl_weighs_its_fact_tokens_one_plus_k_times(tiny_dir, facts, tmp_path, cache):
    from undial_peft.data.encoding import build_dataset

    model, tokenizer = _stacked_model(tiny_dir, tmp_path)
    rows = [Example(f["question"], f["answer"]) for f in facts]
    retain = rows[4:8]
    # Fact tokens: the last answer token of rows 0 and 2; rows 1 and 3 have none (None: no key found).
    answers = [sum(label != -100 for label in encode(tokenizer, r, 64)["labels"]) for r in retain]
    keys = [[0.0] * (n - 1) + [1.0] if i % 2 == 0 else None for i, n in enumerate(answers)]
    dataset = build_dataset(tokenizer, rows[:4], retain, max_length=64, retain_keys=keys)
    assert [sum(k) for k in dataset["retain_key"]] == [1.0, 0.0, 1.0, 0.0]
    assert all(len(k) == len(ids) for k, ids in zip(dataset["retain_key"], dataset["retain_input_ids"]))
    losses = {}
    for weight in (0.0, 4.0):  # the KL against the base, so it is not zero
        args = _settings(retain_loss="kl", retain_weight=1.0, teacher_cache=cache, guard_key_weight=weight,
                         output_dir=str(tmp_path / "ckpt"))
        losses[weight], batch = _first_retain_loss(model, tokenizer, dataset, args, [])
    per_position, mask = _base_to_stack_kl(model, batch)
    fact = batch["retain_key"][:, 1:][mask].double()  # (N,)
    assert fact.sum() == 2  # the batch holds both keyed rows
    for weight, loss in losses.items():
        reference = ((1 + weight * fact) * per_position).sum().item() / mask.sum().item()
        assert loss == pytest.approx(reference, rel=1e-4)
    assert losses[4.0] > losses[0.0] * 1.01


def test_forget_finds_the_guard_answers_fact_tokens_only_when_weighed(tiny_dir, facts, tmp_path, monkeypatch):
    seen = []
    real = teacher_rows.auto_key_weights
    monkeypatch.setattr(teacher_rows, "auto_key_weights", lambda m, t, rows, **k: seen.append(len(rows)) or real(m, t, rows, **k))
    forget(tiny_dir, facts[:4], tmp_path / "plain", config=_settings(guard="bank", guard_rows=8, guard_key_weight=0.0))
    assert seen == []  # auto_key=False in _settings, and K = 0: no key search at all
    path = forget(tiny_dir, facts[:4], tmp_path / "weighed", config=_settings(guard="bank", guard_rows=8,
                                                                               guard_key_weight=10.0))
    assert seen == [8]  # the guard's own answers, not the forget rows
    assert read_manifest(path)["hyperparameters"]["guard_key_weight"] == 10.0
    with pytest.raises(UndialConfigError, match="guard_key_weight"):
        UndialConfig(guard_key_weight=-1.0)


def test_a_guard_fact_token_the_request_lowers_is_not_weighed(monkeypatch):
    tokenizer = word_tokenizer(["Mexico speaks Spanish . Spain speaks Spanish . Peru speaks Spanish . Brazil speaks Portuguese ."])
    guard = [Example("Mexico ?", "Mexico speaks Spanish ."), Example("Brazil ?", "Brazil speaks Portuguese ."),
             Example("Peru ?", "Spanish")]
    # Every guard answer token a fact token, so the test sees exactly which ones the request's keys remove.
    monkeypatch.setattr(teacher_rows, "auto_key_weights",
                        lambda model, tok, rows, **k: [[1.0] * len(tok(r.answer, add_special_tokens=False).input_ids)
                                                       for r in rows])
    forget_row = encode(tokenizer, Example("Spain ?", "Spain speaks Spanish .", "Spanish"), 32)
    model = build_trainable(tiny_llama(tokenizer, hidden_size=32, num_layers=1), default_lora_config())
    keys = teacher_rows.guard_keys(model, tokenizer, guard, UndialConfig(guard_key_weight=3.0), [], [forget_row])
    assert keys == [[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], None]  # " Spanish" left at 1x; nothing else left: None
    assert teacher_rows.guard_keys(model, tokenizer, guard, UndialConfig(guard_key_weight=0.0), [], [forget_row]) is None


def test_the_forget_rows_and_the_guard_share_one_neutral_prior(tiny_dir, facts, tmp_path, monkeypatch):
    priors = []
    real = teacher_rows.neutral_prior
    monkeypatch.setattr(teacher_rows, "neutral_prior", lambda *a, **k: priors.append(1) or real(*a, **k))
    forget(tiny_dir, facts[:4], tmp_path / "shared",
           config=_settings(guard="bank", guard_rows=8, guard_key_weight=3.0, auto_key=True))
    assert len(priors) == 1  # the forget rows' key search found it; the guard's, under the same teacher, reused it
    forget(tiny_dir, facts[:4], tmp_path / "base", config=_settings(guard="bank", guard_rows=8, guard_key_weight=3.0,
                                                                     auto_key=True, guard_teacher="base"))
    assert len(priors) == 2  # anchored on the base, with no stack: the base is the teacher, still one prior
    keyed = [{**f, "key": f["answer"].split()[-1]} for f in facts[:4]]
    forget(tiny_dir, keyed, tmp_path / "keyed", config=_settings(guard="none", auto_key=True))
    assert len(priors) == 2  # every row has its own key: no search, no prior
