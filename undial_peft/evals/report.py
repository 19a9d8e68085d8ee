"""Run a model on forget / retain / holdout / general data and report unlearning metrics.

`score` and `greedy_answers` run the model; `evaluate` turns their output into a JSON-ready
report through the pure functions of `undial_peft.evals.metrics`. A report holds per-item values, so
the report of a retain-only reference model can be saved and passed back as ``reference=`` for
forget quality and PrivLeak. Reports hold numbers and data digests, never the texts themselves
(forget data is what the user wants gone), unless ``keep_generations=True``.

>>> items = read_eval_items([{"question": "Who?", "answer": "Ana.", "perturbed_answers": ["Bo."]}])
>>> items[0].perturbed_answers
('Bo.',)
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from undial_peft.data.digests import key_id, keyed_sha256
from undial_peft.data.encoding import encode
from undial_peft.data.prompt_format import AUTO, FormatSpec, PromptFormat
from undial_peft.data.readers import Example, _read_rows
from undial_peft.errors import UndialDataError
from undial_peft.evals import MAX_NEW_TOKENS, SPLITS, metrics
from undial_peft.evals.scoring import TokenScores, greedy_answers, greedy_from_ids, score, score_features
from undial_peft.training.loss import IGNORE_INDEX
from undial_peft.utils.tables import align, number

__all__ = ["EvalItem", "MAX_NEW_TOKENS", "PROTOCOLS", "TokenScores", "evaluate", "format_table", "greedy_answers",
           "item_features", "item_prompt", "read_eval_items", "save_report", "score"]

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


@dataclass(frozen=True)
class Protocol:
    """How a benchmark builds its prompts, where it differs from this package's chat-template default.

    ``separator`` joins the raw prompt and the answer, tokenised as one string with no chat template
    (None: a text row, every token scored); ``max_new_tokens`` is the benchmark's own greedy budget,
    used instead of `evaluate`'s; ``max_tokens`` caps the tokens after the prompt (None: no cap);
    the greedy text is cut at the first ``stop`` string.
    """

    separator: str | None
    max_new_tokens: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()


# MUSE, as open-unlearning runs it (configs/eval/muse_metrics, configs/data/datasets/MUSE_*.yaml):
# VerbMem continues ``prompt + " " + gt`` (CompletionDataset, insert_space) for 128 tokens, gt cut at
# 2048 tokens; KnowMem asks in the Llama-2 "Question: ...\nAnswer: " format after the *_icl
# examples, 32 tokens, cut at its stop words; PrivLeak scores each text up to 2048 tokens (MUSE_MIA).
PROTOCOLS = {
    "muse_verbmem": Protocol(separator=" ", max_new_tokens=128, max_tokens=2048),
    "muse_knowmem": Protocol(separator="", max_new_tokens=32, stop=("\n\n", "\nQuestion", "Question:")),
    "muse_privleak": Protocol(separator=None, max_tokens=2048),
}


@dataclass(frozen=True)
class EvalItem:
    """One evaluation item; perturbed answers enable the truth ratio. ``question`` None = raw text.

    The true side of the truth ratio is the paraphrased answer when given, else the answer itself
    (TOFU: ``base_answer_key`` is paraphrased_answer on forget/retain, answer on real-authors /
    world-facts). ``paraphrased_question`` is kept for the paraphrase attack, not for the ratio.
    ``protocol`` names a benchmark's prompt format in `PROTOCOLS` (None: the chat template);
    ``few_shot`` holds its in-context (question, answer) pairs.
    """

    question: str | None
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None
    protocol: str | None = None
    few_shot: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def has_truth_ratio(self) -> bool:
        return len(self.perturbed_answers) > 0

    @property
    def true_answer(self) -> str:
        return self.paraphrased_answer if self.paraphrased_answer is not None else self.answer


def _optional_text(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UndialDataError(f"{where}: field {key!r} must be a non-empty string or absent.")
    return value


def read_eval_items(source: str | Path | Sequence[dict | Example | EvalItem]) -> list[EvalItem]:
    """Read evaluation items from a file (.jsonl/.json/.csv/.parquet), dicts, Examples or EvalItems.

    Field names are those `undial_peft.data.synthetic` writes; TOFU's ``perturbed_answer`` is accepted too.

    >>> read_eval_items([Example("Q?", "A.")])[0]
    EvalItem(question='Q?', answer='A.', paraphrased_answer=None, perturbed_answers=(), paraphrased_question=None, protocol=None)
    """
    items = []
    rows = source if isinstance(source, Sequence) and not isinstance(source, str) else None
    for where, row in ((f"row {i}", r) for i, r in enumerate(rows)) if rows is not None else _read_rows(source):
        if isinstance(row, EvalItem):
            items.append(row)
            continue
        if isinstance(row, Example):
            items.append(EvalItem(row.prompt, row.answer))
            continue
        if not isinstance(row, dict):
            raise UndialDataError(f"{where}: expected a dict, Example or EvalItem, got {type(row).__name__}.")
        # The training data's other shapes ({"prompt", "completion"}, {"text"}) are accepted too.
        question = _optional_text(row, "question" if "question" in row else "prompt", where)
        answer = _optional_text(row, next((k for k in ("answer", "completion", "text") if k in row), "answer"), where)
        if answer is None:
            raise UndialDataError(f"{where}: field 'answer' is missing; evaluation rows need question/answer.")
        perturbed = row.get("perturbed_answers", row.get("perturbed_answer")) or ()
        if isinstance(perturbed, str) or not all(isinstance(p, str) and p.strip() for p in perturbed):
            raise UndialDataError(f"{where}: 'perturbed_answers' must be a list of non-empty strings.")
        protocol = row.get("protocol")
        if protocol is not None and protocol not in PROTOCOLS:
            raise UndialDataError(f"{where}: unknown protocol {protocol!r}; use one of {sorted(PROTOCOLS)} or leave it out.")
        shots = row.get("few_shot") or ()
        if not all(isinstance(s, dict) and isinstance(s.get("question"), str) and isinstance(s.get("answer"), str)
                   for s in shots):
            raise UndialDataError(f"{where}: 'few_shot' must be a list of {{\"question\", \"answer\"}} objects.")
        items.append(
            EvalItem(
                question,
                answer,
                _optional_text(row, "paraphrased_answer", where),
                tuple(perturbed),
                _optional_text(row, "paraphrased_question", where),
                protocol,
                tuple((s["question"], s["answer"]) for s in shots),
            )
        )
    if not items:
        raise UndialDataError("no evaluation items given.")
    return items


def item_prompt(item: EvalItem) -> str | None:
    """The raw prompt text of a protocol item (None for text rows); for others, the question.

    MUSE KnowMem: each in-context pair as ``"Question: {q}\\nAnswer: {a}\\n\\n"``, then
    ``"Question: {question}\\nAnswer: "`` (open-unlearning's Llama-2 template for MUSE).

    >>> item_prompt(EvalItem("Q?", "A.", protocol="muse_knowmem", few_shot=(("P?", "B."),)))
    'Question: P?\\nAnswer: B.\\n\\nQuestion: Q?\\nAnswer: '
    """
    if item.protocol == "muse_knowmem":
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in item.few_shot)
        return f"{shots}Question: {item.question}\nAnswer: "
    return item.question


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


def items_digest(items: Sequence[EvalItem]) -> str:
    """Keyed digest (`data.secret`) of every text field that a metric reads (paraphrases and perturbations
    included): the reference check compares it; without the key, a guess cannot be confirmed from a report.

    >>> items_digest([EvalItem("Q?", "A.")]) != items_digest([EvalItem("Q?", "A.", perturbed_answers=("B.",))])
    True
    """
    return keyed_sha256(
        # the protocol and its examples change what is scored; appended only when set, so the
        # digests of earlier reports (no protocol) still match
        json.dumps([it.question, it.answer, it.paraphrased_answer, list(it.perturbed_answers), it.paraphrased_question,
                    *([it.protocol, [list(s) for s in it.few_shot]] if it.protocol else [])],
                   ensure_ascii=False).encode("utf-8") + b"\n"
        for it in items
    )


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
