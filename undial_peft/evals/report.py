"""Run a model on forget / retain / holdout / general data and report unlearning metrics.

`score` and `greedy_answers` run the model; `evaluate` turns their output into a JSON-ready
report through the pure functions of `undial_peft.evals.metrics`. A report holds per-item values, so
the report of a retain-only reference model can be saved and passed back as ``reference=`` for
forget quality and PrivLeak. Reports hold numbers and data digests, never the texts themselves
(forget data is what the user wants gone), unless ``keep_generations=True``.

>>> report = evaluate(model, tokenizer, "forget.jsonl", retain="retain.jsonl")  # doctest: +SKIP
>>> print(format_table(report))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from undial_peft.data.digests import key_id
from undial_peft.data.encoding import encode
from undial_peft.data.prompt_format import AUTO, FormatSpec, PromptFormat
from undial_peft.data.readers import Example
from undial_peft.errors import UndialDataError
from undial_peft.evals import MAX_NEW_TOKENS, SPLITS, metrics
from undial_peft.evals.items import PROTOCOLS, EvalItem, item_prompt, items_digest, read_eval_items
from undial_peft.evals.scoring import TokenScores, greedy_answers, greedy_from_ids, score, score_features
from undial_peft.training.loss import IGNORE_INDEX
from undial_peft.utils.tables import align, number

__all__ = ["MAX_NEW_TOKENS", "TokenScores", "evaluate", "format_table", "greedy_answers", "item_features", "save_report",
           "score"]

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
PRIVLEAK_ATTACK = "min_k"  # MUSE's and open-unlearning's PrivLeak attack (k = 0.4); the others are extra columns
# TOFU model utility: these nine numbers, nothing else (Maini et al. 2024; open-unlearning model_utility).
UTILITY_COMPONENTS = (
    "retain/probability", "retain/rouge_l_recall", "retain/truth_ratio",
    "real_authors/probability_w_options", "real_authors/rouge_l_recall", "real_authors/truth_ratio",
    "world_facts/probability_w_options", "world_facts/rouge_l_recall", "world_facts/truth_ratio",
)
OPTION_SPLITS = ("real_authors", "world_facts")  # probability normalised over the answer options
GENERATED_SPLITS = tuple(s for s in SPLITS if s != "holdout")  # holdout: membership inference only
FORGET_LIKE = ("forget", "holdout")  # truth ratio summarised as closeness to 1, not preference for the truth


def item_features(tokenizer: Any, item: EvalItem, *, max_length: int, prompt_format: FormatSpec = AUTO) -> dict[str, list]:
    """Token ids and labels (-100 on the prompt) that score ``item.answer``.

    Without a protocol: `data.encoding.encode` (the request's prompt format, ``max_length``). With one, as MUSE
    and open-unlearning: prompt, separator and answer tokenised as ONE string (so the answer's first
    token is the one the model sees in running text), the prompt's own tokenisation marking where
    the answer starts, at most ``max_tokens`` answer tokens; a text row is a row with an empty prompt.
    """
    if item.protocol is None:
        features = encode(tokenizer, Example(item.question, item.answer), max_length, prompt_format)
        return {"input_ids": features["input_ids"], "labels": features["labels"]}
    protocol = PROTOCOLS[item.protocol]
    prompt = item_prompt(item) if protocol.separator is not None else ""
    full = tokenizer(prompt + (protocol.separator or "") + item.answer, add_special_tokens=True).input_ids
    start = len(tokenizer(prompt, add_special_tokens=True).input_ids)  # BOS alone for a text row
    if protocol.max_tokens is not None:
        full = full[: start + protocol.max_tokens]
    if len(full) - max(start, 1) < 1:  # position 0 is never predicted
        raise UndialDataError("the answer has no tokens after the prompt; remove the row.")
    return {"input_ids": full, "labels": [IGNORE_INDEX] * start + full[start:]}


def _greedy(model: Any, tokenizer: Any, items: Sequence[EvalItem], gen: dict) -> list[str]:
    """Greedy answers; protocol items with their own prompts, budgets and stop strings."""
    out: dict[int, str] = {}
    plain = [i for i, it in enumerate(items) if it.protocol is None]
    out.update(zip(plain, greedy_answers(model, tokenizer, [items[i].question for i in plain], **gen)))
    for name, protocol in PROTOCOLS.items():
        chosen = [i for i, it in enumerate(items) if it.protocol == name]
        if not chosen:
            continue
        prompts = [tokenizer(item_prompt(items[i]), add_special_tokens=True).input_ids for i in chosen]
        texts = greedy_from_ids(model, tokenizer, prompts, max_new_tokens=protocol.max_new_tokens or gen["max_new_tokens"],
                                batch_size=gen["batch_size"], stop=protocol.stop)
        out.update(zip(chosen, texts))
    return [out[i] for i in range(len(items))]


def option_nlls(model: Any, tokenizer: Any, items: Sequence[EvalItem], **run: Any) -> list[tuple[float, list[float]] | None]:
    """Per item (mean NLL of the true answer, mean NLLs of the perturbed ones), or None without perturbations.

    Every answer is scored after the ORIGINAL question, as TOFU and open-unlearning
    (``question_key: question``) do, so the truth ratio compares answers, not prompts.

    >>> # option_nlls(model, tok, [EvalItem("Q?", "A.", "A!", ("B.", "C."))])  -> [(0.7, [2.1, 1.9])]
    """
    flat = [Example(it.question, a) for it in items if it.has_truth_ratio for a in (it.true_answer, *it.perturbed_answers)]
    nlls = iter([metrics.avg_nll(s.logprobs) for s in score(model, tokenizer, flat, **run)])
    out: list[tuple[float, list[float]] | None] = []
    for it in items:
        out.append((next(nlls), [next(nlls) for _ in it.perturbed_answers]) if it.has_truth_ratio else None)
    return out


def _split_report(
    model: Any, tokenizer: Any, items: list[EvalItem], split: str, run: dict, k: float, gen: dict | None, keep: bool
) -> dict[str, Any]:
    """One split's per-item values and summary; ``gen`` None skips generation (and ROUGE)."""
    features = [item_features(tokenizer, it, max_length=run["max_length"], prompt_format=run["prompt_format"])
                for it in items]
    scores = score_features(model, tokenizer, features, batch_size=run["batch_size"])
    per_item: dict[str, Any] = {
        "avg_nll": [metrics.avg_nll(s.logprobs) for s in scores],
        "probability": [metrics.answer_probability(s.logprobs) for s in scores],
        "exact_memorization": [metrics.exact_memorization(s.argmax_match) for s in scores],
        "mia": {
            "loss": [metrics.loss_score(s.logprobs) for s in scores],
            "zlib": [metrics.zlib_score(s.logprobs, it.answer) for s, it in zip(scores, items)],
            "min_k": [metrics.min_k_score(s.logprobs, k) for s in scores],
            "min_k_plus_plus": [metrics.min_k_plus_plus_score(s.logprobs, s.mu, s.sigma, k) for s in scores],
        },
    }
    summary = {key: float(np.mean(per_item[key])) for key in ("avg_nll", "probability", "exact_memorization")}
    summary["perplexity"] = metrics.perplexity([s.logprobs for s in scores])
    options = option_nlls(model, tokenizer, items, **run)
    if any(o is not None for o in options):
        per_item["truth_ratio"] = [None if o is None else metrics.truth_ratio(o[1], o[0]) for o in options]
        present = [r for r in per_item["truth_ratio"] if r is not None]
        # TOFU: forget-like splits score closeness to 1, retain-like ones a clear preference for the truth.
        forget_like = split in FORGET_LIKE
        summarise = metrics.truth_ratio_forget_score if forget_like else metrics.truth_ratio_retain_score
        summary["truth_ratio"] = summarise(present)
        if split in OPTION_SPLITS:
            normalised = [None if o is None else metrics.probability_with_options(*o) for o in options]
            per_item["probability_w_options"] = normalised
            summary["probability_w_options"] = float(np.mean([p for p in normalised if p is not None]))
    asked = [i for i, it in enumerate(items) if it.question is not None]  # raw-text rows have no question
    if gen is not None and asked:
        texts = dict(zip(asked, _greedy(model, tokenizer, [items[i] for i in asked], gen)))
        for name, fn in (("rouge_l_recall", metrics.rouge_l_recall), ("rouge_l_f1", metrics.rouge_l_f1)):
            per_item[name] = [fn(texts[i], it.answer) if i in texts else None for i, it in enumerate(items)]
            summary[name] = float(np.mean([per_item[name][i] for i in asked]))
        if keep:
            per_item["generations"] = [texts.get(i) for i in range(len(items))]
    return {"n_items": len(items), "hmac_sha256": items_digest(items), "key_id": key_id(), "summary": summary,
            "items": per_item}


def _check_same_data(report: dict, reference: dict, split: str) -> None:
    if split not in reference.get("splits", {}):
        raise UndialDataError(f"reference report has no {split!r} split; evaluate the reference with the same splits.")
    mine, theirs = report["splits"][split], reference["splits"][split]
    if theirs.get("key_id") != mine["key_id"]:
        raise UndialDataError(
            f"reference report's data digest was made with another data key ({theirs.get('key_id')} vs "
            f"{mine['key_id']}); evaluate the reference with the same UNDIAL_PEFT_DATA_KEY(_FILE)."
        )
    if mine["hmac_sha256"] != theirs["hmac_sha256"]:
        raise UndialDataError(
            f"reference report was computed on different {split} data (digest {theirs['hmac_sha256'][:12]} vs "
            f"{mine['hmac_sha256'][:12]}); evaluate the reference on the same {split} set."
        )


def model_utility(splits: dict[str, dict]) -> dict[str, Any]:
    """TOFU model utility from split reports: the harmonic mean of exactly `UTILITY_COMPONENTS`.

    When some are missing, ``model_utility`` is absent and ``model_utility_missing`` names them;
    ``model_utility_partial`` is then the harmonic mean of those present, under its own name
    because it is not TOFU's utility.

    >>> model_utility({"retain": {"summary": {"probability": 0.5}}})["model_utility_missing"][0]
    'retain/rouge_l_recall'
    """
    components = {}
    for name in UTILITY_COMPONENTS:
        split, metric = name.split("/")
        value = splits.get(split, {}).get("summary", {}).get(metric)
        if value is not None:
            components[name] = value
    out: dict[str, Any] = {}
    if not components:
        return out
    missing = [name for name in UTILITY_COMPONENTS if name not in components]
    hmean = metrics.model_utility(list(components.values()))
    out.update({"model_utility_partial": hmean, "model_utility_missing": missing} if missing else {"model_utility": hmean})
    out["model_utility_components"] = components
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    forget: Any,
    retain: Any = None,
    holdout: Any = None,
    general: Any = None,
    reference: dict | None = None,
    *,
    real_authors: Any = None,
    world_facts: Any = None,
    prompt_format: FormatSpec = AUTO,
    max_length: int = 512,
    batch_size: int = 8,
    generate: bool | Collection[str] = True,
    max_new_tokens: int = MAX_NEW_TOKENS,
    k: float = metrics.MIN_K_FRACTION,
    keep_generations: bool = False,
) -> dict[str, Any]:
    """A JSON-ready report: ``splits[name]`` = {n_items, sha256, summary, items}, plus a top-level ``summary``.

    Splits accept whatever `read_eval_items` does. Top-level metrics appear only when their inputs
    exist: ``mia_auc`` (forget + holdout), ``forget_quality`` and ``privleak`` (a ``reference``
    report on the same data; ``privleak["min_k"]`` is MUSE's PrivLeak), ``model_utility`` (TOFU's:
    retain, real_authors and world_facts, each with perturbed answers; see `model_utility`),
    ``fluency_perplexity`` (retain). ``general`` is scored and reported, but is not part of utility.
    ``generate``: the splits answered greedily for ROUGE-L; True = `GENERATED_SPLITS` (all but
    holdout, which only serves membership inference), False = none.

    >>> # report = evaluate(model, tok, "forget.jsonl", retain="retain.jsonl", holdout="holdout.jsonl")
    >>> # print(format_table(report)); save_report(report, "reference.json")
    """
    fmt = PromptFormat.resolve(prompt_format, tokenizer)  # the request's format: asked as the served model is
    run = {"prompt_format": fmt, "max_length": max_length, "batch_size": batch_size}
    gen = {"max_new_tokens": max_new_tokens, "prompt_format": fmt, "batch_size": batch_size}
    sources = {"forget": forget, "retain": retain, "holdout": holdout, "real_authors": real_authors,
               "world_facts": world_facts, "general": general}
    generated = set(GENERATED_SPLITS if generate is True else generate or ())
    splits = {
        name: _split_report(model, tokenizer, read_eval_items(src), name, run, k, gen if name in generated else None,
                            keep_generations)
        for name, src in sources.items()
        if src is not None
    }
    top: dict[str, Any] = {}
    if "holdout" in splits:
        members, others = splits["forget"]["items"]["mia"], splits["holdout"]["items"]["mia"]
        top["mia_auc"] = {a: metrics.mia_auc(members[a], others[a]) for a in MIA_ATTACKS}
    if "retain" in splits:
        top["fluency_perplexity"] = splits["retain"]["summary"]["perplexity"]
    top.update(model_utility(splits))
    report = {"prompt_format": fmt.to_dict(), "splits": splits, "summary": top}
    if reference is not None:
        _check_same_data(report, reference, "forget")
        ours = [r for r in splits["forget"]["items"].get("truth_ratio", []) if r is not None]
        theirs = [r for r in reference["splits"]["forget"]["items"].get("truth_ratio", []) if r is not None]
        if ours and theirs:
            top["forget_quality"] = metrics.forget_quality(ours, theirs)
        ref_auc = reference.get("summary", {}).get("mia_auc")
        if "mia_auc" in top and ref_auc:
            _check_same_data(report, reference, "holdout")
            # MUSE's attack first; an attack that separates the reference perfectly (AUC 1) has no PrivLeak.
            order = (PRIVLEAK_ATTACK, *(a for a in MIA_ATTACKS if a != PRIVLEAK_ATTACK))
            top["privleak"] = {
                a: metrics.priv_leak(top["mia_auc"][a], ref_auc[a]) if ref_auc[a] < 1 else None for a in order
            }
    return report


def format_table(report: dict[str, Any]) -> str:
    """The summary numbers as an aligned plain-text table (per-split block, then model-level lines).

    >>> print(format_table({"splits": {"forget": {"n_items": 2, "summary": {"probability": 0.5}}}, "summary": {}}))
    metric      forget
    n_items          2
    probability    0.5
    """
    splits = report["splits"]
    names = list(splits)
    rows = [["metric", *names], ["n_items", *(number(splits[s]["n_items"]) for s in names)]]
    notes = []  # lists (e.g. missing utility components) go under the table, not into a column
    for m in sorted({m for s in splits.values() for m in s["summary"]}):
        rows.append([m, *(number(splits[s]["summary"].get(m)) for s in names)])
    for key, value in report.get("summary", {}).items():
        if isinstance(value, dict):
            rows.extend([f"{key}/{sub}", number(v)] for sub, v in value.items())
        elif isinstance(value, list):
            notes.append(f"{key}: {', '.join(value) or '-'}")
        else:
            rows.append([key, number(value)])
    return "\n".join([*align(rows, sep=" "), *notes])


def save_report(report: dict[str, Any], path: str | Path) -> None:
    """Write a report as JSON, e.g. a reference run to pass back later as ``reference=``."""
    Path(path).write_text(json.dumps(report, indent=1), encoding="utf-8")
