"""The real-model benchmark's table and plot, from the results dict of `real.run_real_bench`.

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from undial_peft.bench.report import cell
from undial_peft.bench.settings import PRIVLEAK_ATTACK
from undial_peft.utils.tables import align


def _metrics(s: dict[str, Any], target_p: float) -> list[str]:
    leak = (s.get("privleak") or {}).get(PRIVLEAK_ATTACK)
    ratio = s["forget_probability"] / target_p if target_p else None
    general = s.get("general_probability")
    return [cell(s["forget_probability"]), f"{ratio:.2f}x" if ratio is not None else "-", cell(s["forget_rouge_l"]),
            cell(s["forget_quality"], "p"), cell(s["ks_statistic"]), cell(s["model_utility"]),
            cell(s["retain_probability"]), cell(general), cell(leak, "pct")]


def format_real(results: dict[str, Any]) -> str:
    """ONE table in two parts. Single request: each method at the main learning rate (fixed step
    budget), its forget quality / utility at every learning rate, then the same method with the
    stopping rule. Sequential: after each stacked request, the probability of the people asked so
    far, of those not asked yet, forget quality and model utility.
    """
    lrs, main_lr = results["protocol"]["learning_rates"], results["protocol"]["main_lr"]
    base = results["baselines"]
    target_p = base["target"]["forget_probability"]
    head = ["single request", "p_forget", "x_target", "rougeF", "FQ_p", "KS", "MU", "p_retain", "p_world", "PrivLeak%",
            "steps", *(f"FQ/MU@{lr:g}" for lr in lrs)]
    rows = [head]
    for name in ("target", "reference"):
        rows.append([name, *_metrics(base[name], target_p), "-", *(["-"] * len(lrs))])
    sweep: dict[str, dict[float, dict[str, Any]]] = {}
    for run in results["runs"]:
        if run["kind"] == "sweep":
            sweep.setdefault(run["label"], {})[run["lr"]] = run
    for label, by_lr in sweep.items():
        main = by_lr.get(main_lr)
        pairs = [f"{cell(by_lr[lr]['summary']['forget_quality'], 'p')}/{cell(by_lr[lr]['summary']['model_utility'])}"
                 if lr in by_lr else "-" for lr in lrs]
        rows.append([f"{label} @{main_lr:g}", *(_metrics(main["summary"], target_p) if main else ["-"] * 9),
                     str(main["steps"]) if main else "-", *pairs])
    for run in (r for r in results["runs"] if r["kind"] == "stop"):
        why = (run.get("stopping") or {}).get("stopped", "?")
        rows.append([f"{run['label']} stop@{run['lr']:g}", *_metrics(run["summary"], target_p),
                     f"{run['steps']} {why}", *(["-"] * len(lrs))])
    lines = align(rows)
    rule = "-" * len(lines[0])
    out = [lines[0], rule, *lines[1:3], *([rule, *lines[3:]] if lines[3:] else [])]  # no runs: --stacked-only
    sequences = {k: v for k, v in results.get("sequential", {}).items() if k not in ("reference", "target")}
    if sequences:
        n = max(len(steps) for steps in sequences.values())
        seq = [["sequential (stacked)", *(f"r{k}: p_asked/p_other/FQ/MU" for k in range(1, n + 1))]]
        for label, steps in sequences.items():
            seq.append([label, *(_step(s["summary"]) for s in steps)])
        start = results["sequential"]["target"]
        seq.insert(1, ["target (no adapter)", f"-/{cell(start['not_asked_probability'])}/-/{cell(start['model_utility'])}",
                       *([""] * (n - 1))])
        seq_lines = align(seq)
        out += [rule, *seq_lines[:1], "-" * len(seq_lines[0]), *seq_lines[1:]]
    if results.get("attacks"):
        names = list(next(iter(results["attacks"].values())))
        att = [["attacks on 'stop' adapters", *(f"{n}: recovered (p after)" for n in names)]]
        for label, by_name in results["attacks"].items():
            att.append([label, *(_attacked(by_name[n]) for n in names)])
        att_lines = align(att)
        out += [rule, *att_lines[:1], "-" * len(att_lines[0]), *att_lines[1:]]
    out += [rule, f"main lr {main_lr:g}; FQ_p = forget quality (KS p-value of forget truth ratios vs the retain-only"
            f" reference), KS = its statistic; MU = model utility; p_world = real world facts; PrivLeak on"
            f" {PRIVLEAK_ATTACK} (0 ideal); x_target = p_forget / target's; 'stop' rows: forget's stopping rule"
            " (steps, why it stopped); recovered = (after - before) / (target - before) of the forget answer probability,"
            " the target asked the same way (paraphrase: the paraphrased question)."]
    return "\n".join(line.rstrip() for line in out)


def _attacked(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return "skipped"
    return f"{cell(r['recovered'].get('probability'))} ({cell(r['after']['probability'])})"


def _step(s: dict[str, Any]) -> str:
    return (f"{cell(s['asked_probability'])}/{cell(s['not_asked_probability'])}/{cell(s['forget_quality'], 'p')}"
            f"/{cell(s['model_utility'])}")


def plot_real(results: dict[str, Any], path: str | Path) -> Path | None:
    """Two panels: forget quality against utility per single-request run; utility and the
    not-asked people's probability after each sequential request. None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(12, 5))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours: dict[str, str] = {}
    floor = 1e-300  # a p-value of 0 cannot sit on a log axis
    for run in results["runs"]:
        s = run["summary"]
        if s["forget_quality"] is None or s["model_utility"] is None:
            continue
        colour = colours.setdefault(run["label"], f"C{len(colours) % 10}")
        marker = "*" if run["kind"] == "stop" else "o"
        left.scatter(s["model_utility"], max(s["forget_quality"], floor), color=colour, marker=marker,
                     s=90 if marker == "*" else 35, alpha=0.85,
                     label=run["label"] if run["kind"] == "stop" else None)
    for name, colour in (("target", "black"), ("reference", "gold")):
        s = results["baselines"][name]
        left.scatter(s["model_utility"], max(s["forget_quality"], floor), s=200, color=colour, marker="P",
                     edgecolor="black", label=name)
    left.set_yscale("log")
    left.set_xlabel("model utility")
    left.set_ylabel("forget quality (KS p-value vs retain-only model)")
    left.set_title("single request: dots = lr sweep, stars = stopping rule", fontsize=9)
    left.legend(fontsize=7)
    for label, steps in results.get("sequential", {}).items():
        if label in ("reference", "target"):
            continue
        colour = colours.get(label, f"C{len(colours) % 10}")
        ks = [s["request"] for s in steps]
        right.plot(ks, [s["summary"]["model_utility"] for s in steps], "-o", color=colour, label=f"{label}: utility")
        right.plot(ks, [s["summary"]["not_asked_probability"] for s in steps], "--s", color=colour,
                   label=f"{label}: p(not asked)")
    right.set_xlabel("requests stacked")
    right.set_title("sequential requests", fontsize=9)
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return Path(path)
