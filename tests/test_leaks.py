"""No forget text in anything eval (with attacks), stack export and stack merge write or log.

`tests/test_reliability.py` scans what `forget` writes (adapters, checkpoints, logs) and
`tests/test_bench.py` what the benchmark writes; this covers the other verbs.
"""

from __future__ import annotations

import json
import logging

from conftest import forget_text, leak_hits, leak_scan

from undial_peft import UndialConfig, forget
from undial_peft.cli import main

# A saved tokenizer holds the base vocabulary, whose words include the fictitious names: those
# files are scanned for whole questions and answers only.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")


def test_eval_export_merge_write_and_log_no_forget_text(tiny_dir, facts, tmp_path, capfd):
    inputs, root = tmp_path / "inputs", tmp_path / "out"  # the forget data itself lives outside root
    inputs.mkdir()
    data, retain = inputs / "forget.jsonl", inputs / "retain.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in facts[:4]), encoding="utf-8")
    retain.write_text("".join(json.dumps(f) + "\n" for f in facts[12:16]), encoding="utf-8")
    needles = forget_text(facts[:4])
    sentences = needles[:8]  # the questions and answers themselves
    assert leak_hits(data.read_bytes(), needles) == needles  # the scan finds the text where it is

    adapter = str(forget(tiny_dir, str(data), root / "adapters" / "req", config=UndialConfig(
        max_steps=2, per_device_train_batch_size=4, disable_tqdm=True)))
    try:
        assert main(["-v", "eval", "--model", tiny_dir, "--adapters", adapter, "--forget", str(data), "--retain",
                     str(retain), "--max-new-tokens", "6", "--attacks", "relearn", "reveal_prompt", "multiple_choice",
                     "--out", str(root / "report.json")]) == 0
        assert main(["-v", "stack", "export", "--model", tiny_dir, "--out", str(root / "exported"), adapter]) == 0
        assert main(["-v", "stack", "merge", "--model", tiny_dir, "--out", str(root / "merged"), adapter]) == 0
    finally:
        logging.getLogger().setLevel(logging.WARNING)  # -v set DEBUG on the root logger
    logs = capfd.readouterr()
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert "report.json" in written and any(p.startswith("merged/") for p in written)
    assert any(p.startswith("exported/") for p in written)
    assert leak_scan(root, needles, skip=TOKENIZER_FILES) == {}
    assert leak_scan(root, sentences) == {}
    assert logs.out.strip() and leak_hits(logs.out + logs.err, needles) == []
