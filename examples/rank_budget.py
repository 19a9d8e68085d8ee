"""Rank budget on the real model: 8 forget requests stacked, exported exact vs ``--max-rank R``.

Each request forgets two real facts SmolLM2-135M-Instruct knows (the demo's six forget facts and
ten more from ``examples/data/more_facts.jsonl``); the demo's ten keep facts are the retain check.
The stack is trained request by request (each on top of the earlier ones), then exported once
exactly (rank 8 x 8 = 64) and once per budget R; every export is loaded with plain peft and
measured: mean key probability of the 16 forget facts and the 10 keep facts, how many greedy
answers still name the key, and the energy kept per module (min / mean).

    python examples/rank_budget.py --out runs/rank-budget            # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from undial_peft import UndialConfig
from undial_peft.data.packaged import demo_facts
from undial_peft.demo import measure_facts
from undial_peft.deploy.manifest import read_manifest
from undial_peft.deploy.stack import attach, export_stack
from undial_peft.deploy.vllm import check_vllm, vllm_max_lora_rank
from undial_peft.models import load_model
from undial_peft.training.forget import forget

MORE_FACTS = Path(__file__).parent / "data" / "more_facts.jsonl"


def _summary(facts: list[dict], measured: list[dict]) -> dict[str, float]:
    out = {}
    for split in ("forget", "keep"):
        rows = [m for f, m in zip(facts, measured) if f["split"] == split]
        out[f"{split}_p_key"] = float(np.mean([m["p_key"] for m in rows]))
        out[f"{split}_said"] = int(sum(m["said"] for m in rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rank-budget")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: forget's (each request stops at its target)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    root = Path(args.out)
    extra = [json.loads(line) for line in MORE_FACTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    facts = demo_facts() + extra
    forget_facts = [f for f in facts if f["split"] == "forget"][: 2 * args.requests]
    measured_facts = forget_facts + [f for f in facts if f["split"] == "keep"]
    settings = {"learning_rate": args.lr} if args.lr is not None else {}
    config = UndialConfig(**settings, per_device_train_batch_size=2, disable_tqdm=True, logging_steps=1000,
                          report_to="none")
    base, tokenizer = load_model("default")
    results: dict[str, dict] = {"base": _summary(measured_facts, measure_facts(base, tokenizer, measured_facts, config))}
    print("base", results["base"], flush=True)

    stack: list[Path] = []
    for k in range(args.requests):
        started = time.perf_counter()
        pair = [{key: f[key] for key in ("question", "answer", "key")} for f in forget_facts[2 * k: 2 * k + 2]]
        stack.append(forget(base, pair, root / f"req-{k:02d}", config=config, stack=list(stack), tokenizer=tokenizer,
                            overwrite=True))
        print(f"request {k}: {time.perf_counter() - started:.0f}s", flush=True)

    attached = attach(base, stack, tokenizer=tokenizer)
    results["attached stack"] = _summary(measured_facts, measure_facts(attached, tokenizer, measured_facts, config))
    attached.unload()
    print("attached", results["attached stack"], flush=True)
    for budget in [None, *args.budgets]:
        name = "exact" if budget is None else f"r{budget}"
        path = export_stack(base, stack, root / f"export-{name}", tokenizer=tokenizer, max_rank=budget, overwrite=True)
        model = attach(base, [path], tokenizer=tokenizer)
        row = _summary(measured_facts, measure_facts(model, tokenizer, measured_facts, config))
        model.unload()
        rank = json.loads((path / "adapter_config.json").read_text())["r"]
        energy = (read_manifest(path)["serving"]["energy_kept"] or {}).values()
        row.update({"rank": rank, "vllm_max_lora_rank": vllm_max_lora_rank(rank), "vllm_ok": check_vllm(path) == [],
                    "energy_min": min(energy, default=1.0), "energy_mean": float(np.mean(list(energy) or [1.0]))})
        results[f"export {name}"] = row
        print(name, row, flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("| model | rank | forget key p | forget keys said | keep key p | keep keys said | energy kept min / mean |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in results.items():
        energy = f"{row['energy_min']:.3f} / {row['energy_mean']:.3f}" if "energy_min" in row else "-"
        print(f"| {name} | {row.get('rank', '-')} | {row['forget_p_key']:.3f} | {row['forget_said']} | "
              f"{row['keep_p_key']:.3f} | {row['keep_said']} | {energy} |")


if __name__ == "__main__":
    main()
