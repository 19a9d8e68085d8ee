"""The real-model benchmark's --quick path, run on a tiny Llama standing in for the pretrained base
(the same code path; seconds), plus the fine-tune cache and the data split. The run on the embedded
SmolLM2 is marked slow."""

from __future__ import annotations

import dataclasses
import json

import pytest

from undial_peft import bench
from undial_peft.bench.data import real_splits
from undial_peft.bench.targets import drop_default_system_prompt
from undial_peft.tiny import tiny_llama, word_tokenizer

# 7 people: 2 asked (one per request), 1 holdout, 4 retain. The tiny base knows nothing, so its
# fine-tune needs a tiny model's learning rate and more passes.
SIZE = dataclasses.replace(
    bench.REAL_QUICK, n_people=7, facts_per_person=2, holdout_people=1, requests=2, stacked_requests=2, people_per_request=1, main_people=2,
    eval_retain_people=1, unlearn_steps=3, finetune_lr=5e-3, finetune_epochs=40, trained_layers=None,
)
METHODS = tuple(m for m in bench.REAL_METHODS if m.label in ("undial auto-key +rt", "npo"))
SEQUENTIAL = ("undial auto-key +rt",)


def _texts(splits):
    rows = splits["pool"] + splits["retain"] + splits["holdout"] + splits["world_facts"] + splits["real_authors"]
    return [t for r in rows for t in (r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answers"])]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    tokenizer = word_tokenizer(_texts(real_splits(0, SIZE)))
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2, seed=0)
    path = tmp_path_factory.mktemp("base") / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quick(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    lines: list[str] = []
    results = bench.run_real_bench(out, model=tiny_base, size=SIZE, methods=METHODS, swept=[m.label for m in METHODS],
                                   sequential=SEQUENTIAL, attacked=("npo",), log=lines.append)
    return out, results, lines


def test_writes_results_plot_and_one_table(quick):
    out, results, lines = quick
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    assert (out / "bench_real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = "\n".join(lines)
    assert sum(line.startswith("single request") for line in text.splitlines()) == 1 and results["table"] in text
    for method in METHODS:
        assert f"{method.label} @" in results["table"] and f"{method.label} stop@" in results["table"]
    assert "sequential (stacked)" in results["table"] and "attacks on" in results["table"]


def test_every_method_at_every_lr_and_with_the_stopping_rule(quick):
    _, results, _ = quick
    sweep = [(r["label"], r["lr"]) for r in results["runs"] if r["kind"] == "sweep"]
    assert sorted(sweep) == sorted((m.label, lr) for m in METHODS for lr in SIZE.learning_rates)
    assert {r["steps"] for r in results["runs"] if r["kind"] == "sweep"} == {SIZE.unlearn_steps}
    stops = [r for r in results["runs"] if r["kind"] == "stop"]
    assert [r["label"] for r in stops] == [m.label for m in METHODS]
    for run in stops:
        assert run["stopping"]["stopped"] in ("target", "max_steps", "retain_budget"), run["stopping"]
        assert 1 <= run["steps"] <= 4 * SIZE.unlearn_steps


def test_reference_and_target_make_sense(quick):
    _, results, _ = quick
    target, reference = results["baselines"]["target"], results["baselines"]["reference"]
    # the tiny stand-in memorises less than the real model in its epoch budget (measured: 0.90 after 40)
    assert results["targets"]["target"]["train_probability"] > 0.8
    assert reference["forget_quality"] == 1.0 and reference["ks_statistic"] == 0.0
    assert target["forget_probability"] > reference["forget_probability"] + 0.3  # only the target saw them
    for run in results["runs"]:
        assert 0.0 <= run["summary"]["model_utility"] <= 1.0


def test_sequential_requests_stack_and_score_each(quick):
    out, results, _ = quick
    seq = results["sequential"]
    for label in SEQUENTIAL:
        steps = seq[label]
        assert [s["request"] for s in steps] == list(range(1, SIZE.stacked_requests + 1))
        assert steps[-1]["summary"]["not_asked_probability"] is None  # everyone has been asked
        assert all(s["summary"]["asked_probability"] is not None for s in steps)
    # each request's adapter names the previous one as its parent: a real stack
    manifest = json.loads((out / "adapters" / "seq-undial-auto-key-rt-r2" / "undial.json").read_text(encoding="utf-8"))
    assert len(manifest["parents"]) == 1


def test_stacked_only_runs_the_sequence_alone(tiny_base, tmp_path):
    results = bench.run_real_bench(tmp_path, model=tiny_base, size=SIZE, methods=METHODS, sequential=("npo",),
                                   single=False, cache_dir=tmp_path / "models", plot=False, log=lambda _: None)
    assert results["runs"] == [] and results["attacks"] == {} and results["protocol"]["swept_methods"] == []
    assert [s["request"] for s in results["sequential"]["npo"]] == list(range(1, SIZE.stacked_requests + 1))
    assert "sequential (stacked)" in results["table"] and "npo stop@" not in results["table"]
    assert not list((tmp_path / "reports").glob("stop-*"))


def test_attacks_run_on_the_stopping_rule_adapter(quick):
    _, results, _ = quick
    attacked = results["attacks"]["npo"]
    assert set(attacked) == set(bench.settings.ATTACKS)
    for name, result in attacked.items():
        assert "skipped" in result or result["n_items"] >= 1, name
    assert "recovered" in attacked["paraphrase"]


def test_rerun_into_the_same_directory_reuses_finished_cells(quick, tiny_base):
    out, first, _ = quick
    lines: list[str] = []
    again = bench.run_real_bench(out, model=tiny_base, size=SIZE, methods=METHODS, swept=[m.label for m in METHODS],
                                 sequential=(), attacked=(), log=lines.append)
    assert [r["id"] for r in again["runs"]] == [r["id"] for r in first["runs"]]
    assert all(r["reused"] for r in again["runs"]) and sum("reused" in line for line in lines) == len(first["runs"])
    assert [r["summary"] for r in again["runs"]] == json.loads(json.dumps([r["summary"] for r in first["runs"]]))
    # another step budget is another cell: trained anew
    changed = dataclasses.replace(SIZE, unlearn_steps=SIZE.unlearn_steps + 1)
    fresh = bench.run_real_bench(out, model=tiny_base, size=changed, methods=METHODS[:1], swept=(), sequential=(),
                                 attacked=(), log=lines.append)
    assert [r.get("reused") for r in fresh["runs"]] == [None] and fresh["runs"][0]["steps"] >= 1


def test_rerun_reuses_the_cached_targets(quick, tiny_base, tmp_path):
    out, first, _ = quick
    lines: list[str] = []
    # the learning rates are no part of the fine-tune's recipe: one is enough here
    again = bench.run_real_bench(tmp_path, model=tiny_base, size=dataclasses.replace(SIZE, learning_rates=(3e-3,)),
                                 methods=METHODS[1:], swept=(), sequential=(), attacked=(), cache_dir=out / "models", log=lines.append)
    for name in ("target", "reference"):
        assert first["targets"][name]["cached"] is False and again["targets"][name]["cached"] is True
        assert again["targets"][name]["path"] == first["targets"][name]["path"]
    assert sum("rerun skipped" in line for line in lines) == 2
    # a changed recipe is a different target
    other = dataclasses.replace(SIZE, finetune_epochs=SIZE.finetune_epochs + 1)
    from undial_peft.bench.targets import cached_fine_tune

    rows = real_splits(0, SIZE)["retain"][:4]
    path, stats = cached_fine_tune(tiny_base, "reference", rows, other, tmp_path / "c", 0, log=lines.append)
    assert stats["cached"] is False and path.name != first["targets"]["reference"]["path"].rsplit("/", 1)[-1]
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))


def test_real_splits_keep_people_apart():
    s = real_splits(0, bench.REAL)
    people = {k: {r["entity"] for r in s[k]} for k in ("pool", "retain", "holdout")}
    assert len(people["pool"]) == 10 and len(people["holdout"]) == 4 and len(people["retain"]) == 26
    assert not (people["pool"] & people["retain"]) and not (people["holdout"] & (people["pool"] | people["retain"]))
    asked = [{r["entity"] for r in request} for request in s["requests"]]
    assert all(len(a) == 2 for a in asked) and len(set().union(*asked)) == 10
    assert {r["entity"] for r in s["main"]} == asked[0] | asked[1]
    assert not ({r["entity"] for r in s["retain_eval"]} & {r["entity"] for r in s["retain_train"]})


def test_drop_default_system_prompt_only_touches_that_line():
    class Tok:
        chat_template = "{{ bos }}{% for m in messages %}{{ m['content'] }}{% endfor %}"

    tok = Tok()
    assert drop_default_system_prompt(tok) is False and tok.chat_template == Tok.chat_template


def test_cli_arguments():
    args = bench.build_parser().parse_args(["--model", "default", "--quick", "--cache", "c"])
    assert (args.model, args.quick, args.cache) == ("default", True, "c")
    assert bench.build_parser().parse_args([]).model is None and not bench.build_parser().parse_args([]).sweep_all


@pytest.mark.slow
def test_quick_on_the_embedded_model(tmp_path):
    lines: list[str] = []
    results = bench.run_real_bench(tmp_path, model="default", quick=True, log=lines.append)
    target = results["baselines"]["target"]
    # the tiny stand-in memorises less than the real model in its epoch budget (measured: 0.90 after 40)
    assert results["targets"]["target"]["train_probability"] > 0.8
    assert target["forget_probability"] > results["baselines"]["reference"]["forget_probability"]
    assert len(results["sequential"]["undial auto-key"]) == bench.REAL_QUICK.stacked_requests
