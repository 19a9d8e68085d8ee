"""The last hidden state of a batch whose rows open alike, with the shared opening run once.

A chat template puts the same tokens before every question (SmolLM2's system prompt and user header
are 24 of a 46-token forget row), and causal attention makes their hidden states the same in every
row. `last_hidden` runs them once, as one row, and the rest of each row after them with the
opening's keys and values repeated over the batch: the same numbers as one pass over the whole batch
(hidden states equal, gradients to float rounding: autograd sums the repeated opening's gradient),
for the cost of the shorter rows. A SmolLM2-135M-Instruct chat step (8 forget and 8 guard rows):
3.74 s -> 3.00 s and peak memory 1744 -> 1405 MiB (`examples/benchmarks/step_cost.py --sections chat`,
docs/cost.md).

Completion prompts share no opening (a BOS token at most): `shared_length` is then below
`MIN_SHARED` and the batch runs as one pass. `check` measures once per model that both ways agree,
since an architecture may treat a cache differently (a recurrent state, dropout in training mode).

>>> import torch
>>> shared_length(torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
2
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# Fewer shared tokens than this run as one pass: the second call costs more than the rows it saves.
MIN_SHARED = 8
# Largest |shared - plain| allowed on the check, relative to the largest |hidden|: the two ways differ only in
# the summation order of the attention (exactly 0 on SmolLM2 in float32); half types get 4 eps.
TOLERANCE = 1e-3


def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every row has, alike and unpadded; at most T - 1, so each row keeps a token.

    ``input_ids`` and ``attention_mask`` are (B, T), right-padded (`data.encoding.Collator`).
    """
    alike = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)  # (T,)
    differs = (~alike).nonzero()
    length = int(differs[0]) if len(differs) else input_ids.shape[1]
    return min(length, input_ids.shape[1] - 1)


def worth_sharing(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether `last_hidden` saves work on this batch: two rows or more sharing at least `MIN_SHARED` tokens."""
    return input_ids.shape[0] > 1 and shared_length(input_ids, attention_mask) >= MIN_SHARED


def _cache_keyword(model: Any) -> str:
    # transformers 5.0 names the key/value cache past_key_values; later 5.x releases name it cache.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def last_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, share: bool = True) -> torch.Tensor:
    """(B, T, H): the model's last hidden state, the shared opening run once (one pass where none is shared,
    or with ``share=False``).

    The opening runs as one row with its cache kept; the cache is repeated B times (a differentiable
    copy) and the rest of every row runs on it, so gradients reach the opening's weights from all rows.
    Needs a model that keeps a cache in this mode (not under gradient checkpointing, which turns it off).
    >>> # hidden = last_hidden(peft_model, batch["input_ids"], batch["attention_mask"])  -> (B, T, H)
    """
    plain = {"output_hidden_states": True, "logits_to_keep": 1}  # no (B, T, V) logits: callers apply the head
    if not (share and worth_sharing(input_ids, attention_mask)):
        return model(input_ids=input_ids, attention_mask=attention_mask, **plain).hidden_states[-1]
    rows, shared = input_ids.shape[0], shared_length(input_ids, attention_mask)
    opening = model(input_ids=input_ids[:1, :shared], attention_mask=attention_mask[:1, :shared],
                    use_cache=True, **plain)
    cache = opening.cache if getattr(opening, "cache", None) is not None else opening.past_key_values
    cache.batch_repeat_interleave(rows)  # (1, heads, P, d) -> (B, heads, P, d) in every layer
    rest = model(input_ids=input_ids[:, shared:], attention_mask=attention_mask, use_cache=True,
                 **{_cache_keyword(model): cache}, **plain)
    head = opening.hidden_states[-1].expand(rows, -1, -1)  # (B, P, H)
    return torch.cat([head, rest.hidden_states[-1]], dim=1)  # (B, T, H)


def check(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """Compare `last_hidden` with one pass over the batch, no grad, in the model's current mode.

    Returns "" when they agree, else why not (an error, or the largest difference). The RNG state is
    restored afterwards, so a dropout in the forward does not shift training; a dropout makes the two
    ways differ, and the batch then runs as one pass (a shared opening would share its dropout mask).
    >>> # check(peft_model, ids, mask)  -> "" on Llama-style models
    """
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        try:
            shared = last_hidden(model, input_ids, attention_mask)  # (B, T, H)
        except Exception as err:  # noqa: BLE001 - any failure means: run the batch as one pass
            return f"running the shared opening once failed ({type(err).__name__}: {err})"
        whole = last_hidden(model, input_ids, attention_mask, share=False)  # (B, T, H)
    real = attention_mask.bool()  # (B, T): padding positions are never read
    scale = whole[real].abs().max().clamp(min=torch.finfo(torch.float32).tiny)
    error = ((shared[real] - whole[real]).abs().max() / scale).item()
    if error <= max(TOLERANCE, 4 * torch.finfo(whole.dtype).eps):
        return ""
    return f"the shared opening run once moves the hidden state by {error:.1%} of its largest value"
