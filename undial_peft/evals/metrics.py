"""Unlearning metrics as pure functions on numbers (TOFU / MUSE conventions; docs/evaluation.md).

Inputs are per-token answer log-probs (natural log, one 1-D sequence per item) as produced by
`undial_peft.evals.report.score`, or per-item numbers. Nothing here runs a model.

Membership-inference scores are oriented so that a HIGHER score means "more likely a member"
(seen in training); `mia_auc` is then the AUC of telling forget items (members) from holdout
items (non-members), 0.5 meaning indistinguishable.

>>> round(answer_probability([-1.0, -3.0]), 4)  # exp(-2)
0.1353
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from scipy import stats
from sklearn.metrics import roc_auc_score

ArrayLike = Sequence[float] | np.ndarray

MIN_K_FRACTION = 0.4

# Building the scorer loads the stemmer; do it once, not per call.
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _tokens(logprobs: ArrayLike) -> np.ndarray:
    values = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no answer tokens: every metric needs at least one counted token.")
    return values


def avg_nll(logprobs: ArrayLike) -> float:
    """Mean negative log-likelihood of one answer's tokens.

    >>> avg_nll([-1.0, -2.0, -3.0])
    2.0
    """
    return float(-_tokens(logprobs).mean())


def answer_probability(logprobs: ArrayLike) -> float:
    """TOFU "probability": exp(-mean NLL), the per-token geometric mean probability.

    >>> answer_probability([0.0, 0.0])
    1.0
    """
    return math.exp(-avg_nll(logprobs))


def perplexity(sequences: Sequence[ArrayLike]) -> float:
    """exp(mean NLL over ALL tokens of all sequences): token-weighted, so long answers weigh more.

    >>> round(perplexity([[-1.0, -1.0], [-4.0]]), 4)  # exp(6 / 3)
    7.3891
    """
    if not sequences:
        raise ValueError("perplexity needs at least one sequence.")
    tokens = np.concatenate([_tokens(s) for s in sequences])
    return float(math.exp(-tokens.mean()))


def exact_memorization(matches: ArrayLike) -> float:
    """Fraction of answer tokens where the model's argmax is the true token.

    >>> exact_memorization([True, False, True, True])
    0.75
    """
    return float(_tokens(matches).mean())


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall (LCS / reference length), Porter stemmer on, as in TOFU.

    >>> rouge_l_recall("the cat sat", "the cat sat on the mat")
    0.5
    """
    return float(_ROUGE.score(reference, prediction)["rougeL"].recall)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1, as MUSE's VerbMem / KnowMem use.

    >>> round(rouge_l_f1("the cat sat", "the cat sat on the mat"), 4)
    0.6667
    """
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def truth_ratio(perturbed_nlls: ArrayLike, paraphrased_nll: float) -> float:
    """R = exp(-mean_j avgNLL(perturbed_j)) / exp(-avgNLL(paraphrased)).

    R < 1: the model prefers the paraphrased (true) answer; R ~ 1: it cannot tell them apart.
    Computed as one exp of a difference so that neither probability underflows.

    >>> round(truth_ratio([1.0, 2.0, 3.0], 1.5), 4)  # exp(1.5 - 2)
    0.6065
    """
    perturbed = _tokens(perturbed_nlls)
    return float(math.exp(float(paraphrased_nll) - perturbed.mean()))


def probability_with_options(true_nll: float, wrong_nlls: ArrayLike) -> float:
    """TOFU's probability on real-authors / world-facts: p(true) / (p(true) + sum_j p(wrong_j)).

    Each p = exp(-mean token NLL) of that answer after the same question (open-unlearning's
    ``probability_w_options``). Computed as 1 / (1 + sum_j exp(nll_true - nll_j)), so tiny
    probabilities do not underflow to 0 / 0.

    >>> round(probability_with_options(math.log(2), [math.log(4), math.log(4)]), 4)  # .5 / (.5 + .25 + .25)
    0.5
    """
    wrong = _tokens(wrong_nlls)
    return float(1.0 / (1.0 + np.exp(float(true_nll) - wrong).sum()))


def truth_ratio_forget_score(ratios: ArrayLike) -> float:
    """Forget-set summary mean(min(R, 1/R)): 1 when the model cannot tell true from false.

    >>> round(truth_ratio_forget_score([0.5, 2.0, 1.0]), 4)
    0.6667
    """
    r = _tokens(ratios)
    return float(np.minimum(r, 1.0 / r).mean())


def truth_ratio_retain_score(ratios: ArrayLike) -> float:
    """Retain-set summary mean(max(0, 1 - R)): high when the true answer is clearly preferred.

    >>> round(truth_ratio_retain_score([0.5, 2.0, 1.0]), 4)
    0.1667
    """
    return float(np.maximum(0.0, 1.0 - _tokens(ratios)).mean())


def forget_quality(model_ratios: ArrayLike, reference_ratios: ArrayLike) -> dict[str, float]:
    """Two-sample KS test of per-item forget truth ratios, model vs retain-only reference.

    Returns the p-value (higher = closer to the reference; TOFU's "forget quality") and the KS
    statistic (with few items the p-value only takes a few values, the statistic is finer).

    >>> forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    {'pvalue': 1.0, 'statistic': 0.0}
    """
    result = stats.ks_2samp(_tokens(model_ratios), _tokens(reference_ratios))
    return {"pvalue": float(result.pvalue), "statistic": float(result.statistic)}


def model_utility(values: ArrayLike) -> float:
    """Harmonic mean of utility components (each in [0, 1]); one zero makes it zero.

    >>> round(model_utility([0.5, 0.25, 1.0]), 4)  # 3 / (2 + 4 + 1)
    0.4286
    """
    v = _tokens(values)
    if (v < 0).any():
        raise ValueError(f"model utility components must be >= 0, got {v.tolist()}.")
    return float(stats.hmean(v))


def loss_score(logprobs: ArrayLike) -> float:
    """LOSS attack: -mean NLL (higher = lower loss = more member-like).

    >>> loss_score([-1.0, -3.0])
    -2.0
    """
    return -avg_nll(logprobs)


def zlib_score(logprobs: ArrayLike, text: str) -> float:
    """ZLib attack: -(MEAN token NLL) / len(zlib.compress(text.encode("utf-8"))).

    Carlini et al. (2021) and open-unlearning divide the model's per-token loss by the zlib
    entropy of the text, so that text that is simply easy (repetitive) is not mistaken for
    memorised. The mean, not the sum: a summed NLL grows with length and would rank long texts
    as non-members whatever the model knows.

    >>> zlib_score([-1.0, -2.0], "a") == -1.5 / len(zlib.compress(b"a"))
    True
    """
    return -avg_nll(logprobs) / len(zlib.compress(text.encode("utf-8")))


def _lowest_fraction_mean(values: np.ndarray, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}.")
    # floor(k * n) as in the Min-K% reference code, but at least one token for short answers.
    count = max(1, int(k * values.size))
    return float(np.sort(values)[:count].mean())


def min_k_score(logprobs: ArrayLike, k: float = MIN_K_FRACTION) -> float:
    """Min-K%: mean of the lowest max(1, floor(k * n)) token log-probs.

    >>> min_k_score([-5.0, -1.0, -2.0, -4.0, -3.0])  # lowest 2: -5, -4
    -4.5
    """
    return _lowest_fraction_mean(_tokens(logprobs), k)


def min_k_plus_plus_score(logprobs: ArrayLike, mu: ArrayLike, sigma: ArrayLike, k: float = MIN_K_FRACTION) -> float:
    """Min-K%++: Min-K% over (log p - mu) / sigma, with mu, sigma of the model's own distribution.

    sigma is floored at 1e-12: where the distribution is flat (sigma = 0), log p = mu and the
    standardised value is 0 rather than 0 / 0.

    >>> min_k_plus_plus_score([-1.0, -2.0], mu=[-1.0, -1.0], sigma=[1.0, 0.5])  # [0, -2], lowest 1
    -2.0
    """
    lp, m, s = _tokens(logprobs), _tokens(mu), _tokens(sigma)
    if not lp.shape == m.shape == s.shape:
        raise ValueError(f"logprobs, mu and sigma differ in length: {lp.size}, {m.size}, {s.size}.")
    return _lowest_fraction_mean((lp - m) / np.maximum(s, 1e-12), k)


def mia_auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """ROC AUC of separating members (label 1) from non-members (label 0) by score.

    >>> mia_auc([0.9, 0.8], [0.1, 0.85])  # 3 of 4 pairs ranked right
    0.75
    """
    members, others = _tokens(member_scores), _tokens(nonmember_scores)
    labels = np.concatenate([np.ones(members.size), np.zeros(others.size)])
    return float(roc_auc_score(labels, np.concatenate([members, others])))


def priv_leak(auc_model: float, auc_reference: float) -> float:
    """MUSE PrivLeak in percent, from the usual AUCs (forget = members, see `mia_auc`).

    MUSE reports each AUC as 1 - AUC, so PrivLeak = ((1 - AUC_model) - (1 - AUC_reference)) /
    (1 - AUC_reference) * 100 (open-unlearning's ``privleak``). 0 is ideal; a model that still
    knows the forget set (AUC near 1) reads about -100; over-unlearning reads positive.

    >>> priv_leak(0.9, 0.5)  # (0.1 - 0.5) / 0.5
    -80.0
    """
    if not auc_reference < 1:
        raise ValueError(
            f"reference AUC must be < 1 to compute PrivLeak (MUSE divides by 1 - AUC), got {auc_reference};"
            " the reference model must not separate forget from holdout perfectly."
        )
    return float(((1.0 - auc_model) - (1.0 - auc_reference)) / (1.0 - auc_reference) * 100.0)
