"""Cached teacher == live teacher: loss, gradients and whole training runs; and each fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from undial_peft import UndialConfig
from undial_peft.data.encoding import Collator, build_dataset, with_forget_rows
from undial_peft.data.readers import read_examples
from undial_peft.errors import UndialTrainingError
from undial_peft.models import load_model
from undial_peft.training import teacher_cache
from undial_peft.training.adapters import adapter_state, build_trainable, default_lora_config
from undial_peft.training.forget import forget
from undial_peft.training.trainer import UndialTrainer

TOL = 1e-5


def _rows(facts: list[dict[str, str]]) -> list[dict[str, str]]:
    """Forget rows of different lengths (so batches pad) and a text row (every token counts)."""
    rows = [dict(f) for f in facts[4:10]]
    rows[1]["answer"] += " " + facts[11]["answer"]
    rows[3]["answer"] += " " + facts[12]["answer"] + " " + facts[13]["answer"]
    rows[5] = {"text": facts[14]["question"] + " " + facts[14]["answer"]}
    return rows


@pytest.fixture(scope="module")
def stack_dir(tiny_dir, facts, tmp_path_factory) -> str:
    """One earlier forget adapter: the teacher of the next request runs with it on."""
    out = tmp_path_factory.mktemp("stack") / "req-0"
    # No guard: the stack's values must not move with the guard's defaults, which these tests do not test
    # (with guard_weight 2 the resumed-vs-live gap at lr 1e-2 grew from < 1e-4 to 3.7e-4).
    config = UndialConfig(max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4, disable_tqdm=True,
                          logging_steps=100, guard="none")
    return str(forget(tiny_dir, facts[:4], out, config=config))


def _trainer(tiny_dir, facts, tmp_path, stack=(), retain=None, lora=None, **overrides):
    base, tokenizer = load_model(tiny_dir)
    torch.manual_seed(0)
    model = build_trainable(base, lora or default_lora_config(), stack)
    defaults = {"max_steps": 4, "per_device_train_batch_size": 3, "learning_rate": 1e-2, "disable_tqdm": True,
                "logging_steps": 100, "seed": 5}
    config = UndialConfig(output_dir=str(tmp_path / "ckpt"), **{**defaults, **overrides})
    retain_rows = read_examples(retain, "retain") if retain else None
    dataset = build_dataset(tokenizer, read_examples(_rows(facts)), retain_rows, max_length=64)
    return UndialTrainer(model=model, args=config, train_dataset=dataset, data_collator=Collator(tokenizer.pad_token_id),
                         stack=[f"stack_{i}" for i in range(len(stack))])


def _new_adapter(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-12) for k in a)
    assert worst <= tol, worst


@pytest.mark.parametrize("method", ["undial", "npo", "kl_retain"])
def test_cached_loss_and_gradients_equal_live_on_a_stack_with_padding_and_shuffling(
        tiny_dir, facts, stack_dir, tmp_path, method):
    extra = ({"method": "undial", "retain_weight": 1.0, "retain_loss": "kl"} if method == "kl_retain"
             else {"method": method})
    retain = facts[12:16] if method == "kl_retain" else None
    trainer = _trainer(tiny_dir, facts, tmp_path, stack=[stack_dir], retain=retain, **extra)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name and param.requires_grad:
            param.data.normal_(0, 0.05)  # student != teacher
    trainer.teacher_cache = trainer._build_teacher_cache()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); NPO reads it
    assert trainer.teacher_cache is not None
    batch = next(iter(trainer.get_train_dataloader()))
    index = batch[teacher_cache.INDEX].tolist()
    assert index != sorted(index), "the batch should be shuffled"
    widths = batch["attention_mask"].sum(-1)
    assert widths.min() < widths.max(), "the batch should be padded"
    cached = _loss_and_grads(trainer, batch)
    live_cache, trainer.teacher_cache = trainer.teacher_cache, None
    live = _loss_and_grads(trainer, batch)
    assert cached[0].item() == pytest.approx(live[0].item(), rel=TOL)
    _assert_close(cached[1], live[1])
    # the cache really is read: a wrong row order gives another loss
    if live_cache.hidden is not None:
        trainer.teacher_cache = live_cache
        batch[teacher_cache.INDEX] = batch[teacher_cache.INDEX].flip(0)
        try:
            wrong = trainer.compute_loss(trainer.model, batch).item()
        except UndialTrainingError:  # the rows' counted lengths no longer fit the batch
            wrong = None
        assert wrong is None or wrong != pytest.approx(live[0].item(), rel=TOL)


def test_training_with_the_cache_equals_live_under_accumulation(tiny_dir, facts, stack_dir, tmp_path, caplog):
    runs = {}
    for mode in ("auto", "off"):
        with caplog.at_level(logging.INFO, logger="undial_peft.training.trainer"):
            trainer = _trainer(tiny_dir, facts, tmp_path / mode, stack=[stack_dir], teacher_cache=mode,
                               gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=3)
            trainer.train()
        runs[mode] = _new_adapter(trainer)
    assert "teacher cache: " in caplog.text and "in memory for 6 rows (hidden)" in caplog.text
    _assert_close(runs["auto"], runs["off"], tol=1e-4)
    assert max((v - 0).abs().max().item() for k, v in runs["auto"].items() if "lora_B" in k) > 1e-3, "nothing trained"


def test_resume_with_the_cache_equals_an_uninterrupted_live_run(tiny_dir, facts, stack_dir, tmp_path):
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2}
    live = _trainer(tiny_dir, facts, tmp_path / "live", stack=[stack_dir], teacher_cache="off", **settings)
    live.train()
    first = _trainer(tiny_dir, facts, tmp_path / "run", stack=[stack_dir], **settings)
    first.train()
    resumed = _trainer(tiny_dir, facts, tmp_path / "run", stack=[stack_dir], **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "ckpt" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    _assert_close(_new_adapter(resumed), _new_adapter(live), tol=1e-4)


def test_disk_storage_is_mapped_unlinked_and_equal(tiny_dir, facts, tmp_path):
    trainer = _trainer(tiny_dir, facts, tmp_path, teacher_cache="disk")
    cache = trainer._build_teacher_cache()
    assert cache is not None and "memory-mapped" in cache.where
    assert not any(p.name.startswith(".teacher-cache-") for p in (tmp_path / "ckpt").iterdir()), "file left behind"
    memory = _trainer(tiny_dir, facts, tmp_path / "m", teacher_cache="memory")._build_teacher_cache()
    assert torch.allclose(cache.hidden.values, memory.hidden.values, atol=1e-6)
    assert torch.equal(cache.hidden.offsets, memory.hidden.offsets)


def _fallback(trainer, caplog) -> str:
    with caplog.at_level(logging.WARNING, logger="undial_peft.training.trainer"):
        assert trainer._build_teacher_cache() is None
    return caplog.text


def test_fallback_for_lora_dropout_on_a_stack_adapter(tiny_dir, facts, stack_dir, tmp_path, caplog):
    trainer = _trainer(tiny_dir, facts, tmp_path, stack=[stack_dir])
    lora = next(m for m in trainer.model.modules() if hasattr(m, "lora_dropout"))
    lora.lora_dropout["stack_0"] = torch.nn.Dropout(0.1)
    assert "LoRA dropout p=0.1 on stack adapter 'stack_0'" in _fallback(trainer, caplog)


def test_new_adapter_dropout_keeps_the_cache(tiny_dir, facts, tmp_path):
    lora = default_lora_config()
    lora.lora_dropout = 0.1  # the teacher runs without the new adapter: its dropout does not matter
    assert _trainer(tiny_dir, facts, tmp_path, lora=lora)._build_teacher_cache() is not None


def test_fallback_for_base_dropout(tiny_dir, facts, tmp_path, caplog):
    # Heads that scale or soft-cap logits: tests/test_logit_heads.py.
    trainer = _trainer(tiny_dir, facts, tmp_path)
    trainer.model.config.attention_dropout = 0.1
    assert "attention_dropout=0.1 makes the teacher random" in _fallback(trainer, caplog)


def test_npo_cache_holds_with_full_logits(tiny_dir, facts, tmp_path):
    trainer = _trainer(tiny_dir, facts, tmp_path, method="npo", loss_chunk_size=0)
    cache = trainer._build_teacher_cache()
    assert cache is not None and cache.hidden is None and cache.logprob.shape == (6,)


def test_fallback_when_the_cache_is_too_big(tiny_dir, facts, tmp_path, caplog, monkeypatch):
    trainer = _trainer(tiny_dir, facts, tmp_path)
    monkeypatch.setattr(teacher_cache, "MEMORY_LIMIT", 100)
    monkeypatch.setattr(teacher_cache, "DISK_SHARE", 0.0)
    assert "over the 0 MiB memory limit" in _fallback(trainer, caplog)


def test_storage_rule():
    folder = __import__("pathlib").Path(".")
    assert teacher_cache.choose_storage(10, "auto", folder, memory_limit=100)[0] == "memory"
    assert teacher_cache.choose_storage(1000, "auto", folder, memory_limit=100)[0] == "disk"
    assert teacher_cache.choose_storage(1000, "memory", folder, memory_limit=100)[0] == "memory"
    assert teacher_cache.choose_storage(2**62, "auto", folder, memory_limit=100)[0] is None
    # 1,000 rows x 20 answer tokens x 576 x 4 bytes: the README's SmolLM2-135M example
    assert teacher_cache.estimate_bytes(torch.full((1000,), 20), 576, 4) == 46_080_000


def test_the_kl_retain_term_equals_kl_of_the_full_logits(tiny_dir, facts, tmp_path):
    """Answer-position logits from hidden states give the KL of the model's own full logits (float64 reference)."""
    trainer = _trainer(tiny_dir, facts, tmp_path, retain=facts[12:16], method="undial", retain_weight=1.0,
                       retain_loss="kl", teacher_cache="off")
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name and param.requires_grad:
            param.data.normal_(0, 0.05)  # student != teacher
    trainer.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {"input_ids": batch["retain_input_ids"], "attention_mask": batch["retain_attention_mask"]}
    with torch.no_grad():
        student = trainer.model(**inputs).logits.double()  # (B, T, V)
        with adapter_state(trainer.model, active=[]):
            teacher = trainer.model(**inputs).logits.double()  # (B, T, V)
    labels = batch["retain_labels"]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100  # logits at t predict label t + 1
    p_teacher = teacher[mask].softmax(-1)  # (N, V)
    reference = (p_teacher * (p_teacher.log() - student[mask].log_softmax(-1))).sum(-1).mean()
    with torch.no_grad():
        fused = trainer._retain_loss(trainer.model, batch)
    assert trainer._plain_head() and reference.item() > 1e-4
    assert fused.item() == pytest.approx(reference.item(), rel=1e-4)


def test_the_pass_answers_each_distinct_row_once_and_copies_the_repeats(tiny_dir, facts, tmp_path):
    """10 retain rows pair with 6 forget rows repeated: the teacher sees 6 + 10 rows, not 2 x 10, and every
    stored row equals the teacher's own hidden states for that row, asked alone."""
    retain = facts[:4] + facts[10:16]
    trainer = _trainer(tiny_dir, facts, tmp_path, retain=retain, retain_weight=1.0, retain_loss="kl")
    assert trainer._plain_head()  # measured once, with a teacher forward of its own: before the count
    answered: list[int] = []
    teacher = trainer._teacher

    def counting(*args, **batch):
        answered.append(len(batch["input_ids"]))
        return teacher(*args, **batch)

    trainer._teacher = counting
    cache = trainer._build_teacher_cache()
    assert len(trainer.train_dataset) == 10 and sum(answered) == 6 + 10
    collate = trainer.data_collator.inner
    for i in range(10):
        batch = collate([{k: v for k, v in trainer.train_dataset[i].items() if k != teacher_cache.INDEX}])
        for prefix, rows in (("", cache.hidden), ("retain_", cache.retain_hidden)):
            out = teacher(trainer.model, input_ids=batch[f"{prefix}input_ids"], output_hidden_states=True)
            mask = batch[f"{prefix}labels"][:, 1:] != -100  # (1, T-1): the positions the loss reads
            alone = out.hidden_states[-1][:, :-1][mask]  # (N, H)
            assert torch.allclose(rows.gather(torch.tensor([i])), alone, atol=1e-5), (prefix, i)


@pytest.mark.parametrize("method", ["undial", "npo"])
def test_a_grown_set_borrows_the_rows_an_earlier_cache_holds(tiny_dir, facts, tmp_path, method):
    """A silence round's set: the first set plus 2 new forget rows paired with its retain rows. The second
    pass answers only the 2 new rows; every stored value equals a cache built from scratch."""
    retain = facts[:4] + facts[10:16]
    first = _trainer(tiny_dir, facts, tmp_path, retain=retain, retain_weight=1.0, retain_loss="kl", method=method)
    first._plain_head()
    first.teacher_cache = first._build_teacher_cache()
    _, tokenizer = load_model(tiny_dir)
    extra = build_dataset(tokenizer, read_examples(facts[2:4]), max_length=64).to_list()
    plain = first.train_dataset.remove_columns(teacher_cache.INDEX)
    grown = with_forget_rows(plain, extra)

    def second(earlier):
        trainer = UndialTrainer(model=first.model, args=first.args, train_dataset=grown, data_collator=Collator(tokenizer.pad_token_id),
                                stack=first.stack, earlier=earlier)
        trainer._plain_head()
        answered: list[int] = []
        teacher = trainer._teacher
        trainer._teacher = lambda *a, **b: answered.append(len(b["input_ids"])) or teacher(*a, **b)
        return trainer._build_teacher_cache(), sum(answered)

    lent, answered = second(first)
    fresh, answered_fresh = second(None)
    assert answered == 2 and answered_fresh == 6 + 10 + 2  # forget rows 6 + 2, retain rows 10, each once
    index = torch.arange(len(grown))
    for part in ("hidden", "retain_hidden"):
        if getattr(fresh, part) is not None:
            assert torch.allclose(getattr(lent, part).gather(index), getattr(fresh, part).gather(index), atol=TOL), part
    if method == "npo":
        assert torch.allclose(lent.logprob, fresh.logprob, atol=TOL)
