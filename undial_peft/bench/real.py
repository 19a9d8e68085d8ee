"""The real-model benchmark: a pretrained model (SmolLM2-135M-Instruct by default) is fine-tuned on
fictitious people, then every method unlearns some of them through the same `forget`.

    undial-peft bench --model default [--quick] [--out DIR] [--cache DIR]

Protocol (TOFU-style; everything runs offline):

1. `data.real_splits`: ~40 fictitious people x ~5 facts (`synthetic`), answered in the model's
   lead-in style, each with a paraphrased and three perturbed answers. People are split into a
   request pool (forgotten later), holdout people (never trained: the non-members of membership
   inference) and retain people. General = real world facts the base model already knows.
2. `targets.cached_fine_tune`: the TARGET is the base fine-tuned on pool + retain people; the
   RETAIN-ONLY REFERENCE the same recipe on retain people only. Both are cached on disk under a hash
   of their recipe (base, data, settings), so a rerun skips them.
3. Single request: the first ~10% of the people. Every method (UNDIAL without keys, with automatic
   keys, with a retain term; GA, GradDiff, NPO, NPO + retain) trains one LoRA adapter with
   `forget`'s stopping rule (stop at the target, or at the step limit); the swept methods
   (`settings.SWEEP_METHODS`, or all with ``--sweep-all``) also at three learning rates spanning
   10x with the same fixed step budget. Each adapter is scored against the
   reference: forget quality (KS on forget truth ratios), model utility, probabilities, ROUGE-L,
   PrivLeak.
4. Sequential requests (`sequential.run_sequence`): the pool's first requests one after another,
   stacked, with the stopping rule; after each, forget quality of everything asked so far, the
   probability of the people not asked yet, and model utility.
5. One table is printed; ``results.json``, ``reports/*.json`` and ``bench_real.png`` are written.
   Each finished single-request cell leaves ``reports/<id>.run.json``, keyed by what it depends
   on: a rerun into the same directory (e.g. after an interruption) reuses it.

>>> # results = run_real_bench("bench-real", quick=True); print(results["table"])
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from undial_peft import __version__
from undial_peft.bench.data import real_splits
from undial_peft.bench.real_report import format_real, plot_real
from undial_peft.bench.report import run_summary, self_reference
from undial_peft.bench.runs import bench_environment, train_and_score
from undial_peft.bench.sequential import run_sequence
from undial_peft.bench.settings import (
    ATTACKED_METHODS,
    ATTACKS,
    LORA,
    REAL,
    REAL_METHODS,
    REAL_QUICK,
    SEQUENTIAL_METHODS,
    SWEEP_METHODS,
    MethodSpec,
    RealSize,
    run_id,
)
from undial_peft.bench.targets import cached_fine_tune, load_target, recipe_key, rows_digest
from undial_peft.data.synthetic import write_jsonl
from undial_peft.errors import UndialConfigError
from undial_peft.evals.report import evaluate, save_report
from undial_peft.utils.storage import atomic_file
from undial_peft.utils.versions import versions

QUIET = {"disable_tqdm": True, "logging_strategy": "no", "report_to": "none", "dataloader_pin_memory": False}


def run_real_bench(
    out_dir: str | Path,
    *,
    model: str | Path = "default",
    seed: int = 0,
    quick: bool = False,
    size: RealSize | None = None,
    methods: Sequence[MethodSpec] | None = None,
    swept: Sequence[str] | None = None,
    sequential: Sequence[str] | None = None,
    attacked: Sequence[str] | None = None,
    single: bool = True,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    plot: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run the real-model benchmark into ``out_dir``; print the table and return the results.

    Args:
        model: the pretrained base: "default" (embedded SmolLM2-135M-Instruct), a directory or a .gguf.
        size, methods: override the preset (``quick`` picks `REAL_QUICK`); the middle learning rate is main.
        swept: labels of ``methods`` run at every learning rate with the fixed step budget (default
            `settings.SWEEP_METHODS`; every method still runs once with the stopping rule).
        sequential: labels of ``methods`` stacked over the first ``size.stacked_requests`` requests (empty: skip).
        attacked: labels of ``methods`` whose stopping-rule adapter is attacked (`settings.ATTACKS`; empty: skip).
        single: run the single-request part (every method with the stopping rule, the sweep, the attacks);
            False runs only the sequential part (``--stacked-only``).
        cache_dir: where fine-tuned targets are cached (default ``out_dir/models``).
    Returns:
        a JSON-ready dict: protocol, data sizes, targets, baselines, sweep, stopping, sequential, timings.
    """
    started = time.perf_counter()
    size = size or (REAL_QUICK if quick else REAL)
    methods = tuple(methods or REAL_METHODS)
    swept = tuple(SWEEP_METHODS if swept is None else swept) if single else ()
    sequential = tuple(SEQUENTIAL_METHODS if sequential is None else sequential)
    attacked = tuple(ATTACKED_METHODS if attacked is None else attacked) if single else ()
    unknown = [label for label in (*swept, *sequential, *attacked) if label not in {m.label for m in methods}]
    if unknown:
        raise UndialConfigError(f"swept, sequential or attacked methods {unknown} are not among the methods; choose from"
                         f" {[m.label for m in methods]}.")
    main_lr = sorted(size.learning_rates)[len(size.learning_rates) // 2]
    out = Path(out_dir)
    for sub in ("data", "adapters", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "models"

    with bench_environment(threads):
        data = real_splits(seed, size)
        for name in ("pool", "main", "retain_eval", "retain_train", "holdout", "world_facts", "real_authors"):
            write_jsonl(data[name], out / "data" / f"{name}.jsonl")
        log(f"[bench] data: request pool {len(data['pool'])} facts in {size.requests} requests, single request"
            f" {len(data['main'])}, retain {len(data['retain'])} ({len(data['retain_eval'])} evaluated), holdout"
            f" {len(data['holdout'])}; real world facts {len(data['world_facts'])}, real authors {len(data['real_authors'])}")

        targets: dict[str, Any] = {}
        for name, rows in (("target", data["pool"] + data["retain"]), ("reference", data["retain"])):
            path, stats = cached_fine_tune(model, name, rows, size, cache, seed, probe=data["main"], log=log)
            targets[name] = {"path": str(path), **stats}
        target, reference_dir = Path(targets["target"]["path"]), Path(targets["reference"]["path"])

        splits = {"forget": data["main"], "retain": data["retain_eval"], "holdout": data["holdout"],
                  "world_facts": data["world_facts"], "real_authors": data["real_authors"]}
        eval_args = {"batch_size": 16, "max_new_tokens": size.max_new_tokens}
        reports = {"reference": _evaluate_dir(reference_dir, splits, None, eval_args)}
        self_reference(reports["reference"])
        reports["target"] = _evaluate_dir(target, splits, reports["reference"], eval_args)
        for name, report in reports.items():
            save_report(report, out / "reports" / f"{name}.json")
        baselines = {name: run_summary(reports[name]) for name in ("target", "reference")}
        log(f"[bench] target: p_forget {baselines['target']['forget_probability']:.3f}, FQ"
            f" {baselines['target']['forget_quality']:.2g}; reference: p_forget"
            f" {baselines['reference']['forget_probability']:.3f}")

        runs: list[dict[str, Any]] = []
        fixed = {"max_steps": size.unlearn_steps, "until_ratio": None, "max_retain_drop": None}
        cells = [(spec, lr, "sweep", fixed) for spec in methods if spec.label in swept for lr in sorted(size.learning_rates)]
        cells += [(spec, None, "stop", {"max_steps": 4 * size.unlearn_steps}) for spec in methods if single]
        for spec, lr, kind, settings in cells:
            rid = f"{kind}-{run_id(spec, lr) if lr else run_id(spec, 0).removesuffix('-lr-0')}"
            config = {**QUIET, **settings, "per_device_train_batch_size": size.unlearn_batch_size, "seed": seed}
            if lr is not None:
                config["learning_rate"] = lr
            key = cell_key(target, rid, spec, config, data["main"], eval_args)
            done = out / "reports" / f"{rid}.run.json"
            run = _finished(done, key)
            if run is None:
                report, record = train_and_score(target, data["main"], out / "adapters" / rid, spec, config, splits,
                                                 reports["reference"], eval_args, retain=data["retain_train"])
                save_report(report, out / "reports" / f"{rid}.json")
                run = {"id": rid, "kind": kind, "label": spec.label, "method": spec.method, "auto_key": spec.auto_key,
                       "retain_weight": spec.retain_weight, "lr": lr if lr is not None else spec.config(**QUIET).learning_rate,
                       **record, "summary": run_summary(report), "cell_key": key}
                with atomic_file(done) as temporary:
                    temporary.write_text(json.dumps(run, indent=1), encoding="utf-8")
            runs.append(run)
            s = run["summary"]
            log(f"[bench] {len(runs)}/{len(cells)} {rid}: p_forget {s['forget_probability']:.3f}, FQ"
                f" {s['forget_quality']:.2g}, MU {s['model_utility']:.3f}, {run['steps']} steps ({run['seconds']:.0f}s)"
                f"{'' if 'reused' not in run else ', finished in an earlier run: reused'}")

        attacks = {run["label"]: _attack(target, out / "adapters" / run["id"], data, log)
                   for run in runs if run["kind"] == "stop" and run["label"] in attacked}

        sequences = {}
        if sequential:
            by_label = {m.label: m for m in methods}
            sequences = run_sequence(target, reference_dir, {**data, "requests": data["requests"][: size.stacked_requests]},
                                     [by_label[label] for label in sequential], out,
                                     {**QUIET, "max_steps": 4 * size.unlearn_steps,
                                      "per_device_train_batch_size": size.unlearn_batch_size, "seed": seed},
                                     eval_args, train_and_score, log=log)

    results: dict[str, Any] = {
        "protocol": {"seed": seed, "quick": quick, "model": str(model), "size": dataclasses.asdict(size),
                     "learning_rates": sorted(size.learning_rates), "main_lr": main_lr,
                     "methods": [dataclasses.asdict(m) for m in methods], "swept_methods": list(swept),
                     "sequential_methods": list(sequential),
                     "attacks": list(ATTACKS) if attacked else [],
                     "lora": LORA},
        "data": {name: len(data[name]) for name in ("pool", "main", "retain", "retain_eval", "retain_train", "holdout",
                                                     "world_facts", "real_authors")},
        "targets": targets,
        "baselines": baselines,
        "runs": runs,
        "sequential": sequences,
        "attacks": attacks,
        "versions": versions(),
    }
    results["table"] = format_real(results)
    log(results["table"])
    plot_path = plot_real(results, out / "bench_real.png") if plot else None
    results["paths"] = {"results": str(out / "results.json"), "plot": str(plot_path) if plot_path else None}
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    log(f"[bench] wrote {out / 'results.json'}{' and ' + str(plot_path) if plot_path else ''} in {results['seconds']:.0f}s")
    return results


def cell_key(target: Path, rid: str, spec: MethodSpec, config: dict[str, Any], rows: Sequence[dict[str, Any]],
             eval_args: dict[str, Any]) -> str:
    """What one single-request cell depends on (target, method, settings, data, evaluation), hashed:
    a finished cell with the same key is reused by a rerun into the same ``out_dir``.

    >>> spec = MethodSpec("ga", "ga")
    >>> cell_key(Path("t"), "r", spec, {"max_steps": 5}, [], {}) != cell_key(Path("t"), "r", spec, {"max_steps": 6}, [], {})
    True
    """
    return recipe_key({"target": target, "id": rid, "spec": dataclasses.asdict(spec), "config": config,
                       "rows": rows_digest(rows), "eval": eval_args, "version": __version__})


def _finished(path: Path, key: str) -> dict[str, Any] | None:
    """The run record of a cell finished earlier with the same key, marked reused; else None."""
    if not path.is_file():
        return None
    run = json.loads(path.read_text(encoding="utf-8"))
    return {**run, "reused": True} if run.get("cell_key") == key else None


def _evaluate_dir(directory: Path, splits: dict[str, Any], reference: dict[str, Any] | None,
                  eval_args: dict[str, Any]) -> dict[str, Any]:
    model, tokenizer = load_target(directory)
    return evaluate(model, tokenizer, **splits, reference=reference, **eval_args)


def _attack(target: Path, adapter: Path, data: dict[str, Any], log: Callable[[str], Any]) -> dict[str, Any]:
    """`attacks.run_attacks` on one adapter over the single request's facts; per attack its result."""
    from undial_peft.deploy.stack import attach
    from undial_peft.evals.attacks import run_attacks

    model = attach(target, [adapter])
    results = run_attacks(model, model.tokenizer, data["main"], ATTACKS, batch_size=16)["results"]
    log(f"[bench] attacks on {adapter.name}: " + ", ".join(
        f"{name} {r['recovered'].get('probability') or 0:.2f}" if "recovered" in r else f"{name} skipped"
        for name, r in results.items()))
    return results
