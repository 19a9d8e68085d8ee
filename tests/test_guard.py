"""The guard without a retain set: bank prompts in the request's format, answered by the teacher, kept by KL."""

from __future__ import annotations

import pytest
import torch

from undial_peft.data.encoding import encode
from undial_peft.data.packaged import guard_bank
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.data.readers import Example
from undial_peft.tiny import tiny_llama, word_tokenizer
from undial_peft.training.adapters import NEW, build_trainable, default_lora_config
from undial_peft.training.guard import guard_rows

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
