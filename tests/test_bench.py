"""The offline benchmark in quick mode: what it writes, and whether its numbers make sense.

One quick run (about half a minute on one thread) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import leak_hits, leak_scan

from undial_peft import bench
from undial_peft.data.synthetic import make_benchmark_data


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    results = bench.run_bench(out, seed=0, quick=True, log=lines.append)
    return out, results, lines


def _main_runs(results):
    main = results["protocol"]["main_lr"]
    return {run["label"]: run for run in results["runs"] if run["lr"] == main}


# ------------------------------------------------------------------------------ structure


def test_writes_results_plot_models_and_adapters(quick):
    out, results, _ = quick
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    for name in ("target", "reference"):
        assert (out / "models" / name / "model.safetensors").is_file()
        assert (out / "models" / name / "config.json").is_file()
        assert (out / "reports" / f"{name}.json").is_file()
    for run in results["runs"]:
        assert (out / "adapters" / run["id"] / "adapter_model.safetensors").is_file()
        assert (out / "reports" / f"{run['id']}.json").is_file()
    for split in ("forget", "retain", "holdout", "general", "forget_request"):
        assert (out / "data" / f"{split}.jsonl").is_file()


def test_every_method_runs_at_every_learning_rate_with_the_same_budget(quick):
    _, results, _ = quick
    lrs = results["protocol"]["learning_rates"]
    labels = [m.label for m in bench.QUICK_METHODS]
    assert len(lrs) == 3 and max(lrs) / min(lrs) == pytest.approx(10.0)
    assert sorted((r["label"], r["lr"]) for r in results["runs"]) == sorted((m, lr) for m in labels for lr in lrs)
    assert {r["steps"] for r in results["runs"]} == {bench.QUICK.unlearn_steps}
    assert set(results["sweep"]) == set(labels)
    assert all(set(by_lr) == {f"{lr:g}" for lr in lrs} for by_lr in results["sweep"].values())
    for summary in [*(r["summary"] for r in results["runs"]), *results["baselines"].values()]:
        for key in ("forget_probability", "retain_probability", "model_utility", "forget_quality", "ks_statistic"):
            assert 0.0 <= summary[key] <= 1.0 and math.isfinite(summary[key]), (key, summary[key])
    # PrivLeak of every run from its AUCs and the reference's, by MUSE's formula written out here
    ref_auc = results["baselines"]["reference"]["mia_auc"]
    for run in results["runs"]:
        auc = run["summary"]["mia_auc"]
        for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
            muse = ((1 - auc[attack]) - (1 - ref_auc[attack])) / (1 - ref_auc[attack]) * 100
            assert run["summary"]["privleak"][attack] == pytest.approx(muse), (run["id"], attack)


def test_prints_one_table_with_a_row_per_method(quick):
    _, results, lines = quick
    text = "\n".join(lines)
    assert text.count("method ") == 1 and results["table"] in text
    rows = [line.split("  ")[0].strip() for line in results["table"].splitlines()]
    assert all(name in rows for name in ("target", "reference", *(m.label for m in bench.QUICK_METHODS)))


# ------------------------------------------------------------------------------ sanity


def test_target_memorised_and_reference_did_not(quick):
    _, results, _ = quick
    mem, base = results["memorisation"], results["baselines"]
    assert mem["target"]["train_probability"] > 0.9
    assert mem["reference"]["train_probability"] > 0.9
    assert base["target"]["forget_probability"] > 0.9
    assert base["target"]["forget_probability"] > base["reference"]["forget_probability"] + 0.5
    # holdout people were never trained: the target knows them no better than the reference does
    assert base["target"]["holdout_probability"] < 0.5
    assert base["reference"]["retain_probability"] > 0.9


def test_forget_quality_and_privleak_separate_target_from_reference(quick):
    _, results, _ = quick
    target, reference = results["baselines"]["target"], results["baselines"]["reference"]
    assert target["forget_quality"] < 0.05 and target["ks_statistic"] >= 0.5
    assert target["forget_probability"] > reference["forget_probability"]
    # MUSE's sign: a model that still knows the forget set reads towards -100
    assert target["mia_auc"]["min_k"] > 0.9 and target["privleak"]["min_k"] < -20


def test_every_run_lowers_forget_probability(quick):
    _, results, _ = quick
    target = results["baselines"]["target"]["forget_probability"]
    for run in results["runs"]:
        assert run["summary"]["forget_probability"] < target, run["id"]
    for label, run in _main_runs(results).items():
        assert run["summary"]["forget_probability"] < 0.7 * target, label


def test_retain_term_protects_retain_and_large_lr_breaks_ga(quick):
    _, results, _ = quick
    main = _main_runs(results)
    with_rt, without = main["undial b=10 +rt"]["summary"], main["undial b=10"]["summary"]
    assert with_rt["retain_probability"] > without["retain_probability"]
    ga = results["sweep"]["ga"]
    lrs = [f"{lr:g}" for lr in results["protocol"]["learning_rates"]]
    assert ga[lrs[-1]]["model_utility"] < ga[lrs[0]]["model_utility"] - 0.3  # too large a step collapses GA


# ------------------------------------------------------------------------------ pieces


def test_plot_is_skipped_without_matplotlib(quick, tmp_path, monkeypatch):
    _, results, _ = quick
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    assert bench.plot_results(results, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_second_phrasing_is_neither_the_training_nor_the_evaluation_wording():
    data = make_benchmark_data(3, 30, 6)
    for row in data["forget"] + data["retain"] + data["holdout"]:
        alt = bench.second_phrasing(row)
        assert alt is not None, row
        assert alt["question"] not in (row["question"], row["paraphrased_question"])
        assert alt["answer"] not in (row["answer"], row["paraphrased_answer"], *row["perturbed_answers"])
        assert row["entity"] in alt["question"] and row["entity"] in alt["answer"]
        # the same value: the paraphrased answer's true value appears in the second phrasing too
        _, answers = bench.ATTRIBUTES[row["attribute"]][1:]
        value = next(v for v in bench.ATTRIBUTES[row["attribute"]][0]
                     if any(t.format(name=row["entity"], value=v) == row["answer"] for t in answers))
        assert value in alt["answer"]
    assert all(bench.second_phrasing(row) is None for row in data["general"])


def test_roster_names_every_person_once():
    data = make_benchmark_data(0, 12, 2)
    roster = bench.roster_rows(data)
    people = {r["entity"] for split in ("forget", "retain", "holdout") for r in data[split]}
    assert len(roster) == len(people) == 12
    assert all(any(p in r["answer"] for p in people) for r in roster)


def test_cli_arguments():
    args = bench.build_parser().parse_args(["--quick", "--out", "somewhere", "--seed", "3", "--lrs", "1e-3", "1e-2"])
    assert (args.quick, args.out, args.seed, args.lrs, args.no_plot) == (True, "somewhere", 3, [1e-3, 1e-2], False)
    defaults = bench.build_parser().parse_args([])
    assert (defaults.quick, defaults.seed, defaults.lrs) == (False, 0, None)


def test_nothing_written_or_logged_holds_forget_text(quick):
    # data/ holds the benchmark's own generated inputs; models/ hold tokenizers whose vocabulary
    # includes every name: scanned for whole questions and answers only.
    out, _, lines = quick
    rows = [json.loads(line) for line in (out / "data" / "forget.jsonl").read_text(encoding="utf-8").splitlines()]
    sentences = [r["question"] for r in rows] + [r["answer"] for r in rows]
    needles = sentences + sorted({r["entity"] for r in rows})
    assert leak_hits((out / "data" / "forget.jsonl").read_bytes(), needles) == needles
    outputs = [p for p in out.iterdir() if p.is_dir() and p.name != "data"]
    assert {p.name for p in outputs} >= {"models", "adapters", "reports"}
    for folder in outputs:
        assert leak_scan(folder, needles, skip=("tokenizer.json", "tokenizer_config.json")) == {}, folder.name
        assert leak_scan(folder, sentences) == {}, folder.name
    assert leak_hits((out / "results.json").read_bytes(), needles) == []
    assert leak_hits("\n".join(lines), needles) == []
