"""Real facts on SmolLM2-135M-Instruct: what `forget` does from its defaults, one request and three stacked.

Facts: ``undial_peft/data/real_facts.jsonl`` (chemical symbols, official languages, inventors,
capitals, authors; each answer in the model's lead-in style, kept only if the model gives its key
probability >= 0.5) plus the demo's keep set (same templates: capitals, chemical symbols, ...).
Requests are plain question/answer rows (no ``key``), as a new user would write them.

    python examples/real_facts.py                      # both tables
    python examples/real_facts.py --table single       # (a) one request (chemistry): defaults vs variants
    python examples/real_facts.py --table stack        # (b) chemistry, languages, inventors stacked, defaults
    python examples/real_facts.py --variants defaults "no auto keys" --out real_facts.json
    python examples/real_facts.py --table keys         # automatic keys vs the hand keys (~1 min)

Printed: mean answer probability and mean key probability (the hand key, given the answer so far)
per topic, before and after, with the wall time of each `forget` call and why it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from undial_peft import UndialConfig, forget
from undial_peft.data.encoding import encode
from undial_peft.data.packaged import demo_facts, real_facts
from undial_peft.data.readers import Example
from undial_peft.deploy.manifest import read_manifest
from undial_peft.deploy.stack import attach
from undial_peft.models import load_model
from undial_peft.training.answer_keys import key_mask, neutral_prior, token_report
from undial_peft.training.stopping import key_probabilities

STACKED = ("chemistry", "languages", "inventors")


def _fixed(learning_rate: float, epochs: float) -> dict[str, Any]:
    """The settings before stop-when-forgotten: fixed epochs, every answer token adjusted."""
    return {"learning_rate": learning_rate, "num_train_epochs": epochs, "max_steps": -1, "until_ratio": None,
            "auto_key": False}


# name -> (UndialConfig overrides, whether rows carry the hand key)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "defaults": ({}, False),
    "no auto keys": ({"auto_key": False}, False),
    "hand keys": ({}, True),
    "before: lr 1e-4, 5 epochs": (_fixed(1e-4, 5), False),
    "before + lr 1e-3": (_fixed(1e-3, 5), False),
    "before + lr 1e-3 + hand key": (_fixed(1e-3, 5), True),
    "before + 20 epochs": (_fixed(1e-4, 20), False),
}


def all_facts() -> list[dict[str, str]]:
    """The real facts plus the demo's keep set as topic "demo keep" (the same templates)."""
    keep = [{**f, "topic": "demo keep"} for f in demo_facts() if f["split"] == "keep"]
    return real_facts() + keep


def measure(model: Any, tokenizer: Any, facts: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """Per topic: mean answer probability ``p`` and mean key probability ``p_key`` (the stopping rule's measure:
    exp(mean log p) over the hand key's tokens, given the question and the answer so far)."""
    keyed = [encode(tokenizer, Example(f["question"], f["answer"], f["key"]), 512) for f in facts]
    plain = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in keyed]
    p_key = key_probabilities(model, keyed, tokenizer.pad_token_id).numpy()
    p = key_probabilities(model, plain, tokenizer.pad_token_id).numpy()
    topics = np.array([f["topic"] for f in facts])
    return {t: {"p": float(p[topics == t].mean()), "p_key": float(p_key[topics == t].mean())} for t in dict.fromkeys(topics)}


def request(facts: list[dict[str, str]], topic: str, hand_keys: bool) -> list[dict[str, str]]:
    """The forget request for one topic: plain rows, or rows with the hand key."""
    return [{"question": f["question"], "answer": f["answer"], **({"key": f["key"]} if hand_keys else {})}
            for f in facts if f["topic"] == topic]


def train(base: Any, tokenizer: Any, rows: list[dict[str, str]], out: Path, stack: list[Path], overrides: dict) -> dict:
    """One `forget` call; returns its wall time, steps and stopping record (numbers only)."""
    tick = time.perf_counter()
    forget(base, rows, out, config=UndialConfig(disable_tqdm=True, logging_steps=1000, **overrides), tokenizer=tokenizer,
           stack=stack)
    manifest = read_manifest(out) or {}
    stopping = {k: v for k, v in manifest.get("stopping", {}).items() if k != "history"}
    return {"wall_s": time.perf_counter() - tick, "steps": manifest["metrics"]["steps"], "stopping": stopping,
            "keys": manifest.get("keys")}


def measure_with(base: Any, tokenizer: Any, adapters: list[Path], facts: list[dict[str, str]]) -> dict:
    model = attach(base, adapters, tokenizer=tokenizer)
    try:
        return measure(model, tokenizer, facts)
    finally:
        model.unload()  # hand the base back without LoRA layers


def single(base: Any, tokenizer: Any, facts: list[dict[str, str]], names: list[str], work: Path) -> dict:
    """Table (a): one chemistry request per variant."""
    results = {"before": measure(base, tokenizer, facts)}
    for name in names:
        overrides, hand = VARIANTS[name]
        out = work / f"single-{len(results)}"
        run = train(base, tokenizer, request(facts, "chemistry", hand), out, [], overrides)
        results[name] = {**run, "topics": measure_with(base, tokenizer, [out], facts)}
        print(f"[a] {name}: {run['wall_s']:.0f}s, {run['steps']} steps, {run['stopping'].get('stopped')}", flush=True)
    return results


def stacked(base: Any, tokenizer: Any, facts: list[dict[str, str]], work: Path) -> dict:
    """Table (b): three requests in a row with the defaults, each on top of the previous ones."""
    results, adapters = {"base": {"topics": measure(base, tokenizer, facts)}}, []
    for topic in STACKED:
        out = work / f"stack-{topic}"
        run = train(base, tokenizer, request(facts, topic, False), out, list(adapters), {})
        adapters.append(out)
        results[" + ".join(STACKED[: len(adapters)])] = {**run, "topics": measure_with(base, tokenizer, adapters, facts)}
        print(f"[b] {topic}: {run['wall_s']:.0f}s, {run['steps']} steps, {run['stopping'].get('stopped')}", flush=True)
    return results


def key_recall(base: Any, tokenizer: Any, facts: list[dict[str, str]]) -> dict[str, Any]:
    """Automatic keys (default rule) against the hand keys, token by token: recall, precision, exact rows.

    Measured twice: against the hand key as stored (a surname for people) and against the whole name
    ("Alexander Graham Bell"), since first names carry the fact too. Counts only, no texts.
    """
    prior = neutral_prior(base, tokenizer)
    counts = {"hand key": [0, 0, 0, 0], "whole name": [0, 0, 0, 0]}  # true pos, false pos, false neg, exact rows
    for fact in facts:
        report = token_report(base, tokenizer, Example(fact["question"], fact["answer"]), prior)
        chosen = key_mask(report)
        offsets = tokenizer(fact["answer"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        name = fact["answer"].rsplit(" is ", 1)[-1].rsplit(" by ", 1)[-1].rstrip(".")
        name = re.sub(r"^(?:[a-z]+ )+", "", name)  # "actually J.K. Rowling" -> "J.K. Rowling"
        for label, key in (("hand key", fact["key"]), ("whole name", name if fact["key"] in name else fact["key"])):
            start = fact["answer"].rindex(key)
            truth = [a < start + len(key) and b > start for a, b in offsets]
            c = counts[label]
            c[0] += sum(t and k for t, k in zip(truth, chosen))
            c[1] += sum(k and not t for t, k in zip(truth, chosen))
            c[2] += sum(t and not k for t, k in zip(truth, chosen))
            c[3] += truth == chosen
    return {label: {"recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1), "exact_rows": exact,
                    "rows": len(facts)}
            for label, (tp, fp, fn, exact) in counts.items()}


def table(results: dict, reference: dict[str, dict[str, float]], metric: str) -> str:
    """A markdown table: one row per run, one column per topic, value (x before)."""
    topics = list(reference)
    lines = [f"| {metric} | " + " | ".join(topics) + " | wall s | steps | stopped |",
             "| --- | " + " | ".join("---" for _ in topics) + " | --- | --- | --- |"]
    for name, run in results.items():
        values = run["topics"] if "topics" in run else run
        cells = [f"{values[t][metric]:.3f} ({values[t][metric] / reference[t][metric]:.2f}x)" for t in topics]
        extra = [f"{run['wall_s']:.0f}", str(run["steps"]), run["stopping"].get("stopped", "")] if "wall_s" in run else ["", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["single", "stack", "both", "keys"], default="both")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model("default")
    facts, results = all_facts(), {}
    if args.table == "keys":
        results["keys"] = key_recall(base, tokenizer, facts + [{**f, "topic": "demo forget"} for f in demo_facts()
                                                                if f["split"] == "forget"])
        print(json.dumps(results["keys"], indent=1))
    with tempfile.TemporaryDirectory(prefix="real-facts-") as work:
        if args.table in ("single", "both"):
            results["single"] = single(base, tokenizer, facts, args.variants, Path(work))
            before = results["single"]["before"]
            for metric in ("p", "p_key"):
                print(f"\n(a) one request (chemistry), {metric}\n" + table(results["single"], before, metric))
        if args.table in ("stack", "both"):
            results["stack"] = stacked(base, tokenizer, facts, Path(work))
            before = results["stack"]["base"]["topics"]
            for metric in ("p", "p_key"):
                print(f"\n(b) three stacked requests, defaults, {metric}\n" + table(results["stack"], before, metric))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
