"""Rank budget: the best rank-<=R approximation of a sum of LoRA deltas, from the factors alone.

A module's stack delta is ``B_cat @ A_cat`` (out x r times r x in; see `concat.concatenated_deltas`).
Its truncated SVD is found without forming the (out x in) matrix: QR both factors, take the SVD of
the small core, and keep the largest singular values (Eckart-Young: the best approximation in
Frobenius and spectral norm). The discarded singular values are exactly the error.

>>> a, b = torch.randn(4, 10), torch.randn(6, 4)  # a rank-4 delta (6 x 10)
>>> a2, b2, kept = truncate(a, b, max_rank=4)
>>> bool(torch.allclose(b2 @ a2, b @ a, atol=1e-4)), round(kept, 6)
(True, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from undial_peft.errors import UndialConfigError

NUMERICAL_ZERO = 1e-10  # singular values below this fraction of the largest are rank deficiency, not signal


@dataclass
class Truncated:
    """A compressed module: factors, kept rank, and the singular values of the exact delta."""

    a: torch.Tensor  # (k, in)
    b: torch.Tensor  # (out, k)
    singular_values: torch.Tensor  # (min(out, in, r),), float64, descending

    @property
    def energy_kept(self) -> float:
        """Sum of kept sigma^2 over the total: the share of the delta's squared Frobenius norm kept."""
        total = float((self.singular_values**2).sum())
        kept = float((self.singular_values[: self.a.shape[0]] ** 2).sum())
        return kept / total if total > 0 else 1.0


def truncated_svd(a: torch.Tensor, b: torch.Tensor, max_rank: int) -> Truncated:
    """Factors of the best rank-<=``max_rank`` approximation of ``b @ a``, in float32.

    Args:
        a: (r, in) stacked A blocks (scalings folded in).
        b: (out, r) stacked B blocks.
        max_rank: the rank budget R >= 1. Numerically zero singular values are dropped too, so
            the kept rank is min(R, numerical rank of b @ a).
    """
    if max_rank < 1:
        raise UndialConfigError(f"max_rank must be >= 1, got {max_rank}.")
    q_b, r_b = torch.linalg.qr(b.double())  # (out, p), (p, r) with p = min(out, r)
    q_a, r_a = torch.linalg.qr(a.double().T)  # (in, q), (q, r) with q = min(in, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (p, q): (p, m), (m,), (m, q)
    significant = int((s > s[0] * NUMERICAL_ZERO).sum()) if s.numel() and s[0] > 0 else 0
    keep = max(1, min(max_rank, significant))  # at least one (zero) row keeps shapes valid
    root = s[:keep].sqrt()  # split sigma evenly between the factors: both stay well scaled
    b_new = (q_b @ u[:, :keep]) * root  # (out, k)
    a_new = root[:, None] * (vh[:keep] @ q_a.T)  # (k, in)
    return Truncated(a_new.float(), b_new.float(), s)


def truncate(a: torch.Tensor, b: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, energy kept) of `truncated_svd`, for callers that need no singular values."""
    result = truncated_svd(a, b, max_rank)
    return result.a, result.b, result.energy_kept


def compress_blocks(
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]], max_rank: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Apply `truncated_svd` to every module whose stacked rank exceeds ``max_rank``.

    ``blocks`` maps a module path to (A_cat (r, in), B_cat (out, r)). Modules that fit are kept
    as they are (exact, energy 1.0). Returns the new blocks and the energy kept per module.
    """
    compressed, energy = {}, {}
    for path, (a_cat, b_cat) in blocks.items():
        if a_cat.shape[0] <= max_rank:
            compressed[path], energy[path] = (a_cat, b_cat), 1.0
            continue
        result = truncated_svd(a_cat, b_cat, max_rank)
        compressed[path], energy[path] = (result.a, result.b), result.energy_kept
    return compressed, energy
