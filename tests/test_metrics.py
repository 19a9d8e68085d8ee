"""Metrics against independent computations: hand-worked numbers, direct scipy / sklearn calls,
and, for model-running code, unbatched float64 forwards of a tiny random Llama."""

from __future__ import annotations

import inspect
import json
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import roc_auc_score

from undial_peft.data.readers import Example
from undial_peft.data.synthetic import make_benchmark_data
from undial_peft.evals import metrics
from undial_peft.evals.items import EvalItem, read_eval_items
from undial_peft.evals.report import (
    MAX_NEW_TOKENS,
    SPLITS,
    UTILITY_COMPONENTS,
    evaluate,
    format_table,
    greedy_answers,
    save_report,
    score,
)

# ---------------------------------------------------------------- pure metrics, hand-worked


def test_avg_nll_and_probability():
    assert metrics.avg_nll([-1.0, -2.0, -3.0]) == pytest.approx(2.0)
    assert metrics.answer_probability([-1.0, -2.0, -3.0]) == pytest.approx(math.exp(-2.0))
    with pytest.raises(ValueError):
        metrics.avg_nll([])


def test_perplexity_weights_tokens_not_items():
    # 6 nats over 3 tokens -> e^2; an item-weighted mean would give e^2.5.
    assert metrics.perplexity([[-1.0, -1.0], [-4.0]]) == pytest.approx(math.e**2)


def test_exact_memorization():
    assert metrics.exact_memorization(np.array([True, False, False, True])) == 0.5


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3; reference has 6 tokens, prediction 3.
    assert metrics.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert metrics.rouge_l_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert metrics.rouge_l_recall("the cats sat", "the cat sat on the mat") == pytest.approx(0.5)  # stemmer on
    assert metrics.rouge_l_recall("dogs bark", "the cat sat") == 0.0
    # argument order matters: recall is over the REFERENCE
    assert metrics.rouge_l_recall("the cat sat on the mat", "the cat sat") == pytest.approx(1.0)


def test_truth_ratio_by_hand():
    # perturbed mean NLL 2, paraphrased 1.5: R = e^-2 / e^-1.5
    assert metrics.truth_ratio([1.0, 2.0, 3.0], 1.5) == pytest.approx(math.exp(-2.0) / math.exp(-1.5))
    # very unlikely answers must not underflow to 0 / 0
    assert metrics.truth_ratio([2000.0], 1999.0) == pytest.approx(math.exp(-1.0))
    assert metrics.truth_ratio_forget_score([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert metrics.truth_ratio_retain_score([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_forget_quality_by_hand_and_against_scipy():
    assert metrics.forget_quality([0.2, 0.5, 0.9], [0.2, 0.5, 0.9]) == {"pvalue": 1.0, "statistic": 0.0}
    # fully separated samples of 3 and 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    fq = metrics.forget_quality([0.1, 0.2, 0.3], [0.7, 0.8, 0.9])
    assert fq["statistic"] == pytest.approx(1.0) and fq["pvalue"] == pytest.approx(0.1)
    a, b = np.random.default_rng(0).random(12), np.random.default_rng(1).random(9) ** 2
    direct = stats.ks_2samp(a, b)
    assert metrics.forget_quality(a, b) == pytest.approx({"pvalue": direct.pvalue, "statistic": direct.statistic})


def test_model_utility_is_harmonic_mean():
    assert metrics.model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))
    assert metrics.model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        metrics.model_utility([0.5, -0.1])


def test_mia_scores_by_hand():
    lp = [-5.0, -1.0, -2.0, -4.0, -3.0]
    assert metrics.loss_score(lp) == pytest.approx(-3.0)
    assert metrics.min_k_score(lp) == pytest.approx(-4.5)  # floor(0.4 * 5) = 2 lowest
    assert metrics.min_k_score(lp, k=1.0) == pytest.approx(-3.0)
    assert metrics.min_k_score([-7.0, -1.0], k=0.4) == pytest.approx(-7.0)  # at least one token
    text = "Zor was born in Velmora."
    # Carlini et al.: MEAN token NLL (here 15 / 5 = 3) over the zlib length in bytes
    assert metrics.zlib_score(lp, text) == pytest.approx(-3.0 / len(zlib.compress(text.encode())))
    # standardised: (lp - mu) / sigma = [-2, 0, -1, -4, 1] -> lowest two -4, -2
    z = metrics.min_k_plus_plus_score(lp, mu=[-3.0, -1.0, -1.0, -2.0, -4.0], sigma=[1.0, 2.0, 1.0, 0.5, 1.0])
    assert z == pytest.approx(-3.0)
    assert metrics.min_k_plus_plus_score([-2.0], mu=[-2.0], sigma=[0.0]) == 0.0  # flat distribution
    with pytest.raises(ValueError):
        metrics.min_k_plus_plus_score(lp, mu=[0.0], sigma=[1.0])


def test_zlib_ranks_by_mean_not_summed_nll():
    # Same compressed length; the long text has the LOWER mean NLL (0.5 vs 1.0) but the larger sum
    # (5 vs 2). Carlini's ratio ranks it as the more member-like; a summed NLL would flip the order.
    short, long_ = "abcdefgh", "hgfedcba"
    assert len(zlib.compress(short.encode())) == len(zlib.compress(long_.encode()))
    assert metrics.zlib_score([-0.5] * 10, long_) > metrics.zlib_score([-1.0, -1.0], short)


def test_privleak_matches_muse_on_hand_computed_cases():
    # MUSE reports 1 - AUC: ((1 - a_u) - (1 - a_r)) / (1 - a_r) * 100
    assert metrics.priv_leak(1.0, 0.3425) == pytest.approx((0.0 - 0.6575) / 0.6575 * 100)  # = -100
    assert metrics.priv_leak(1.0, 0.3425) == pytest.approx(-100.0)
    assert metrics.priv_leak(0.9, 0.5) == pytest.approx(-80.0)
    assert metrics.priv_leak(0.5, 0.5) == 0.0
    assert metrics.priv_leak(0.2, 0.5) == pytest.approx(60.0)  # over-unlearning reads positive
    with pytest.raises(ValueError, match="must be < 1"):
        metrics.priv_leak(0.7, 1.0)


def test_probability_with_options_by_hand():
    # TOFU real-authors / world-facts: p_true / (p_true + sum p_wrong), p = exp(-mean NLL)
    assert metrics.probability_with_options(math.log(2), [math.log(4)] * 2) == pytest.approx(0.5 / (0.5 + 0.25 + 0.25))
    assert metrics.probability_with_options(1.0, [1.0, 1.0, 1.0]) == pytest.approx(0.25)
    p = [math.exp(-0.3), math.exp(-2.0), math.exp(-1.1)]
    assert metrics.probability_with_options(0.3, [2.0, 1.1]) == pytest.approx(p[0] / sum(p))
    assert metrics.probability_with_options(3000.0, [3001.0]) == pytest.approx(1 / (1 + math.exp(-1)))  # no 0 / 0


def test_mia_auc_and_privleak():
    # pairs (member > non-member): 0.9>0.1, 0.9>0.85, 0.8>0.1, 0.8<0.85 -> 3/4
    assert metrics.mia_auc([0.9, 0.8], [0.1, 0.85]) == pytest.approx(0.75)
    assert metrics.mia_auc([2.0, 3.0], [0.0, 1.0]) == 1.0  # higher score = member
    m, n = [0.3, 0.1, 0.7, 0.4], [0.2, 0.5, 0.05]
    assert metrics.mia_auc(m, n) == pytest.approx(roc_auc_score([1, 1, 1, 1, 0, 0, 0], m + n))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 0), min_size=1, max_size=30), st.floats(0.01, 1.0))
def test_min_k_is_between_min_and_mean(lp, k):
    value = metrics.min_k_score(lp, k)
    assert min(lp) - 1e-9 <= value <= np.mean(lp) + 1e-9


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=20))
def test_forget_truth_ratio_score_is_symmetric_in_r(ratios):
    inverted = [1.0 / r for r in ratios]
    assert metrics.truth_ratio_forget_score(ratios) == pytest.approx(metrics.truth_ratio_forget_score(inverted))
    assert 0.0 < metrics.truth_ratio_forget_score(ratios) <= 1.0


# ---------------------------------------------------------------- tiny model and tokenizer

DATA = make_benchmark_data(seed=3, n_entities=20, facts_per_entity=2)
HAND = [
    Example("Where was Zor born?", "Zor was born in Velmora ."),
    Example("Who?", "Zor"),
    Example(None, "a raw text row about Zor"),
]
TEXT_KEYS = ("question", "answer", "paraphrased_question", "paraphrased_answer")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    texts = [e.answer for e in HAND] + [e.prompt for e in HAND if e.prompt]
    for rows in DATA.values():
        for row in rows:
            texts += [row[key] for key in TEXT_KEYS] + row["perturbed_answers"]
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {"[unk]": 0, "[pad]": 1, "[eos]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    raw.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[unk]", pad_token="[pad]", eos_token="[eos]")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the 0.02-std init, so argmax / generation are not near ties
        model.lm_head.weight.mul_(20)
    model.train()  # score / generate must put it in eval mode and restore this
    return model, tok


def _manual(model, tok, prompt, answer):
    """Unbatched, float64: (log p of answer tokens, full log-distributions at those positions, targets)."""
    prompt_ids = tok(prompt).input_ids if prompt is not None else []  # raw completion: the prompt verbatim
    answer_ids = tok(answer).input_ids
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (T, V)
    start = max(len(prompt_ids), 1)  # a raw text row's first token is not predicted
    log_q = logits[start - 1 : -1].log_softmax(-1)  # rows predicting tokens start..T-1
    targets = ids[0, start:]
    return log_q.gather(-1, targets[:, None]).squeeze(-1).numpy(), log_q, targets


def test_score_matches_unbatched_float64_forward(tiny):
    model, tok = tiny
    examples = HAND + [Example(r["question"], r["answer"]) for r in DATA["retain"][:4]]
    got = score(model, tok, examples, prompt_format="completion", batch_size=3)  # uneven lengths -> padding
    assert model.training
    assert len(got) == len(examples)
    for example, s in zip(examples, got):
        lp, log_q, targets = _manual(model, tok, example.prompt, example.answer)
        np.testing.assert_allclose(s.logprobs, lp, atol=1e-4)
        q = log_q.exp()
        mu = (q * log_q).sum(-1)
        sigma = ((q * log_q**2).sum(-1) - mu**2).sqrt()  # the textbook form, in float64
        np.testing.assert_allclose(s.mu, mu.numpy(), atol=1e-4)
        np.testing.assert_allclose(s.sigma, sigma.numpy(), atol=1e-4)
        np.testing.assert_array_equal(s.argmax_match, (log_q.argmax(-1) == targets).numpy())
    one_by_one = score(model, tok, examples, prompt_format="completion", batch_size=1)
    for a, b in zip(got, one_by_one):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_score_works_through_peft(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    base = score(model, tok, HAND, prompt_format="completion")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        wrapped = score(peft_model, tok, HAND, prompt_format="completion")
        for a, b in zip(base, wrapped):  # fresh LoRA: B = 0, so the same numbers
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    finally:
        peft_model.unload()


def test_greedy_answers_match_manual_greedy_loop(tiny):
    model, tok = tiny
    questions = [r["question"] for r in DATA["retain"][:3]] + ["Who?"]  # different lengths -> left padding
    got = greedy_answers(model, tok, questions, max_new_tokens=6, prompt_format="completion", batch_size=4)
    assert model.training
    for question, answer in zip(questions, got):
        ids = tok(question + "\n").input_ids
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert answer == tok.decode(new, skip_special_tokens=True).strip()


def test_evaluate_report_reference_and_table(tiny, tmp_path):
    model, tok = tiny
    splits = {k: DATA[k][:n] for k, n in (("forget", 3), ("retain", 4), ("holdout", 3), ("general", 2))}
    kw = dict(prompt_format="completion", max_new_tokens=4)
    forget, retain, holdout, general = splits.values()
    report = evaluate(model, tok, forget, retain, holdout, general, keep_generations=True, **kw)
    save_report(report, tmp_path / "reference.json")
    report = json.loads((tmp_path / "reference.json").read_text())  # JSON-ready, reusable after a round trip
    generations = [report["splits"][s]["items"].pop("generations", None) for s in splits]
    assert [len(g) for g in generations if g] == [3, 4, 2] and all(isinstance(t, str) for t in generations[0])
    assert generations[2] is None and "rouge_l_recall" not in report["splits"]["holdout"]["summary"]  # MIA only
    forget = report["splits"]["forget"]
    # per-item truth ratio re-derived from unbatched forwards after the ORIGINAL question (TOFU)
    row = splits["forget"][0]
    assert row["paraphrased_question"] != row["question"]
    nll = lambda a: -_manual(model, tok, row["question"], a)[0].mean()  # noqa: E731
    perturbed = np.mean([nll(a) for a in row["perturbed_answers"]])
    expected = math.exp(-perturbed) / math.exp(-nll(row["paraphrased_answer"]))
    assert forget["items"]["truth_ratio"][0] == pytest.approx(expected, rel=1e-3)
    # LOSS AUC straight from sklearn on manual mean log-probs (higher = member)
    members = [_manual(model, tok, r["question"], r["answer"])[0].mean() for r in splits["forget"]]
    others = [_manual(model, tok, r["question"], r["answer"])[0].mean() for r in splits["holdout"]]
    assert report["summary"]["mia_auc"]["loss"] == pytest.approx(roc_auc_score([1] * 3 + [0] * 3, members + others))
    # without real-authors / world-facts splits TOFU's utility cannot be formed: the gap is named
    top = report["summary"]
    assert "model_utility" not in top
    assert top["model_utility_missing"] == [c for c in UTILITY_COMPONENTS if not c.startswith("retain/")]
    assert list(top["model_utility_components"]) == ["retain/probability", "retain/rouge_l_recall", "retain/truth_ratio"]
    assert "question" not in json.dumps(report)  # no texts stored
    # the same model as its own reference: identical distributions
    again = evaluate(model, tok, splits["forget"], None, splits["holdout"], reference=report, generate=False, **kw)
    assert again["summary"]["forget_quality"] == {"pvalue": 1.0, "statistic": 0.0}
    assert again["summary"]["privleak"] == pytest.approx(dict.fromkeys(again["summary"]["privleak"], 0.0))
    assert list(again["summary"]["privleak"])[0] == "min_k"  # MUSE's attack first
    assert "rouge_l_recall" not in again["splits"]["forget"]["summary"]
    table = format_table(report)
    assert "truth_ratio" in table and "forget_quality" not in table and "holdout" in table.splitlines()[0]
    # the list of missing utility components is a note under the table, not a column that widens it
    *numbers, note = table.splitlines()
    assert note.startswith("model_utility_missing: real_authors/") and max(map(len, numbers)) < 90
    with pytest.raises(ValueError, match="different forget data"):
        evaluate(model, tok, splits["retain"], reference=report, generate=False, **kw)


def test_missing_truth_ratio_data_is_absent_not_faked(tiny):
    model, tok = tiny
    rows = [{"question": r["question"], "answer": r["answer"]} for r in DATA["retain"][:2]]
    report = evaluate(model, tok, rows, retain=rows, generate=False, prompt_format="completion")
    assert "truth_ratio" not in report["splits"]["forget"]["summary"]
    assert "truth_ratio" not in report["splits"]["forget"]["items"]
    assert "mia_auc" not in report["summary"]  # no holdout
    assert list(report["summary"]["model_utility_components"]) == ["retain/probability"]
    assert len(report["summary"]["model_utility_missing"]) == 8 and "model_utility" not in report["summary"]


def test_tofu_model_utility_has_nine_components_and_normalised_probability(tiny):
    model, tok = tiny
    # TOFU's real-authors / world-facts rows: question, answer, perturbed answers (no paraphrase)
    options = [{"question": r["question"], "answer": r["answer"], "perturbed_answer": r["perturbed_answers"]}
               for r in DATA["retain"][4:7]]
    report = evaluate(model, tok, DATA["forget"][:2], retain=DATA["retain"][:3], real_authors=options[:2],
                      world_facts=options[2:], prompt_format="completion", max_new_tokens=4)
    top = report["summary"]
    assert list(top["model_utility_components"]) == list(UTILITY_COMPONENTS) and "model_utility_missing" not in top
    assert top["model_utility"] == pytest.approx(stats.hmean(list(top["model_utility_components"].values())))
    # p(true) / (p(true) + sum p(wrong)) from unbatched float64 forwards, true side = the answer itself
    row = options[0]
    p = lambda a: math.exp(_manual(model, tok, row["question"], a)[0].mean())  # noqa: E731
    expected = p(row["answer"]) / (p(row["answer"]) + sum(p(w) for w in row["perturbed_answer"]))
    got = report["splits"]["real_authors"]["items"]["probability_w_options"][0]
    assert got == pytest.approx(expected, rel=1e-3)
    ratio = math.exp(-np.mean([-math.log(p(w)) for w in row["perturbed_answer"]])) / p(row["answer"])
    assert report["splits"]["real_authors"]["items"]["truth_ratio"][0] == pytest.approx(ratio, rel=1e-3)


def test_reference_on_other_perturbations_is_refused(tiny):
    model, tok = tiny
    forget, holdout = DATA["forget"][:2], DATA["holdout"][:2]
    kw = dict(generate=False, prompt_format="completion")
    reference = evaluate(model, tok, forget, holdout=holdout, **kw)
    swapped = [dict(r, perturbed_answers=list(reversed(r["perturbed_answers"]))[:2]) for r in forget]
    with pytest.raises(ValueError, match="different forget data"):
        evaluate(model, tok, swapped, holdout=holdout, reference=reference, **kw)
    reworded = [dict(r, paraphrased_answer=r["answer"]) for r in forget]
    with pytest.raises(ValueError, match="different forget data"):
        evaluate(model, tok, reworded, holdout=holdout, reference=reference, **kw)


def test_generation_length_default_is_tofus_and_the_cli_agrees():
    from undial_peft import cli

    assert MAX_NEW_TOKENS == 200
    assert inspect.signature(evaluate).parameters["max_new_tokens"].default == MAX_NEW_TOKENS
    assert inspect.signature(greedy_answers).parameters["max_new_tokens"].default == MAX_NEW_TOKENS
    args = cli.build_parser().parse_args(["eval", "--forget", "f.jsonl", "--world-facts", "w.jsonl"])
    assert args.max_new_tokens == MAX_NEW_TOKENS and args.world_facts == "w.jsonl"
    assert cli.EVAL_SPLITS == SPLITS


def test_read_eval_items_shapes_and_errors():
    row = DATA["forget"][0]
    item = read_eval_items([row])[0]
    perturbed = tuple(row["perturbed_answers"])
    para_q = row["paraphrased_question"]
    assert item == EvalItem(row["question"], row["answer"], row["paraphrased_answer"], perturbed, para_q)
    assert read_eval_items([{"prompt": "Q?", "completion": "A."}])[0] == EvalItem("Q?", "A.")
    assert read_eval_items([{"text": "raw"}])[0] == EvalItem(None, "raw")
    with pytest.raises(ValueError, match="perturbed_answers"):
        read_eval_items([{"question": "Q?", "answer": "A.", "perturbed_answers": "B."}])
    with pytest.raises(ValueError, match="answer"):
        read_eval_items([{"question": "Q?"}])
    with pytest.raises(ValueError):
        read_eval_items([])
