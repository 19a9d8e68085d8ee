"""Loss functions: UNDIAL and the baselines (gradient ascent, NPO), as pure tensor code.

Label convention (the same as transformers' causal-LM loss): ``labels`` are aligned with
``input_ids`` and NOT shifted; the logits at position t predict the token at t + 1, so the
functions shift internally. Positions whose (shifted) label is -100 contribute nothing, and sums
are divided by the number of counted positions, or by ``num_items`` when the caller (the Trainer,
under gradient accumulation) passes the count over the whole accumulated batch.

>>> import torch
>>> logits = torch.zeros(1, 3, 5)
>>> labels = torch.tensor([[-100, 2, 4]])
>>> round(undial_loss(logits, logits, labels, beta=0.0).item(), 4)  # uniform target: log(5)
1.6094
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Beta = float | torch.Tensor  # a scalar, or a per-token (B, T) tensor aligned with labels (FUnDIAL)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for the prediction made AT each position: (B, T) -> (B, T), last column -100."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _denominator(num_items: int | torch.Tensor | None, counted: torch.Tensor) -> torch.Tensor:
    if num_items is None:
        return counted.clamp(min=1).float()
    return torch.as_tensor(num_items, device=counted.device, dtype=torch.float32).clamp(min=1)


def _counted(labels: torch.Tensor, beta: Beta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask of counted positions, their targets (N,) and their betas (N,)."""
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    if isinstance(beta, torch.Tensor) and beta.dim() > 0:
        betas = shift_labels_like(beta)[mask].float()  # (N,)
    else:
        betas = torch.full((int(mask.sum()),), float(beta), device=labels.device)
    return mask, targets[mask], betas


def shift_labels_like(values: torch.Tensor) -> torch.Tensor:
    """Shift a per-token (B, T) tensor the way labels are shifted (last column 0)."""
    return F.pad(values[:, 1:], (0, 1), value=0)


def adjusted_targets(teacher_logits: torch.Tensor, targets: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """softmax(z - beta * onehot(y)) in float32.

    Args:
        teacher_logits: (N, V) teacher logits at the counted positions.
        targets: (N,) token ids y.
        beta: (N,) adjustment strength per position.
    Returns:
        (N, V) float32 target distribution.
    """
    z = teacher_logits.float()  # (N, V)
    z = z.scatter_add(-1, targets[:, None], -beta[:, None].to(z.dtype))  # lower only the target logit
    return z.softmax(-1)


def soft_cross_entropy_sum(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """sum_n  -sum_v p[n, v] * log_softmax(s[n])[v], in float32. (N, V), (N, V) -> scalar."""
    return -(target_probs * student_logits.float().log_softmax(-1)).sum()


def undial_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: Beta,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """UNDIAL loss from full logits: mean soft cross-entropy against the adjusted teacher.

    Args:
        student_logits: (B, T, V) logits of the model being trained (any float dtype).
        teacher_logits: (B, T, V) logits of the frozen teacher.
        labels: (B, T) unshifted labels, -100 where the position does not count.
        beta: strength; a float or a (B, T) per-token tensor aligned with ``labels``.
        num_items: divisor; defaults to the number of counted positions.

    >>> import torch
    >>> s = torch.randn(2, 4, 7); y = torch.randint(0, 7, (2, 4))
    >>> undial_loss(s, s, y, beta=0.0) > 0  # the teacher's own entropy, not zero
    tensor(True)
    """
    mask, targets, betas = _counted(labels, beta)
    target_probs = adjusted_targets(teacher_logits[mask], targets, betas)  # (N, V)
    total = soft_cross_entropy_sum(student_logits[mask], target_probs)
    return total / _denominator(num_items, mask.sum())


class _FusedUndialHead(torch.autograd.Function):
    """UNDIAL loss straight from hidden states, one chunk of positions at a time.

    The gradient of the soft cross-entropy w.r.t. the student logits is softmax(s) - p, so the
    gradient w.r.t. the hidden states is computed chunk by chunk during the forward pass and
    kept (N, H). No (N, V) tensor outlives its chunk, so peak memory does not grow with N * V.
    The head weight is frozen (LoRA never targets it here), so it gets no gradient.

    At most three (c, V) float32 tensors are alive at once and four are allocated per chunk (was
    six alive, eight allocated): the adjustment, the product and the gradient are done in place
    or as row dot products. Same kernels and values as before, bit for bit in the gradient.
    """

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, bias, targets, betas, chunk_size):  # noqa: D102
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        grad_hidden = torch.empty_like(student_hidden)  # (N, H)
        for start in range(0, student_hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            z = F.linear(teacher_hidden[part].to(weight.dtype), weight, bias).float()  # (c, V) teacher logits
            z.scatter_add_(-1, targets[part, None], -betas[part, None].to(z.dtype))  # z - beta * onehot(y)
            probs = z.softmax(-1)  # (c, V) adjusted target
            del z
            log_q = F.linear(student_hidden[part].to(weight.dtype), weight, bias).float().log_softmax(-1)  # (c, V)
            total -= (probs.unsqueeze(1) @ log_q.unsqueeze(2)).sum()  # sum_c sum_v p log q, no (c, V) product
            log_q.exp_().sub_(probs)  # softmax(s) - p, in place
            grad_hidden[part] = (log_q.to(weight.dtype) @ weight).to(grad_hidden.dtype)  # (c, H)
            del probs, log_q
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        (grad_hidden,) = ctx.saved_tensors
        return grad_total * grad_hidden, None, None, None, None, None, None


def undial_loss_from_hidden(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    beta: Beta,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """UNDIAL loss from final hidden states, applying ``lm_head`` per chunk of counted positions.

    Equal to ``undial_loss(lm_head(student_hidden), lm_head(teacher_hidden), labels, beta)`` but
    never materialises (B, T, V) logits: only counted positions are projected, ``chunk_size`` rows
    at a time. Assumes logits = lm_head(hidden) (no soft-capping or logit scaling); the trainer
    measures that once (`UndialTrainer._plain_head`) before using it.

    Args:
        student_hidden: (B, T, H) final hidden states of the student (requires grad).
        teacher_hidden: (B, T, H) final hidden states of the teacher, or (N, H): only its rows at
            the counted positions, in row-major order (what a cached teacher stores).
        lm_head: the output projection, frozen.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask, targets, betas = _counted(labels, beta)
    teacher_rows = teacher_hidden if teacher_hidden.dim() == 2 else teacher_hidden[mask]  # (N, H)
    if teacher_rows.shape[0] != targets.shape[0]:
        raise ValueError(f"teacher_hidden has {teacher_rows.shape[0]} counted rows, labels count {targets.shape[0]}")
    total = _FusedUndialHead.apply(
        student_hidden[mask], teacher_rows.detach(), lm_head.weight, lm_head.bias, targets, betas, chunk_size
    )
    return total / _denominator(num_items, mask.sum())


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token and the mask of counted positions. (B, T, V), (B, T) -> (B, T), (B, T)."""
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX
    logp = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    logp[mask] = logits[mask].float().log_softmax(-1).gather(-1, targets[mask][:, None]).squeeze(-1)
    return logp, mask


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood over counted positions (transformers' causal-LM loss)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / _denominator(num_items, mask.sum())


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y | x) per sequence: the sum of counted token log-probs. (B, T, V), (B, T) -> (B,)."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(-1)


def npo_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative Preference Optimisation: mean of -(2/beta) * logsigmoid(-beta * (logp_s - logp_t)).

    Args:
        student_logp, teacher_logp: (B,) sequence log-probs of the forget answers.
    """
    return (-(2.0 / beta) * F.logsigmoid(-beta * (student_logp - teacher_logp))).mean()
