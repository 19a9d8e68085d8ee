"""Offline, seeded benchmark: UNDIAL against GA, GradDiff and NPO on fictitious facts (tiny target).

    undial-peft bench [--quick] [--out DIR] [--seed N] [--threads N]
    python -m undial_peft.bench --quick

Protocol (everything is built here; nothing is downloaded):

1. `synthetic.make_benchmark_data` makes facts about invented people, split by person into
   forget / retain / holdout, plus a fixed set of "world" facts (general). A word-level tokenizer
   is built over every text of every split, so no word is unknown.
2. A small Llama (``tiny.tiny_llama``) is fully fine-tuned into the TARGET on forget + retain +
   general (never holdout) until it has memorised them, and a RETAIN-ONLY REFERENCE the same way
   (same size, steps, seed) on retain + general. Each training fact is seen in TWO phrasings
   (`data.training_rows`), and both models learn a roster line for every person
   (`data.roster_rows`). Both models are saved as model directories (safetensors + tokenizer).
3. The FORGET REQUEST is every training row about the forget people (both phrasings). Each method
   trains one LoRA adapter (r=8, alpha=16, all linear layers) on the target through
   `forget`, with the same data, batch size and number of steps; retain terms use retain
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

>>> # results = run_bench("bench-out", quick=True); results["runs"][0]["summary"]["forget_quality"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from undial_peft.bench.data import all_texts, roster_rows, training_rows
from undial_peft.bench.report import cell, format_results, plot_results, run_summary, self_reference
from undial_peft.bench.settings import (
    DEFAULT,
    DEFAULT_METHODS,
    LORA,
    PRIVLEAK_ATTACK,
    QUICK,
    QUICK_METHODS,
    BenchSize,
    MethodSpec,
    run_id,
)
from undial_peft.bench.targets import load_target, mean_answer_probability, memorise
from undial_peft.data.synthetic import make_benchmark_data, write_jsonl
from undial_peft.errors import UndialConfigError
from undial_peft.evals.report import evaluate, save_report
from undial_peft.tiny import tiny_llama, word_tokenizer
from undial_peft.utils.versions import versions


@contextlib.contextmanager
def bench_environment(threads: int | None) -> Iterator[None]:
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
    started = time.perf_counter()
    size = size or (QUICK if quick else DEFAULT)
    if learning_rates is not None:
        size = dataclasses.replace(size, learning_rates=tuple(learning_rates))
    methods = tuple(methods or (QUICK_METHODS if quick else DEFAULT_METHODS))
    if not size.learning_rates:
        raise UndialConfigError("learning_rates is empty; give at least one.")
    main_lr = sorted(size.learning_rates)[len(size.learning_rates) // 2]
    out = Path(out_dir)
    for sub in ("data", "models", "adapters", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    with bench_environment(threads):
        # 1. data and tokenizer
        data = make_benchmark_data(seed, size.n_entities, size.facts_per_entity, size.forget_fraction, size.holdout_fraction)
        shuffled = list(data["retain"])
        random.Random(seed).shuffle(shuffled)
        retain_eval, retain_train = shuffled[: size.eval_retain], shuffled[size.eval_retain :]
        if not retain_train:
            raise UndialConfigError(f"eval_retain={size.eval_retain} leaves no retain facts for retain terms; lower it.")
        forget_request = training_rows(data["forget"])  # every training row about the forget people
        retain_request = training_rows(retain_train)
        # forget() pairs forget row i with retain row i (cycled): shuffle so both phrasings take part
        random.Random(seed + 1).shuffle(retain_request)
        for name, rows in (*data.items(), ("retain_eval", retain_eval), ("forget_request", forget_request),
                           ("retain_request", retain_request)):
            write_jsonl(rows, out / "data" / f"{name}.jsonl")
        eval_splits = {"forget": data["forget"], "retain": retain_eval, "holdout": data["holdout"],
                       "world_facts": data["general"]}  # the fixed world facts play TOFU's world-facts role
        tokenizer = word_tokenizer(all_texts(data))
        log(f"[bench] data: {', '.join(f'{k} {len(v)}' for k, v in data.items())} facts; vocabulary {len(tokenizer)};"
            f" forget request {len(forget_request)} rows")

        # 2. target and retain-only reference
        model_dirs, memorisation = _train_tiny_models(data, tokenizer, size, seed, out / "models", log)

        # 3-4. reference report first: everything else is measured against it
        # The models never learn to stop (answers are trained without an end token), so generation
        # always runs to max_new_tokens: the longest evaluated answer plus two is all ROUGE-L needs.
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False).input_ids) for r in _rows(eval_splits))
        eval_args = {"batch_size": 32, "max_new_tokens": min(size.max_new_tokens, longest + 2)}
        reports: dict[str, dict[str, Any]] = {}
        # (models and tokenizers reloaded from their directories, as the adapters' runs load them)
        ref_model, ref_tokenizer = load_target(model_dirs["reference"])
        reports["reference"] = evaluate(ref_model, ref_tokenizer, **eval_splits, **eval_args)
        self_reference(reports["reference"])
        target_model, target_tokenizer = load_target(model_dirs["target"])
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
            "until_ratio": None, "max_retain_drop": None,  # the same fixed budget for every method (auto_key: MethodSpec)
        }
        total = len(methods) * len(size.learning_rates)
        for spec in methods:
            for lr in sorted(size.learning_rates):
                rid = run_id(spec, lr)
                report, record = train_and_score(model_dirs["target"], forget_request, out / "adapters" / rid, spec,
                                                 {"learning_rate": lr, **common}, eval_splits, reports["reference"],
                                                 eval_args, retain=retain_request)
                save_report(report, out / "reports" / f"{rid}.json")
                run = {"id": rid, "label": spec.label, "method": spec.method, "beta": spec.beta,
                       "retain_weight": spec.retain_weight, "lr": lr, **record, "summary": run_summary(report)}
                runs.append(run)
                s = run["summary"]
                log(f"[bench] {len(runs)}/{total} {rid}: p_forget {s['forget_probability']:.3f}, FQ"
                    f" {cell(s['forget_quality'], 'p')}, MU {cell(s['model_utility'])} ({run['seconds']:.1f}s)")

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
        "versions": versions(),
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


def _train_tiny_models(
    data: dict[str, list[dict[str, Any]]], tokenizer: Any, size: BenchSize, seed: int, models: Path,
    log: Callable[[str], Any],
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Train and save the tiny target (forget + retain + general) and reference (retain + general)."""
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
        model_dirs[name] = models / name
        model.save_pretrained(str(model_dirs[name]), safe_serialization=True)
        tokenizer.save_pretrained(str(model_dirs[name]))
        log(f"[bench] {name}: {stats['parameters']:,} parameters, {len(rows)} rows, {size.pretrain_steps} steps in"
            f" {stats['seconds']:.0f}s; answer probability on its training rows {stats['train_probability']:.3f},"
            f" on forget facts {stats['forget_probability']:.3f}")
    if memorisation["target"]["train_probability"] < 0.9:
        log(f"[bench] WARNING: the target memorised only {memorisation['target']['train_probability']:.3f} (< 0.9);"
            " raise pretrain_steps.")
    return model_dirs, memorisation


def train_and_score(
    target: Path, rows: Sequence[dict[str, Any]], adapter: Path, spec: MethodSpec, config: dict[str, Any],
    splits: dict[str, Any], reference: dict[str, Any] | None, eval_args: dict[str, Any], *,
    retain: Sequence[dict[str, Any]] | None = None, stack: Sequence[Path] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one adapter with `forget` on top of ``stack`` (``retain`` used when the method has a
    retain term), attach the stack plus it to ``target``, and evaluate it on ``splits``.

    Returns (the `evaluate` report, a run record: steps, train loss, why it stopped, keys, seconds).
    """
    from peft import LoraConfig

    from undial_peft.deploy.manifest import read_manifest
    from undial_peft.deploy.stack import attach
    from undial_peft.training.forget import forget

    tick = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics dict
        forget(target, rows, adapter, config=spec.config(**config), lora=LoraConfig(task_type="CAUSAL_LM", **LORA),
               stack=list(stack), retain=retain if spec.retain_weight > 0 else None, overwrite=True)
    trained = time.perf_counter() - tick
    model = attach(target, [*stack, adapter])
    report = evaluate(model, model.tokenizer, **splits, reference=reference, **eval_args)
    del model
    manifest = read_manifest(adapter) or {}
    metrics = manifest.get("metrics", {})
    record = {"steps": metrics.get("steps"), "train_loss": metrics.get("train_loss"), "train_seconds": trained,
              "seconds": time.perf_counter() - tick}
    record.update({key: manifest[key] for key in ("stopping", "keys") if key in manifest})  # why it stopped; key counts
    return report, record
