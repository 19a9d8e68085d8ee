"""Run a model on question/answer rows: per-token answer scores and greedy answers.

`score` / `score_features` give, per item, the answer tokens' log-probs and the statistics the
membership-inference attacks need; `greedy_answers` / `greedy_from_ids` decode greedy answers.
Both put the model in eval mode for the call and restore its mode afterwards.

>>> # [s.logprobs for s in score(model, tokenizer, [Example("Q?", "A.")])]  -> [array([...])]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from undial_peft.data.encoding import Collator, encode
from undial_peft.data.prompt_format import AUTO, FormatSpec, PromptFormat
from undial_peft.data.readers import Example
from undial_peft.evals import MAX_NEW_TOKENS, metrics
from undial_peft.models import pad_id
from undial_peft.training.loss import shift_labels, token_logprobs
from undial_peft.utils.modes import model_mode


@dataclass(frozen=True, eq=False)
class TokenScores:
    """Per answer token (1-D, length n): log p(true token), mean and std of log p under the model's
    own next-token distribution (for Min-K%++), and whether the argmax was the true token."""

    logprobs: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    argmax_match: np.ndarray


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def score(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    prompt_format: FormatSpec = AUTO,
    max_length: int = 512,
    batch_size: int = 8,
) -> list[TokenScores]:
    """Per-item answer-token scores, one no-grad forward per batch (the model's mode is restored).

    >>> # [s.logprobs for s in score(model, tokenizer, [Example("Q?", "A.")])]  -> [array([...])]
    """
    fmt = PromptFormat.resolve(prompt_format, tokenizer)
    return score_features(model, tokenizer, [encode(tokenizer, e, max_length, fmt) for e in examples],
                          batch_size=batch_size)


def mean_answer_probability(model: Any, tokenizer: Any, examples: Sequence[Example], **score_args: Any) -> float:
    """Mean over examples of the answer probability exp(-mean answer-token NLL); ``score_args`` go to `score`.

    >>> # mean_answer_probability(model, tokenizer, [Example("Q?", "A.")], prompt_format="completion")  -> 0.31
    """
    scores = score(model, tokenizer, examples, **score_args)
    return float(sum(metrics.answer_probability(s.logprobs) for s in scores) / len(scores))


def score_features(model: Any, tokenizer: Any, features: Sequence[dict[str, list]], *, batch_size: int = 8) -> list[TokenScores]:
    """`score` on already tokenised rows (``input_ids``, ``labels`` with -100 on the prompt), for
    prompts built some other way (a system turn, earlier turns).

    >>> # score_features(model, tok, [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}])
    """
    collate, device = Collator(pad_id(tokenizer)), _device(model)
    out: list[TokenScores] = []
    with model_mode(model):
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                batch = {k: v.to(device) for k, v in collate(list(features[start : start + batch_size])).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
                logp, mask = token_logprobs(logits, batch["labels"])  # (B, T), (B, T)
                targets = shift_labels(batch["labels"])  # (B, T): the token each position predicts
                for i in range(logits.shape[0]):
                    # One row at a time: at most (n_i, V) float32 extra, never a (B, T, V) float32 copy.
                    log_q = logits[i][mask[i]].float().log_softmax(-1)  # (n_i, V)
                    q = log_q.exp()
                    mu = (q * log_q).sum(-1)  # (n_i,) E_q[log q]
                    # E_q[(log q - mu)^2] = sum q (log q)^2 - mu^2, in the form that cannot go negative.
                    sigma = (q * (log_q - mu[:, None]).square()).sum(-1).sqrt()  # (n_i,)
                    match = log_q.argmax(-1) == targets[i][mask[i]]  # (n_i,)
                    out.append(TokenScores(*(t.double().cpu().numpy() for t in (logp[i][mask[i]], mu, sigma, match))))
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string, then stripped (open-unlearning cuts before stripping).

    >>> cut_at_stop(" Paris.\\n\\nQuestion: Who?", ("\\n\\n", "Question:"))
    'Paris.'
    """
    for word in stop:  # each split keeps the part before, so the earliest stop wins
        text = text.split(word)[0]
    return text.strip()


def greedy_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    prompt_format: FormatSpec = AUTO,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers, decoded from the new tokens only (special tokens skipped, stripped).

    >>> # greedy_answers(model, tokenizer, ["Where was Ana born?"])  -> ['Ana was born in Velmora.']
    """
    fmt = PromptFormat.resolve(prompt_format, tokenizer)
    prompts = [fmt.prompt_ids(tokenizer, q) for q in questions]
    return greedy_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def greedy_from_ids(
    model: Any,
    tokenizer: Any,
    all_prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    stop: Sequence[str] = (),
) -> list[str]:
    """`greedy_answers` on prompts given as token ids. Prompts are LEFT-padded so every row's next
    token follows its own last prompt token. Each text is cut at the first ``stop`` string before
    it is stripped (a benchmark's stop words, e.g. MUSE KnowMem's "\\n\\n").

    >>> # greedy_from_ids(model, tok, [[1, 17, 4]], max_new_tokens=8)  -> ['...']
    """
    generated = greedy_new_ids(model, tokenizer, all_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [cut_at_stop(t, stop) for t in texts]


def greedy_new_ids(
    model: Any,
    tokenizer: Any,
    all_prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    sample_top_p: float | None = None,
) -> list[list[int]]:
    """The greedy new token ids after each prompt (left-padded batches; a row that ended early is
    followed by pad ids, which decoding with ``skip_special_tokens`` drops). ``sample_top_p`` samples
    instead, from that nucleus, with torch's global RNG (seed it for a repeatable draw).

    For callers that decode themselves, e.g. to keep the leading space of a completion answer,
    which some tokenizers drop when the new tokens are decoded alone.
    >>> # greedy_new_ids(model, tok, [[1, 17, 4]], max_new_tokens=2)  -> [[23, 9]]
    """
    pad, device = pad_id(tokenizer), _device(model)
    out: list[list[int]] = []
    with model_mode(model):
        with torch.no_grad():
            for start in range(0, len(all_prompts), batch_size):
                prompts = all_prompts[start : start + batch_size]
                width = max(len(p) for p in prompts)
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (B, T)
                attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample_top_p is not None,
                    **({"top_p": sample_top_p, "top_k": 0} if sample_top_p is not None else {}),
                    pad_token_id=pad,
                )  # (B, T + new)
                out.extend(generated[:, width:].tolist())
    return out


def end_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids at which `greedy_new_ids` stops a row (it pads the row after it): the model's generation
    config's end-of-sequence ids (one id, or several where a model lists its end of turn too), else the tokenizer's.

    For callers that cut a reply where decoding it alone would have stopped.
    >>> # end_ids(smollm2, tok)  -> {2}
    """
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
