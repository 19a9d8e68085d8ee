"""What the stopping rule's retain watch costs per step, against a training step, on the real model.

One request (the 13 chemical symbols of ``undial_peft/data/real_facts.jsonl``) with a user retain set
(the other real facts and the demo's keep facts, 64+ rows) is trained for a fixed number of steps
three times, side by side in one process: without a watch (``max_retain_drop=None``), and with the
watch scoring ``max_retain_rows`` = 64 and 16 rows at every step. The watch's cost per step is the
wall-time difference to the unwatched run divided by the steps; the table prints it as a fraction of
one training step (the unwatched run's time per step). No target is set (``until_ratio=None``), so
every run trains the same steps; the retain floor is out of reach (``max_retain_drop=0.99``).

    python examples/benchmarks/check_cost.py                 # ~5 min on 2 CPU cores, alone
    python examples/benchmarks/check_cost.py --steps 6 --rows 64 32 16 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from undial_peft import UndialConfig, forget
from undial_peft.data.packaged import demo_facts, real_facts
from undial_peft.models import load_model
from undial_peft.utils.tables import align


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 16], help="max_retain_rows values to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    facts = real_facts()
    asked = [{"question": f["question"], "answer": f["answer"]} for f in facts if f["topic"] == "chemistry"]
    retain = [{"question": f["question"], "answer": f["answer"]} for f in facts if f["topic"] != "chemistry"]
    retain += [{"question": f["question"], "answer": f["answer"]} for f in demo_facts() if f["split"] == "keep"]
    base, tokenizer = load_model("default")
    settings = {"max_steps": args.steps, "min_steps": 0, "until_ratio": None, "retain_weight": 1.0, "guard": "none",
                "disable_tqdm": True, "logging_steps": 1000}
    runs = {"no watch": {"max_retain_drop": None}}
    runs.update({f"watch {n} rows": {"max_retain_drop": 0.99, "max_retain_rows": n} for n in args.rows})
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="check-cost-") as work:
        for name, extra in runs.items():
            start = time.perf_counter()
            forget(base, asked, Path(work) / name.replace(" ", "-"), retain=retain, tokenizer=tokenizer,
                   config=UndialConfig(**settings, **extra))
            seconds[name] = time.perf_counter() - start
            print(f"{name}: {seconds[name]:.1f} s", flush=True)
    step = seconds["no watch"] / args.steps
    lines = [["run", "wall", "per step", "watch per step", "watch / training step"]]
    for name, total in seconds.items():
        watch = (total - seconds["no watch"]) / args.steps
        lines.append([name, f"{total:.1f} s", f"{total / args.steps:.2f} s",
                      "-" if name == "no watch" else f"{watch:.2f} s", "-" if name == "no watch" else f"{watch / step:.2f}"])
    print(f"{len(asked)} forget rows, {len(retain)} retain rows, {args.steps} steps, {torch.get_num_threads()} threads")
    print("\n".join(align(lines)))


if __name__ == "__main__":
    main()
