"""``undial-peft bench``: unlearning methods side by side on fictitious facts, one table.

One job per module:
  settings  sizes, presets and method settings      data     training rows built from `synthetic` facts
  targets   fine-tune the target / reference         runs     the benchmark protocol (`run_bench`)
  report    the table, the plot, the version record
  real      the real-model protocol (`run_real_bench`)   sequential   stacked requests, scored after each
  real_report  the real-model table and plot

>>> from undial_peft import bench
>>> bench.build_parser().parse_args(["--quick"]).quick
True
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from undial_peft.bench.data import roster_rows, second_phrasing, training_rows
from undial_peft.bench.real import run_real_bench
from undial_peft.bench.report import format_results, plot_results, run_summary
from undial_peft.bench.runs import run_bench
from undial_peft.bench.settings import (
    DEFAULT,
    DEFAULT_METHODS,
    QUICK,
    QUICK_METHODS,
    REAL,
    REAL_METHODS,
    REAL_QUICK,
    BenchSize,
    MethodSpec,
    RealSize,
)
from undial_peft.data.synthetic import ATTRIBUTES

__all__ = [
    "ATTRIBUTES", "DEFAULT", "DEFAULT_METHODS", "QUICK", "QUICK_METHODS", "BenchSize", "MethodSpec", "build_parser",
    "format_results", "main", "plot_results", "REAL", "REAL_METHODS", "REAL_QUICK", "RealSize", "roster_rows",
    "run_bench", "run_real_bench", "run_summary", "second_phrasing", "training_rows",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="undial-peft bench", description=(
        "Offline seeded benchmark: UNDIAL vs GA, GradDiff and NPO on fictitious facts, with a retain-only reference."
        " Without --model the target is a tiny word-level Llama; with --model (e.g. 'default') it is that"
        " pretrained model fine-tuned on the facts (TOFU-style), with sequential requests."))
    parser.add_argument("--model", default=None, metavar="M",
                        help="real-model benchmark on M: 'default' (embedded SmolLM2-135M-Instruct), a directory or a .gguf")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="with --model: where fine-tuned targets are cached by recipe (default: OUT/models)")
    parser.add_argument("--quick", action="store_true", help="small test size (tiny: half a minute; --model: minutes)")
    parser.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, metavar="LR",
                        help="learning rates of the sweep (default 1e-4 3e-4 1e-3; the middle one is the main run)")
    parser.add_argument("--sweep-all", action="store_true",
                        help="with --model: every method at every learning rate (default: UNDIAL auto-key and NPO + retain)")
    parser.add_argument("--stacked", nargs="+", default=None, metavar="LABEL",
                        help="with --model: the methods the sequential part stacks, by label (default: undial auto-key,"
                             " undial auto-key +guard, npo)")
    parser.add_argument("--stacked-only", action="store_true",
                        help="with --model: only the sequential part (no single-request runs, sweep or attacks)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``undial-peft bench`` / ``python -m undial_peft.bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.model is None:
            run_bench(args.out, seed=args.seed, quick=args.quick, learning_rates=args.lrs, threads=args.threads,
                      plot=not args.no_plot)
        else:
            size = REAL_QUICK if args.quick else REAL
            if args.lrs:
                size = dataclasses.replace(size, learning_rates=tuple(args.lrs))
            swept = [m.label for m in REAL_METHODS] if args.sweep_all else None
            run_real_bench(args.out, model=args.model, seed=args.seed, size=size, quick=args.quick, swept=swept,
                           sequential=args.stacked, single=not args.stacked_only, cache_dir=args.cache,
                           threads=args.threads, plot=not args.no_plot)
    except (ValueError, FileExistsError) as err:
        print(f"undial-peft bench: error: {err}", file=sys.stderr)
        return 2
    return 0


