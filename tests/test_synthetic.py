"""The synthetic benchmark: determinism, entity-disjoint splits, well-formed facts, template coverage."""

from __future__ import annotations

import json
import re

import pytest

from undial_peft.data.readers import read_examples
from undial_peft.data.synthetic import ATTRIBUTES, make_benchmark_data, write_jsonl

KEYS = {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answers", "entity"}


@pytest.fixture(scope="module")
def data():
    return make_benchmark_data(seed=7, n_entities=60, facts_per_entity=4)


def _value(row):
    """The attribute value in a row's answer, found by its pool (longest match: "The Amber Kite" over "amber")."""
    pool = ATTRIBUTES[row["attribute"]][0]
    found = [v for v in pool if v in row["answer"].replace(row["entity"], "")]
    assert found, row
    return max(found, key=len)


def _skeleton(text, row, value):
    return text.replace(row["entity"], "{name}").replace(value, "{value}")


def test_deterministic_for_a_seed_and_varies_across_seeds():
    a = make_benchmark_data(seed=1, n_entities=30, facts_per_entity=3)
    b = make_benchmark_data(seed=1, n_entities=30, facts_per_entity=3)
    c = make_benchmark_data(seed=2, n_entities=30, facts_per_entity=3)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)


def test_split_sizes_and_entity_disjointness(data):
    entities = {k: {r["entity"] for r in rows} for k, rows in data.items()}
    assert len(entities["forget"]) == 6 and len(entities["holdout"]) == 6 and len(entities["retain"]) == 48
    assert not entities["forget"] & entities["retain"]
    assert not entities["forget"] & entities["holdout"]
    assert not entities["holdout"] & entities["retain"]
    for split in ("forget", "retain", "holdout"):
        assert len(data[split]) == 4 * len(entities[split])  # facts_per_entity each
    assert 3 <= len(data["general"]) <= 12
    assert len({r["entity"] for r in data["general"]} & (entities["forget"] | entities["retain"])) == 0


def test_rows_are_well_formed(data):
    for split, rows in data.items():
        for row in rows:
            assert KEYS <= set(row), (split, row)
            assert row["entity"] in row["question"] or split == "general"
            assert len(row["perturbed_answers"]) == 3 and len(set(row["perturbed_answers"])) == 3
            assert row["answer"] not in row["perturbed_answers"]
            assert row["paraphrased_answer"] not in row["perturbed_answers"]
            assert row["question"] != row["paraphrased_question"]
            assert row["answer"] != row["paraphrased_answer"]
    # each entity has distinct attributes (no contradicting facts about one person)
    for row_set in (data["forget"], data["retain"]):
        seen = {(r["entity"], r["attribute"]) for r in row_set}
        assert len(seen) == len(row_set)


def test_perturbed_answers_change_only_the_value(data):
    for row in data["forget"] + data["retain"][:50]:
        value = _value(row)
        pool = ATTRIBUTES[row["attribute"]][0]
        para = _skeleton(row["paraphrased_answer"], row, value)
        for wrong in row["perturbed_answers"]:
            wrong_value = max((v for v in pool if v in wrong.replace(row["entity"], "")), key=len)
            assert wrong_value != value
            assert wrong.replace(row["entity"], "{name}").replace(wrong_value, "{value}") == para


def test_question_and_answer_templates_vary(data):
    for attribute in ATTRIBUTES:
        rows = [r for r in data["retain"] if r["attribute"] == attribute]
        questions = {_skeleton(r["question"], r, _value(r)) for r in rows}
        answers = {_skeleton(r["answer"], r, _value(r)) for r in rows}
        assert len(questions) >= 3 and len(answers) >= 3, attribute


def test_paraphrase_templates_are_training_templates_of_other_facts(data):
    train_q = {_skeleton(r["question"], r, _value(r)) for r in data["retain"]}
    train_a = {_skeleton(r["answer"], r, _value(r)) for r in data["retain"]}
    for row in data["forget"] + data["holdout"]:
        value = _value(row)
        assert _skeleton(row["paraphrased_question"], row, value) in train_q
        assert _skeleton(row["paraphrased_answer"], row, value) in train_a


def test_names_are_invented_and_unique(data):
    names = [r["entity"] for split in ("forget", "retain", "holdout") for r in data[split]]
    unique = set(names)
    assert len(unique) == 60
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", n) for n in unique)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_benchmark_data(0, 10, facts_per_entity=len(ATTRIBUTES) + 1)
    with pytest.raises(ValueError):
        make_benchmark_data(0, 2, 1, forget_fraction=0.5, holdout_fraction=0.5)
    with pytest.raises(ValueError):
        make_benchmark_data(0, 10, 1, forget_fraction=1.0)


def test_write_jsonl_is_readable_by_the_training_reader(tmp_path, data):
    path = tmp_path / "forget.jsonl"
    write_jsonl(data["forget"], path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == data["forget"]
    examples = read_examples(path)
    assert [(e.prompt, e.answer) for e in examples] == [(r["question"], r["answer"]) for r in data["forget"]]
