"""Sequential forget requests on the real-model benchmark: each method stacks one adapter per
request (different people each time) and is scored after every request.

The model is evaluated on the WHOLE request pool each time, against the retain-only reference
(which never saw any pool person): forget quality is the KS test on the truth ratios of the people
asked so far; the people not asked yet show collateral damage on facts of the same kind, and model
utility (retain people + real world facts) shows it on everything else.

>>> rows = [{"entity": "A"}, {"entity": "B"}, {"entity": "A"}]
>>> _asked_mask(rows, [{"entity": "A"}])
[True, False, True]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from undial_peft.bench.settings import MethodSpec, run_id
from undial_peft.bench.targets import load_target
from undial_peft.evals import metrics
from undial_peft.evals.report import evaluate, save_report
from undial_peft.utils.tables import number


def _asked_mask(pool: Sequence[dict[str, Any]], asked: Sequence[dict[str, Any]]) -> list[bool]:
    """For each pool row: is its person among the people asked so far?"""
    people = {row["entity"] for row in asked}
    return [row["entity"] in people for row in pool]


def step_summary(report: dict[str, Any], reference: dict[str, Any], asked: Sequence[bool]) -> dict[str, Any]:
    """Forget quality / probability of the asked people, probability of the others, utility.

    >>> item = {"probability": [0.9, 0.2], "truth_ratio": [0.5, 0.9]}
    >>> r = {"splits": {"forget": {"items": item}, "retain": {"summary": {"probability": 0.8}},
    ...      "world_facts": {"summary": {"probability": 0.7}}}, "summary": {"model_utility": 0.5}}
    >>> s = step_summary(r, r, [False, True]); (s["asked_probability"], s["not_asked_probability"], s["forget_quality"])
    (0.2, 0.9, 1.0)
    """
    items, ref_items = report["splits"]["forget"]["items"], reference["splits"]["forget"]["items"]
    probs = np.asarray(items["probability"])
    mask = np.asarray(asked, dtype=bool)
    ours = [r for r, a in zip(items.get("truth_ratio", []), asked) if a and r is not None]
    theirs = [r for r, a in zip(ref_items.get("truth_ratio", []), asked) if a and r is not None]
    fq = metrics.forget_quality(ours, theirs) if ours and theirs else {}
    return {
        "asked_probability": float(probs[mask].mean()) if mask.any() else None,
        "not_asked_probability": float(probs[~mask].mean()) if (~mask).any() else None,
        "forget_quality": fq.get("pvalue"),
        "ks_statistic": fq.get("statistic"),
        "retain_probability": report["splits"]["retain"]["summary"]["probability"],
        "general_probability": report["splits"]["world_facts"]["summary"]["probability"],
        "model_utility": report["summary"].get("model_utility", report["summary"].get("model_utility_partial")),
    }


def run_sequence(
    target: Path,
    reference_dir: Path,
    data: dict[str, Any],
    methods: Sequence[MethodSpec],
    out: Path,
    config: dict[str, Any],
    eval_args: dict[str, Any],
    train_and_score: Callable[..., tuple[dict[str, Any], dict[str, Any]]],
    *,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Every method through ``data["requests"]`` in order, each request stacked on the earlier ones.

    Returns {"reference": .., "target": .., method label: [per-request step summaries]}.
    """
    splits = {"forget": data["pool"], "retain": data["retain_eval"], "world_facts": data["world_facts"],
              "real_authors": data["real_authors"]}
    # The pool is scored, not answered: its ROUGE is not reported, and generating it would double the cost.
    eval_args = {**eval_args, "generate": ("retain", "world_facts", "real_authors")}
    model, tokenizer = load_target(reference_dir)
    reference = evaluate(model, tokenizer, **splits, **eval_args)
    model, tokenizer = load_target(target)
    start = evaluate(model, tokenizer, **splits, **eval_args)
    del model
    nobody = [False] * len(data["pool"])
    results: dict[str, Any] = {"reference": step_summary(reference, reference, nobody),
                               "target": step_summary(start, reference, nobody)}
    for spec in methods:
        stack: list[Path] = []
        steps = []
        for k, request in enumerate(data["requests"], start=1):
            name = f"seq-{run_id(spec, 0).removesuffix('-lr-0')}-r{k}"
            asked = _asked_mask(data["pool"], [row for r in data["requests"][:k] for row in r])
            report, record = train_and_score(target, request, out / "adapters" / name, spec, config, splits, None,
                                             eval_args, retain=data["retain_train"], stack=stack)
            save_report(report, out / "reports" / f"{name}.json")
            stack.append(out / "adapters" / name)
            steps.append({"request": k, **record, "summary": step_summary(report, reference, asked)})
            s = steps[-1]["summary"]
            log(f"[bench] {spec.label} request {k}: asked p {s['asked_probability']:.3f}, not asked p"
                f" {number(s['not_asked_probability'], '.3f')}, FQ {s['forget_quality']:.2g}, MU {s['model_utility']:.3f},"
                f" {record['steps']} steps ({record['seconds']:.0f}s)")
        results[spec.label] = steps
    return results

