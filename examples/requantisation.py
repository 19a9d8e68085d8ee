"""Does a forgotten fact come back after merging the adapter and re-quantising the model to 4-bit?

A known failure of unlearning (Zhang et al., "Catastrophic Failure of LLM Unlearning via
Quantization", 2024): small weight changes that suppress a fact can be rounded away when the
model is quantised. This script measures it on the demo: base, base + adapter, merged (fp32),
and merged then loaded in 4-bit NF4 (and, for reference, the base in 4-bit).

    python examples/requantisation.py adapters/demo-XXXX        # an adapter written by `undial-peft demo`
    python examples/requantisation.py --train                   # train the demo adapter first (~2 min)
    python examples/requantisation.py --model bench-out/models/target --forget bench-out/data/forget.jsonl \
        --retain bench-out/data/retain_eval.jsonl bench-out/adapters/undial-b-10-rt-lr-0-0003   # any model + adapter
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from undial_peft.config import UndialConfig
from undial_peft.demo import demo_facts, measure_facts, run_demo
from undial_peft.models import load_model
from undial_peft.stack import attach, format_rows, merge_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", nargs="?", help="adapter directory from `undial-peft demo`")
    parser.add_argument("--train", action="store_true", help="train the demo adapter first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a model directory (with --forget/--retain) instead of the demo")
    parser.add_argument("--forget", default=None)
    parser.add_argument("--retain", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        generic(args.model, Path(args.adapter), args.forget, args.retain)
        return
    work = Path(tempfile.mkdtemp(prefix="requant-"))
    if args.train:
        demo = run_demo(output_dir=work / "demo", log=lambda line: None)
        print("demo summary:", {k: round(v, 4) for k, v in demo["summary"].items()}, flush=True)
        adapter = Path(demo["adapter"])
    else:
        adapter = Path(args.adapter)
    facts, config = demo_facts(), UndialConfig()
    merged_dir = merge_stack("default", [adapter], work / "merged")
    variants = {
        "base fp32": lambda: load_model("default")[0],
        "base 4-bit": lambda: load_model("default", load_in_4bit=True)[0],
        "base + adapter": lambda: attach("default", [adapter]),
        "merged fp32": lambda: load_model(merged_dir)[0],
        "merged 4-bit": lambda: load_model(merged_dir, load_in_4bit=True)[0],
    }
    _, tokenizer = load_model("default")
    rows = []
    for name, build in variants.items():
        measured = measure_facts(build(), tokenizer, facts, config)
        row = {"model": name}
        for split in ("forget", "keep"):
            picked = [m for m, f in zip(measured, facts) if f["split"] == split]
            row[f"{split}_p_key"] = float(np.mean([m["p_key"] for m in picked]))
            row[f"{split}_key_in_greedy"] = sum(f["key"] in m["answer"] for m, f in zip(measured, facts) if f["split"] == split)
        rows.append(row)
        print(format_rows(rows[-1:]), flush=True)
    print("\n" + format_rows(rows))


def generic(model_dir: str, adapter: Path, forget: str, retain: str) -> None:
    """Mean answer probability of forget / retain items for base, adapter, merged, merged + NF4."""
    from undial_peft.api import mean_probability
    from undial_peft.data import read_examples

    config, work = UndialConfig(), Path(tempfile.mkdtemp(prefix="requant-"))
    merged_dir = merge_stack(model_dir, [adapter], work / "merged")
    splits = {"forget": read_examples(forget), "retain": read_examples(retain, "retain")}
    _, tokenizer = load_model(model_dir)
    builds = {
        "base fp32": lambda: load_model(model_dir)[0],
        "base 4-bit": lambda: load_model(model_dir, load_in_4bit=True)[0],
        "base + adapter": lambda: attach(model_dir, [adapter]),
        "merged fp32": lambda: load_model(merged_dir)[0],
        "merged 4-bit": lambda: load_model(merged_dir, load_in_4bit=True)[0],
    }
    rows = []
    for name, build in builds.items():
        model = build()
        rows.append({"model": name, **{f"p_{k}": mean_probability(model, tokenizer, v, config) for k, v in splits.items()}})
    print(format_rows(rows))


if __name__ == "__main__":
    main()
