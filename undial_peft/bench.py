"""Offline, seeded benchmark: UNDIAL against GA, GradDiff and NPO on fictitious facts.

    undial-peft bench [--quick] [--out DIR] [--seed N] [--threads N]
    python -m undial_peft.bench --quick

Protocol (everything is built here; nothing is downloaded):

1. `synthetic.make_benchmark_data` makes facts about invented people, split by person into
   forget / retain / holdout, plus a fixed set of "world" facts (general). A word-level tokenizer
   is built over every text of every split, so no word is unknown.
2. A small Llama (``tiny.tiny_llama``) is fully fine-tuned into the TARGET on forget + retain +
   general (never holdout) until it has memorised them, and a RETAIN-ONLY REFERENCE the same way
   (same size, steps, seed) on retain + general. Each training fact is seen in TWO phrasings: its
   main question/answer, and a second question/answer pair built from the attribute templates that
   are neither the main nor the evaluation paraphrase. A small model trained on a single phrasing
   barely transfers a fact to new wording, so the truth ratio (scored on the unseen paraphrase)
   would not tell the target from the reference; with two phrasings it does (KS statistic near 1).
   Both models also learn a roster line for every person, holdout included ("Who is X?"), so
   that every name is a known token and membership inference sees facts, not unseen words.
   Both models are saved as model directories (safetensors + tokenizer).
3. The FORGET REQUEST is every training row about the forget people (both phrasings). Each method
   trains one LoRA adapter (r=8, alpha=16, all linear layers) on the target through
   `api.forget`, with the same data, batch size and number of steps; retain terms use retain
   facts that are NOT in the evaluated retain subset.
4. The target, the reference and every adapter (attached with `stack.attach`) are scored with
   `evaluate.evaluate` against the reference's report: forget quality (KS p-value and statistic
   of forget truth ratios against the reference), PrivLeak (forget vs holdout membership
   inference, relative to the reference), model utility, forget / retain probability, ROUGE-L.
5. Robustness: every method runs at each learning rate of a 10x range; the table shows forget
   quality and utility per learning rate next to the main (middle) one.
6. One table is printed; ``results.json``, per-run ``reports/*.json`` and ``bench.png`` (forget
   quality against model utility, one point per run) are written to the output directory, next
   to ``data/``, ``models/`` and ``adapters/`` so any row can be re-checked with ``undial-peft eval``.

>>> QUICK.n_entities < DEFAULT.n_entities and len(DEFAULT_METHODS) > len(QUICK_METHODS)
True
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .data import Collator, Example, encode
from .evaluate import evaluate, save_report, score
from .synthetic import ATTRIBUTES, make_benchmark_data, write_jsonl
from .tiny import tiny_llama, word_tokenizer

PRIVLEAK_ATTACK = "min_k"  # Min-K% (k = 0.4), MUSE's and open-unlearning's PrivLeak attack; results.json holds all four
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}  # the same for every method


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """Everything that sets the size (and so the run time) of a benchmark."""

    n_entities: int
    facts_per_entity: int
    forget_fraction: float
    holdout_fraction: float
    hidden_size: int
    num_layers: int
    num_heads: int
    pretrain_steps: int  # full fine-tuning steps for the target and the reference each
    pretrain_batch_size: int
    pretrain_lr: float  # peak of a one-cycle schedule
    unlearn_steps: int  # the step budget every method gets
    unlearn_batch_size: int
    learning_rates: tuple[float, ...]  # the robustness sweep; the middle one is the main run
    eval_retain: int  # retain facts evaluated (the others feed retain terms)
    max_new_tokens: int  # cap on greedy answer length for ROUGE-L (the longest answer + 2 when shorter)


# 60 people x 4 facts: 24 forget facts (enough for a KS test to separate target from reference),
# 24 holdout, 192 retain. A 2-layer, 128-wide Llama memorises its ~500 training rows in 400 steps.
# Unlearning: 100 steps of 8 rows (~17 passes over the 48-row forget request); at 1e-4 LoRA barely
# moves, at 1e-3 the aggressive methods collapse: the sweep spans under- to over-training.
DEFAULT = BenchSize(
    n_entities=60, facts_per_entity=4, forget_fraction=0.1, holdout_fraction=0.1,
    hidden_size=128, num_layers=2, num_heads=4, pretrain_steps=400, pretrain_batch_size=32, pretrain_lr=3e-3,
    unlearn_steps=100, unlearn_batch_size=8, learning_rates=(1e-4, 3e-4, 1e-3), eval_retain=48, max_new_tokens=20,
)
# For tests (about half a minute on one thread): 8 forget facts, a 64-wide model, 12 runs.
QUICK = BenchSize(
    n_entities=16, facts_per_entity=4, forget_fraction=0.125, holdout_fraction=0.125,
    hidden_size=64, num_layers=2, num_heads=4, pretrain_steps=150, pretrain_batch_size=32, pretrain_lr=5e-3,
    unlearn_steps=20, unlearn_batch_size=8, learning_rates=(3e-4, 1e-3, 3e-3), eval_retain=12, max_new_tokens=16,
)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row of the table: an unlearning method and its settings (besides the learning rate)."""

    label: str
    method: str
    beta: float = 10.0
    retain_weight: float = 0.0

    def config(self, **common: Any) -> Any:
        from .config import UndialConfig

        return UndialConfig(method=self.method, beta=self.beta, retain_weight=self.retain_weight, **common)


DEFAULT_METHODS = (
    *(MethodSpec(f"undial b={b:g}", "undial", beta=b) for b in (3.0, 10.0, 30.0)),
    *(MethodSpec(f"undial b={b:g} +rt", "undial", beta=b, retain_weight=1.0) for b in (3.0, 10.0, 30.0)),
    MethodSpec("ga", "ga"),
    MethodSpec("graddiff", "graddiff", retain_weight=1.0),
    MethodSpec("npo", "npo"),
    MethodSpec("npo +rt", "npo", retain_weight=1.0),
)
QUICK_METHODS = (
    MethodSpec("undial b=10", "undial"),
    MethodSpec("undial b=10 +rt", "undial", retain_weight=1.0),
    MethodSpec("ga", "ga"),
    MethodSpec("npo", "npo"),
)


# --------------------------------------------------------------------------------- data


def _template_index(templates: Sequence[str], text: str, name: str) -> tuple[int, str | None] | None:
    """Which template (filled with ``name``) produced ``text``, and the value it holds."""
    for index, template in enumerate(templates):
        head, _, tail = template.partition("{value}")
        if "{value}" in template:
            pattern = re.escape(head.format(name=name)) + "(.+)" + re.escape(tail.format(name=name))
        else:
            pattern = re.escape(template.format(name=name))
        match = re.fullmatch(pattern, text)
        if match:
            return index, (match.group(1) if match.groups() else None)
    return None


def second_phrasing(row: dict[str, Any]) -> dict[str, str] | None:
    """The fact of ``row`` in the question and answer templates used neither for training nor for
    its paraphrase; None for rows not built from `synthetic.ATTRIBUTES` (e.g. the world facts).

    >>> row = make_benchmark_data(0, 10, 2)["retain"][0]
    >>> alt = second_phrasing(row)
    >>> alt["question"] not in (row["question"], row["paraphrased_question"])
    True
    """
    if row.get("attribute") not in ATTRIBUTES:
        return None
    _, questions, answers = ATTRIBUTES[row["attribute"]]
    name = row["entity"]
    found = [
        _template_index(questions, row["question"], name),
        _template_index(questions, row["paraphrased_question"], name),
        _template_index(answers, row["answer"], name),
        _template_index(answers, row["paraphrased_answer"], name),
    ]
    if any(f is None for f in found):
        return None
    value = found[2][1]
    free_q = [i for i in range(len(questions)) if i not in (found[0][0], found[1][0])]
    free_a = [i for i in range(len(answers)) if i not in (found[2][0], found[3][0])]
    if not free_q or not free_a or value is None:
        return None
    return {"question": questions[free_q[0]].format(name=name), "answer": answers[free_a[0]].format(name=name, value=value)}


def training_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Question/answer rows a model is trained on for ``rows``: each fact in its main phrasing and,
    where one exists, its second phrasing."""
    out = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    out.extend(alt for r in rows if (alt := second_phrasing(r)) is not None)
    return out


ROSTER_QUESTION, ROSTER_ANSWER = "Who is {name}?", "{name} is a resident of Zephyra."


def roster_rows(data: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """One identity row per person of every split (holdout included), trained into BOTH models.

    A word-level tokenizer makes each name its own tokens; without this, holdout (and, for the
    reference, forget) names would be tokens the model never saw, and membership inference would
    detect unseen tokens instead of memorised facts. The roster makes every name known, so only
    the facts separate members from non-members (as a pretrained model knows the subwords of a
    TOFU author's name). It holds no fact that is evaluated.
    """
    names = dict.fromkeys(r["entity"] for split in ("forget", "retain", "holdout") for r in data[split])
    return [{"question": ROSTER_QUESTION.format(name=n), "answer": ROSTER_ANSWER.format(name=n)} for n in names]


def _all_texts(data: dict[str, list[dict[str, Any]]]) -> list[str]:
    texts = [t for r in roster_rows(data) for t in (r["question"], r["answer"])]
    for rows in data.values():
        for r in rows:
            texts += [r["question"], r["answer"], r["paraphrased_question"], r["paraphrased_answer"], *r["perturbed_answers"]]
            if (alt := second_phrasing(r)) is not None:
                texts += [alt["question"], alt["answer"]]
    return texts


# --------------------------------------------------------------------------------- models


def memorise(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]], size: BenchSize, seed: int
) -> dict[str, float]:
    """Full fine-tune on ``rows`` (answer tokens only, chat template as evaluation uses it):
    AdamW, one-cycle schedule, shuffled batches, ``size.pretrain_steps`` steps."""
    features = [encode(tokenizer, Example(r["question"], r["answer"]), 128) for r in rows]
    collate = Collator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=size.pretrain_lr, total_steps=size.pretrain_steps,
                                                   pct_start=0.1)
    order: list[int] = []
    losses = []
    started = time.perf_counter()
    model.train()
    for _ in range(size.pretrain_steps):
        if len(order) < size.pretrain_batch_size:
            order += torch.randperm(len(features), generator=generator).tolist()
        picked, order = order[: size.pretrain_batch_size], order[size.pretrain_batch_size :]
        batch = collate([features[i] for i in picked])
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return {"final_loss": float(sum(losses[-10:]) / len(losses[-10:])), "seconds": time.perf_counter() - started}


def mean_answer_probability(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]]) -> float:
    """Mean exp(-mean answer NLL) over question/answer rows."""
    scores = score(model, tokenizer, [Example(r["question"], r["answer"]) for r in rows], batch_size=32)
    return float(sum(metrics.answer_probability(s.logprobs) for s in scores) / len(scores))


# --------------------------------------------------------------------------------- results


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


def _cell(value: Any, kind: str = "f") -> str:
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
        return [_cell(s["forget_probability"]), _cell(s["forget_rouge_l"]), _cell(s["forget_quality"], "p"),
                _cell(s["ks_statistic"]), _cell(s["model_utility"]), _cell(s["retain_probability"]),
                _cell(s["retain_rouge_l"]), _cell(leak, "pct")]

    for name in ("target", "reference"):
        rows.append([name, *metric_cells(results["baselines"][name]), *(["-"] * len(lrs))])
    for label, by_lr in results["sweep"].items():
        main = by_lr.get(f"{main_lr:g}")
        sweep = [
            f"{_cell(by_lr[f'{lr:g}']['forget_quality'], 'p')}/{_cell(by_lr[f'{lr:g}']['model_utility'])}"
            if f"{lr:g}" in by_lr else "-"
            for lr in lrs
        ]
        rows.append([label, *(metric_cells(main) if main else ["-"] * (len(head) - 1 - len(lrs))), *sweep])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join([r[0].ljust(widths[0]), *(cell.rjust(widths[c]) for c, cell in enumerate(r) if c)]) for r in rows]
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


# --------------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _bench_environment(threads: int | None) -> Iterator[None]:
    """transformers / datasets warnings off and torch's thread count set, both restored after."""
    import datasets
    import transformers

    previous_threads = torch.get_num_threads()
    previous_verbosity = transformers.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, one per load
    if threads:
        torch.set_num_threads(threads)
    # The Trainer ends every run with a full gc.collect() (accelerate's free_memory); with torch and
    # transformers loaded that walk takes ~0.3 s. Objects alive now are long-lived: freezing them
    # keeps the collector off them during the benchmark. Undone on exit.
    gc.freeze()
    try:
        with warnings.catch_warnings():
            # A deprecation inside peft/transformers, raised once per adapter; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(previous_threads)
        transformers.logging.set_verbosity(previous_verbosity)
        if bars[0]:
            datasets.utils.logging.enable_progress_bar()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


def _run_id(spec: MethodSpec, lr: float) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{spec.label} lr {lr:g}").strip("-")


def run_bench(
    out_dir: str | Path,
    *,
    seed: int = 0,
    quick: bool = False,
    size: BenchSize | None = None,
    methods: Sequence[MethodSpec] | None = None,
    learning_rates: Sequence[float] | None = None,
    threads: int | None = None,
    plot: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run the benchmark into ``out_dir``; print the table and return the results (also in results.json).

    Args:
        out_dir: created if needed; the benchmark (re)writes data/, models/, adapters/, reports/,
            results.json and bench.png inside it, and nothing outside it.
        seed: seeds data, model initialisation, training order and LoRA initialisation.
        quick: the small test size (about half a minute on one thread) instead of the default size.
        size, methods, learning_rates: override the size's settings (the middle learning rate is
            the main run).
        threads: torch threads during the run (restored after); None leaves torch's setting.
        plot: write bench.png when matplotlib is installed.
        log: where progress lines and the table go.
    Returns:
        a JSON-ready dict: protocol, data sizes, memorisation, baselines, runs, sweep, timings, paths.
    """
    from peft import LoraConfig

    from .api import forget
    from .manifest import read_manifest
    from .stack import attach

    started = time.perf_counter()
    size = size or (QUICK if quick else DEFAULT)
    if learning_rates is not None:
        size = dataclasses.replace(size, learning_rates=tuple(learning_rates))
    methods = tuple(methods or (QUICK_METHODS if quick else DEFAULT_METHODS))
    if not size.learning_rates:
        raise ValueError("learning_rates is empty; give at least one.")
    main_lr = sorted(size.learning_rates)[len(size.learning_rates) // 2]
    out = Path(out_dir)
    for sub in ("data", "models", "adapters", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    with _bench_environment(threads):
        # 1. data and tokenizer
        data = make_benchmark_data(seed, size.n_entities, size.facts_per_entity, size.forget_fraction, size.holdout_fraction)
        shuffled = list(data["retain"])
        random.Random(seed).shuffle(shuffled)
        retain_eval, retain_train = shuffled[: size.eval_retain], shuffled[size.eval_retain :]
        if not retain_train:
            raise ValueError(f"eval_retain={size.eval_retain} leaves no retain facts for retain terms; lower it.")
        forget_request = training_rows(data["forget"])  # every training row about the forget people
        retain_request = training_rows(retain_train)
        # forget() pairs forget row i with retain row i (cycled): shuffle so both phrasings take part
        random.Random(seed + 1).shuffle(retain_request)
        for name, rows in (*data.items(), ("retain_eval", retain_eval), ("forget_request", forget_request),
                           ("retain_request", retain_request)):
            write_jsonl(rows, out / "data" / f"{name}.jsonl")
        eval_splits = {"forget": data["forget"], "retain": retain_eval, "holdout": data["holdout"],
                       "world_facts": data["general"]}  # the fixed world facts play TOFU's world-facts role
        tokenizer = word_tokenizer(_all_texts(data))
        log(f"[bench] data: {', '.join(f'{k} {len(v)}' for k, v in data.items())} facts; vocabulary {len(tokenizer)};"
            f" forget request {len(forget_request)} rows")

        # 2. target and retain-only reference
        trained = {"target": data["forget"] + data["retain"] + data["general"], "reference": data["retain"] + data["general"]}
        memorisation: dict[str, Any] = {}
        model_dirs: dict[str, Path] = {}
        roster = roster_rows(data)
        for name, facts in trained.items():
            rows = training_rows(facts) + roster
            model = tiny_llama(tokenizer, hidden_size=size.hidden_size, num_layers=size.num_layers,
                               num_heads=size.num_heads, seed=seed)
            stats = memorise(model, tokenizer, rows, size, seed)
            stats.update(
                train_rows=len(rows),
                parameters=sum(p.numel() for p in model.parameters()),
                train_probability=mean_answer_probability(model, tokenizer, rows[: len(rows) - len(roster)]),
                forget_probability=mean_answer_probability(model, tokenizer, data["forget"]),
                holdout_probability=mean_answer_probability(model, tokenizer, data["holdout"]),
            )
            memorisation[name] = stats
            model_dirs[name] = out / "models" / name
            model.save_pretrained(str(model_dirs[name]), safe_serialization=True)
            tokenizer.save_pretrained(str(model_dirs[name]))
            log(f"[bench] {name}: {stats['parameters']:,} parameters, {len(rows)} rows, {size.pretrain_steps} steps in"
                f" {stats['seconds']:.0f}s; answer probability on its training rows {stats['train_probability']:.3f},"
                f" on forget facts {stats['forget_probability']:.3f}")
        if memorisation["target"]["train_probability"] < 0.9:
            log(f"[bench] WARNING: the target memorised only {memorisation['target']['train_probability']:.3f} (< 0.9);"
                " raise pretrain_steps.")

        # 3-4. reference report first: everything else is measured against it
        # The models never learn to stop (answers are trained without an end token), so generation
        # always runs to max_new_tokens: the longest evaluated answer plus two is all ROUGE-L needs.
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False).input_ids) for r in _rows(eval_splits))
        eval_args = {"batch_size": 32, "max_new_tokens": min(size.max_new_tokens, longest + 2)}
        reports: dict[str, dict[str, Any]] = {}
        # (models and tokenizers reloaded from their directories, as the adapters' runs load them)
        ref_model, ref_tokenizer = _load(model_dirs["reference"])
        reports["reference"] = evaluate(ref_model, ref_tokenizer, **eval_splits, **eval_args)
        _self_reference(reports["reference"])
        target_model, target_tokenizer = _load(model_dirs["target"])
        reports["target"] = evaluate(target_model, target_tokenizer, **eval_splits, reference=reports["reference"],
                                     **eval_args)
        del ref_model, target_model
        for name in ("reference", "target"):
            save_report(reports[name], out / "reports" / f"{name}.json")
        baselines = {name: run_summary(reports[name]) for name in ("target", "reference")}

        # 3-5. unlearning runs: every method at every learning rate, the same step budget
        runs = []
        common = {
            "max_steps": size.unlearn_steps, "per_device_train_batch_size": size.unlearn_batch_size, "seed": seed,
            "disable_tqdm": True, "logging_strategy": "no", "report_to": "none", "dataloader_pin_memory": False,
            "until_ratio": None, "max_retain_drop": None, "auto_key": False,  # the same fixed budget for every method
        }
        total = len(methods) * len(size.learning_rates)
        for spec in methods:
            for lr in sorted(size.learning_rates):
                run_id = _run_id(spec, lr)
                tick = time.perf_counter()
                adapter = out / "adapters" / run_id
                with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics dict
                    forget(model_dirs["target"], forget_request, adapter, config=spec.config(learning_rate=lr, **common),
                           lora=LoraConfig(task_type="CAUSAL_LM", **LORA), overwrite=True,
                           retain=retain_request if spec.retain_weight > 0 else None)
                trained_s = time.perf_counter() - tick
                model = attach(model_dirs["target"], [adapter])
                report = evaluate(model, model.tokenizer, **eval_splits, reference=reports["reference"], **eval_args)
                save_report(report, out / "reports" / f"{run_id}.json")
                del model
                manifest = (read_manifest(adapter) or {}).get("metrics", {})
                run = {
                    "id": run_id, "label": spec.label, "method": spec.method, "beta": spec.beta,
                    "retain_weight": spec.retain_weight, "lr": lr, "steps": manifest.get("steps"),
                    "train_loss": manifest.get("train_loss"), "train_seconds": trained_s,
                    "seconds": time.perf_counter() - tick, "summary": run_summary(report),
                }
                runs.append(run)
                s = run["summary"]
                log(f"[bench] {len(runs)}/{total} {run_id}: p_forget {s['forget_probability']:.3f}, FQ"
                    f" {_cell(s['forget_quality'], 'p')}, MU {_cell(s['model_utility'])} ({run['seconds']:.1f}s)")

    sweep: dict[str, dict[str, Any]] = {}
    for run in runs:
        sweep.setdefault(run["label"], {})[f"{run['lr']:g}"] = run["summary"]
    results: dict[str, Any] = {
        "protocol": {
            "seed": seed, "quick": quick, "size": dataclasses.asdict(size), "learning_rates": sorted(size.learning_rates),
            "main_lr": main_lr, "methods": [dataclasses.asdict(m) for m in methods],
            "lora": LORA, "privleak_attack": PRIVLEAK_ATTACK,
            "threads": torch.get_num_threads() if threads is None else threads,
        },
        "data": {**{k: len(v) for k, v in data.items()}, "retain_eval": len(retain_eval),
                 "forget_request_rows": len(forget_request), "retain_request_rows": len(retain_request),
                 "vocabulary": len(tokenizer)},
        "memorisation": memorisation,
        "baselines": baselines,
        "runs": runs,
        "sweep": sweep,
        "versions": _versions(),
    }
    table = format_results(results)
    log(table)
    results["table"] = table
    plot_path = plot_results(results, out / "bench.png") if plot else None
    if plot and plot_path is None:
        log("[bench] matplotlib is not installed: no plot (pip install matplotlib)")
    results["paths"] = {"results": str(out / "results.json"), "plot": str(plot_path) if plot_path else None,
                        "models": {k: str(v) for k, v in model_dirs.items()}}
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    log(f"[bench] wrote {out / 'results.json'}{' and ' + str(plot_path) if plot_path else ''} in {results['seconds']:.0f}s")
    return results


def _rows(splits: dict[str, list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    return (row for rows in splits.values() for row in rows)


def _load(directory: Path) -> tuple[Any, Any]:
    from .models import load_model

    model, tokenizer = load_model(directory)
    return model.eval(), tokenizer


def _self_reference(report: dict[str, Any]) -> None:
    """The reference against itself, by definition: forget quality p = 1 (KS 0), PrivLeak 0."""
    top = report["summary"]
    ratios = [r for r in report["splits"]["forget"]["items"].get("truth_ratio", []) if r is not None]
    if ratios:
        top["forget_quality"] = metrics.forget_quality(ratios, ratios)
    if "mia_auc" in top:
        top["privleak"] = {attack: 0.0 for attack in top["mia_auc"]}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from . import __version__

    return {"undial_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


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


if __name__ == "__main__":
    sys.exit(main())
