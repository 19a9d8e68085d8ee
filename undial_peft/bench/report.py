"""Turn evaluation reports into the benchmark's table, plot and version record.

>>> cell(0.004, "p"), cell(None), cell(12.34, "pct")
('4.0e-03', '-', '+12.3')
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from undial_peft.bench.settings import PRIVLEAK_ATTACK
from undial_peft.evals import metrics
from undial_peft.utils.tables import align


def run_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers one table row needs, from an `evaluate.evaluate` report."""
    splits, top = report["splits"], report["summary"]
    fq = top.get("forget_quality", {})
    return {
        "forget_probability": splits["forget"]["summary"]["probability"],
        "forget_rouge_l": splits["forget"]["summary"].get("rouge_l_recall"),
        "forget_truth_ratio": splits["forget"]["summary"].get("truth_ratio"),
        "retain_probability": splits["retain"]["summary"]["probability"],
        "retain_rouge_l": splits["retain"]["summary"].get("rouge_l_recall"),
        "general_probability": splits["world_facts"]["summary"]["probability"],
        "holdout_probability": splits["holdout"]["summary"]["probability"],
        # TOFU's utility needs a real-authors split this benchmark lacks: the hmean of the rest, named as such.
        "model_utility": top.get("model_utility", top.get("model_utility_partial")),
        "model_utility_missing": top.get("model_utility_missing", []),
        "forget_quality": fq.get("pvalue"),
        "ks_statistic": fq.get("statistic"),
        "mia_auc": top.get("mia_auc"),
        "privleak": top.get("privleak"),
    }


def cell(value: Any, kind: str = "f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "p":  # p-values span many decades
        return f"{value:.2g}" if value >= 0.01 else f"{value:.1e}"
    if kind == "pct":
        return f"{value:+.1f}"
    return f"{value:.3f}"


def format_results(results: dict[str, Any]) -> str:
    """ONE table, methods as rows: main-learning-rate metrics, then forget quality / utility at every
    learning rate of the sweep (the robustness summary)."""
    lrs = results["protocol"]["learning_rates"]
    main_lr = results["protocol"]["main_lr"]
    head = ["method", "p_forget", "rougeF", "FQ_p", "KS", "MU", "p_retain", "rougeR", "PrivLeak%"]
    head += [f"FQ/MU@{lr:g}" for lr in lrs]
    rows = [head]

    def metric_cells(s: dict[str, Any]) -> list[str]:
        leak = (s.get("privleak") or {}).get(PRIVLEAK_ATTACK)
        return [cell(s["forget_probability"]), cell(s["forget_rouge_l"]), cell(s["forget_quality"], "p"),
                cell(s["ks_statistic"]), cell(s["model_utility"]), cell(s["retain_probability"]),
                cell(s["retain_rouge_l"]), cell(leak, "pct")]

    for name in ("target", "reference"):
        rows.append([name, *metric_cells(results["baselines"][name]), *(["-"] * len(lrs))])
    for label, by_lr in results["sweep"].items():
        main = by_lr.get(f"{main_lr:g}")
        sweep = [
            f"{cell(by_lr[f'{lr:g}']['forget_quality'], 'p')}/{cell(by_lr[f'{lr:g}']['model_utility'])}"
            if f"{lr:g}" in by_lr else "-"
            for lr in lrs
        ]
        rows.append([label, *(metric_cells(main) if main else ["-"] * (len(head) - 1 - len(lrs))), *sweep])
    lines = align(rows)
    rule = "-" * len(lines[0])
    notes = (f"main lr {main_lr:g}; FQ_p = forget quality (KS p-value vs the retain-only reference), KS = its statistic, "
             f"MU = model utility (TOFU's hmean without the real-authors components); PrivLeak on {PRIVLEAK_ATTACK}, MUSE's sign (0 ideal, -100 = not unlearned).")
    return "\n".join([lines[0], rule, *lines[1:3], rule, *lines[3:], rule, notes])


def plot_results(results: dict[str, Any], path: str | Path) -> Path | None:
    """Forget quality (log scale) against model utility, one point per run; None without matplotlib.

    Uses the Agg canvas directly, so pyplot's global backend is never touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lrs = results["protocol"]["learning_rates"]
    markers = dict(zip([f"{lr:g}" for lr in lrs], "os^Dv<>"))
    floor = 1e-300  # a p-value of 0 cannot sit on a log axis
    colours = {}
    for run in results["runs"]:
        s = run["summary"]
        if s["forget_quality"] is None or s["model_utility"] is None:
            continue
        colour = colours.setdefault(run["label"], f"C{len(colours) % 10}")
        ax.scatter(s["model_utility"], max(s["forget_quality"], floor), color=colour, marker=markers.get(f"{run['lr']:g}", "o"),
                   s=45, alpha=0.85, label=run["label"] if f"{run['lr']:g}" == f"{results['protocol']['main_lr']:g}" else None)
    for name, style in (("target", dict(color="black", marker="*")), ("reference", dict(color="gold", marker="*", edgecolor="black"))):
        s = results["baselines"][name]
        ax.scatter(s["model_utility"], max(s["forget_quality"], floor), s=220, label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("model utility (retain + world facts)")
    ax.set_ylabel("forget quality (KS p-value vs retain-only model)")
    lr_text = ", ".join(f"{m} lr={lr}" for lr, m in markers.items())
    ax.set_title(f"Unlearning on fictitious facts (seed {results['protocol']['seed']}); markers: {lr_text}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return Path(path)


def self_reference(report: dict[str, Any]) -> None:
    """The reference against itself, by definition: forget quality p = 1 (KS 0), PrivLeak 0."""
    top = report["summary"]
    ratios = [r for r in report["splits"]["forget"]["items"].get("truth_ratio", []) if r is not None]
    if ratios:
        top["forget_quality"] = metrics.forget_quality(ratios, ratios)
    if "mia_auc" in top:
        top["privleak"] = {attack: 0.0 for attack in top["mia_auc"]}



