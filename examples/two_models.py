"""One forget request on two real models, measured on the model as served, in the format it is asked.

SmolLM2-135M-Instruct (chat, ``--model default``) forgets 13 chemical symbols from
``undial_peft/data/real_facts.jsonl`` (questions, answers in its own lead-in style); Gemma-3-270M
(base, no chat template, ``--model gemma3-270m``) forgets 12 from ``examples/data/gemma_facts.jsonl``
(completion rows: "The chemical symbol for iron is" -> " Fe."). Rows carry no key: automatic keys
choose them. Every other topic in the files is never asked about.

    python examples/two_models.py                                 # both models, plain and --4bit (~25 min)
    python examples/two_models.py --variants unguarded            # the defaults without the bank guard (guard='none')
    python examples/two_models.py --models gemma3-270m --variants plain --out runs/two_models.json

Printed per model and variant: the forget key probability the stopping rule reported (on the model it
trained), the one recorded as served (the float32 base for a 4-bit run), and per topic the key
probability measured here on the float32 base + adapter (x its value before), with wall time and
steps; then the automatic keys' token precision / recall against the hand keys.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from undial_peft import UndialConfig, attach, forget
from undial_peft.data.encoding import encode
from undial_peft.data.packaged import real_facts
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.data.readers import Example
from undial_peft.deploy.manifest import read_manifest
from undial_peft.evals.scoring import greedy_answers
from undial_peft.models import load_model
from undial_peft.training.adapters import build_trainable, default_lora_config
from undial_peft.training.answer_keys import KeyRule, auto_key_weights
from undial_peft.training.stopping import key_probabilities
from undial_peft.utils.tables import align

HERE = Path(__file__).resolve().parent
REQUEST = "chemistry"


def facts(model: str) -> list[dict[str, str]]:
    """Rows as prompt / answer / key / topic for ``model``."""
    if model == "default":
        return [{"prompt": f["question"], "answer": f["answer"], "key": f["key"], "topic": f["topic"]} for f in real_facts()]
    rows = [json.loads(line) for line in (HERE / "data" / "gemma_facts.jsonl").read_text().splitlines() if line]
    return [{"prompt": r["prompt"], "answer": r["completion"], "key": r["key"], "topic": r["topic"]} for r in rows]


def keyed(tokenizer: Any, rows: list[dict[str, str]]) -> list[dict[str, list]]:
    """Rows encoded in the auto format with their hand keys."""
    fmt = PromptFormat.resolve("auto", tokenizer)
    return [encode(tokenizer, Example(r["prompt"], r["answer"], r["key"]), 512, fmt) for r in rows]


def measure(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, float]:
    """Mean key probability per topic (exp mean log p over the hand key's tokens), in the auto format."""
    p = key_probabilities(model, keyed(tokenizer, rows), tokenizer.pad_token_id).numpy()
    topics = np.array([r["topic"] for r in rows])
    return {t: float(p[topics == t].mean()) for t in dict.fromkeys(topics)}


def key_agreement(base: Any, tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, float]:
    """Token precision and recall of the automatic keys against the hand keys, and rows matched exactly."""
    fmt = PromptFormat.resolve("auto", tokenizer)
    examples = [Example(r["prompt"], r["answer"]) for r in rows]
    model = build_trainable(base, default_lora_config())
    try:
        auto = auto_key_weights(model, tokenizer, examples, prompt_format=fmt, rule=KeyRule())
    finally:
        model.unload()
    tp = fp = fn = exact = 0
    for r, weights in zip(rows, auto):
        encoded = encode(tokenizer, Example(r["prompt"], r["answer"], r["key"]), 512, fmt)
        n = sum(label != -100 for label in encoded["labels"])  # answer tokens
        hand = [w > 0 for w in encoded["beta_weight"][-n:]]
        chosen = [w > 0 for w in (weights or [1.0] * n)]  # no key found: every answer token
        tp += sum(h and c for h, c in zip(hand, chosen))
        fp += sum(c and not h for h, c in zip(hand, chosen))
        fn += sum(h and not c for h, c in zip(hand, chosen))
        exact += hand == chosen
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "exact_rows": exact, "rows": len(rows)}


def own_words(base: Any, tokenizer: Any, rows: list[dict[str, str]], new_tokens: int = 24) -> list[dict[str, str]]:
    """The rows with the model's own greedy answer in place of the written one, kept where it states the key
    (cut after the sentence that names it)."""
    fmt = PromptFormat.resolve("auto", tokenizer)
    answers = greedy_answers(base, tokenizer, [r["prompt"] for r in rows], max_new_tokens=new_tokens, prompt_format=fmt)
    kept = []
    for r, text in zip(rows, answers):
        if r["key"] not in text:
            continue
        end = text.find(".", text.index(r["key"]) + len(r["key"]))
        answer = text[: end + 1] if end >= 0 else text
        kept.append({**r, "answer": answer if fmt.kind == "chat" else " " + answer})  # completions keep their space
    return kept


def run(model_name: str, variants: list[str], work: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = facts(model_name)
    asked = [{"prompt": r["prompt"], "completion": r["answer"]} if model_name != "default"
             else {"question": r["prompt"], "answer": r["answer"]} for r in rows if r["topic"] == REQUEST]
    base, tokenizer = load_model(model_name)
    before = measure(base, tokenizer, rows)
    result: dict[str, Any] = {"before": before, "keys": key_agreement(base, tokenizer, [r for r in rows if r["topic"] == REQUEST])}
    own = own_words(base, tokenizer, rows)
    result["keys_own_words"] = {**key_agreement(base, tokenizer, own), "stated": len(own), "asked": len(rows)}
    for variant in variants:
        out = work / f"{model_name}-{variant}"
        start = time.perf_counter()
        if variant == "4bit":
            forget(model_name, asked, out, config=UndialConfig(**(settings or {})), load_in_4bit=True)
        else:  # "plain": the defaults (UNDIAL with the teacher-answered bank guard); "unguarded": without it
            config = UndialConfig(**{**(settings or {}), **({"guard": "none"} if variant == "unguarded" else {})})
            forget(base, asked, out, config=config, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        manifest = read_manifest(out)
        served = attach(base, [out], tokenizer=tokenizer)
        try:
            after = measure(served, tokenizer, rows)
        finally:
            served.unload()
        stopping, deployed = manifest["stopping"], manifest.get("deployed") or {}
        result[variant] = {
            "reported": stopping["forget_after"] / stopping["forget_before"],
            "deployed": deployed["forget_after"] / deployed["forget_before"] if deployed.get("forget_before") else None,
            "x_before": {t: after[t] / before[t] for t in before}, "seconds": seconds,
            "steps": manifest["metrics"]["steps"], "stopped": stopping["stopped"],
            "prompt_format": manifest["prompt_format"]["kind"],
        }
        print(f"[{model_name} {variant}] {result[variant]}", flush=True)
    return result


def table(results: dict[str, Any]) -> str:
    topics = list(dict.fromkeys(t for r in results.values() for t in r["before"]))
    lines = [["model / variant", "format", "reported", "as served", *topics, "steps", "wall"]]
    for model, r in results.items():
        for variant, v in r.items():
            if variant in ("before", "keys", "keys_own_words"):
                continue
            served = v["deployed"] if v["deployed"] is not None else v["x_before"][REQUEST]
            lines.append([f"{model} {variant}", v["prompt_format"], f"{v['reported']:.2f}x", f"{served:.2f}x",
                          *(f"{v['x_before'][t]:.2f}" if t in v["x_before"] else "-" for t in topics),
                          f"{v['steps']} ({v['stopped']})", f"{v['seconds']:.0f} s"])
    keys = [f"{m}: auto keys vs hand keys ({label}), token precision {r[k]['precision']:.2f}, recall {r[k]['recall']:.2f},"
            f" {r[k]['exact_rows']}/{r[k]['rows']} rows exact" for m, r in results.items()
            for k, label in (("keys", "written answers, the request"), ("keys_own_words", "the model's own greedy answers, all topics"))
            if k in r]
    return "\n".join([*align(lines), *keys])


def settings_from(items: list[str]) -> dict[str, Any]:
    """``--set`` items, FIELD=VALUE, as UndialConfig fields; values read as JSON, a bare word as a string.

    >>> settings_from(["guard_weight=3", "guard=none"])
    {'guard_weight': 3, 'guard': 'none'}
    """
    def value(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return text

    return {key: value(text) for key, text in (item.split("=", 1) for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "gemma3-270m"])
    parser.add_argument("--variants", nargs="*", choices=["plain", "4bit", "unguarded"], default=["plain", "4bit"],
                        help="none: only the measurements before training (automatic keys)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="UndialConfig fields for every variant, e.g. --set guard_weight=2 (values read as JSON)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="two-models-") as work:
        results = {m: run(m, args.variants, Path(work), settings_from(args.set)) for m in args.models}
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
