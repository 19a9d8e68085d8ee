"""``undial-peft bench``: unlearning methods side by side on fictitious facts, one table.

One job per module:
  settings  sizes, presets and method settings      data     training rows built from `synthetic` facts
  targets   fine-tune the target / reference         runs     the benchmark protocol (`run_bench`)
  report    the table, the plot, the version record

>>> from undial_peft import bench
>>> bench.build_parser().parse_args(["--quick"]).quick
True
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..synthetic import ATTRIBUTES
from .data import roster_rows, second_phrasing, training_rows
from .report import format_results, plot_results, run_summary
from .runs import run_bench
from .settings import DEFAULT, DEFAULT_METHODS, QUICK, QUICK_METHODS, BenchSize, MethodSpec

__all__ = [
    "ATTRIBUTES", "DEFAULT", "DEFAULT_METHODS", "QUICK", "QUICK_METHODS", "BenchSize", "MethodSpec", "build_parser",
    "format_results", "main", "plot_results", "roster_rows", "run_bench", "run_summary", "second_phrasing",
    "training_rows",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="undial-peft bench", description=(
        "Offline seeded benchmark: UNDIAL vs GA, GradDiff and NPO on fictitious facts, with a retain-only reference."))
    parser.add_argument("--quick", action="store_true", help="small test size (about half a minute on one thread)")
    parser.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, metavar="LR",
                        help="learning rates of the sweep (default 1e-4 3e-4 1e-3; the middle one is the main run)")
    parser.add_argument("--no-plot", action="store_true", help="skip bench.png")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``undial-peft bench`` / ``python -m undial_peft.bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        run_bench(args.out, seed=args.seed, quick=args.quick, learning_rates=args.lrs, threads=args.threads,
                  plot=not args.no_plot)
    except (ValueError, FileExistsError) as err:
        print(f"undial-peft bench: error: {err}", file=sys.stderr)
        return 2
    return 0


