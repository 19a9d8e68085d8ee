"""The loss functions against hand-computed cases and independent formulas."""

import math

import pytest
import torch

from undial_peft.training import loss as L


def test_hand_computed_single_position():
    # teacher z = [1, 2, 0], target y = 1, beta = 1  ->  adjusted [1, 1, 0]
    # p = [e, e, 1] / (2e + 1); student s = [0, 1, 0]  ->  loss = log(2 + e) - p_1 * 1
    teacher = torch.tensor([[[1.0, 2.0, 0.0], [9.0, 9.0, 9.0]]])
    student = torch.tensor([[[0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, 1]])  # the logits at position 0 predict labels[1]; position 1 predicts nothing
    e = math.e
    expected = math.log(2 + e) - e / (2 * e + 1)
    assert L.undial_loss(student, teacher, labels, beta=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_matches_kl_plus_entropy_in_float64():
    torch.manual_seed(0)
    s, z = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    got = L.undial_loss(s, z, labels, beta=3.0)
    # independent: per counted position, cross-entropy = KL(p || q) + H(p), built by hand
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            adjusted = z[b, t].clone()
            adjusted[y] -= 3.0
            p = torch.exp(adjusted - torch.logsumexp(adjusted, 0))
            q = torch.exp(s[b, t] - torch.logsumexp(s[b, t], 0))
            total += (p * (p / q).log()).sum().item() - (p * p.log()).sum().item()
            count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-6)


def test_ignored_positions_contribute_nothing():
    torch.manual_seed(1)
    s, z = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    labels[0, 3:] = -100  # padding
    labels[1, :2] = -100  # prompt
    base = L.undial_loss(s, z, labels, beta=10.0)
    ignored = L.shift_labels(labels) == -100  # positions whose prediction does not count
    s2, z2 = s.clone(), z.clone()
    s2[ignored] = torch.randn_like(s2[ignored]) * 100
    z2[ignored] = torch.randn_like(z2[ignored]) * 100
    assert L.undial_loss(s2, z2, labels, beta=10.0).item() == base.item()
    # and the divisor is the counted positions, not B * T
    counted = (~ignored).sum().item()
    per_token_sum = L.undial_loss(s, z, labels, beta=10.0, num_items=1)
    assert base.item() == pytest.approx(per_token_sum.item() / counted, rel=1e-6)


def test_beta_zero_fresh_student_has_zero_gradient_and_beta_positive_does_not():
    torch.manual_seed(2)
    z = torch.randn(1, 4, 7)
    labels = torch.randint(0, 7, (1, 4))
    for beta, zero in ((0.0, True), (10.0, False)):
        s = z.clone().requires_grad_(True)  # a fresh LoRA (B = 0) makes student == teacher
        L.undial_loss(s, z, labels, beta=beta).backward()
        assert (s.grad.abs().max().item() < 1e-7) is zero


def test_chunked_from_hidden_equals_full_logits_with_gradients():
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(False)
    hs = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(3, 7, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 7))
    labels[:, :2] = -100
    labels[2, 5:] = -100
    full = L.undial_loss(head(hs), head(ht), labels, beta=10.0)
    (grad_full,) = torch.autograd.grad(full, hs)
    for chunk in (1, 4, 1000):
        fused = L.undial_loss_from_hidden(hs, ht, head, labels, beta=10.0, chunk_size=chunk)
        (grad_fused,) = torch.autograd.grad(fused, hs)
        assert fused.item() == pytest.approx(full.item(), abs=1e-6)
        assert torch.allclose(grad_fused, grad_full, atol=1e-9)


def test_bf16_logits_are_computed_in_float32():
    torch.manual_seed(4)
    s, z = torch.randn(2, 8, 300).bfloat16(), torch.randn(2, 8, 300).bfloat16()
    labels = torch.randint(0, 300, (2, 8))
    got = L.undial_loss(s, z, labels, beta=10.0)
    assert got.dtype == torch.float32
    reference = L.undial_loss(s.double(), z.double(), labels, beta=10.0)
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)


def test_per_token_beta_zero_equals_dropping_the_adjustment():
    torch.manual_seed(5)
    s, z = torch.randn(1, 5, 6), torch.randn(1, 5, 6)
    labels = torch.randint(0, 6, (1, 5))
    constant = torch.full((1, 5), 3.0)
    assert L.undial_loss(s, z, labels, constant).item() == pytest.approx(L.undial_loss(s, z, labels, 3.0).item())
    only_last = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0]])  # beta aligned with labels: only token 4 adjusted
    manual = L.undial_loss(s[:, 3:4], z[:, 3:4], torch.tensor([[-100]]), 0.0, num_items=1)  # no position: 0
    assert manual.item() == 0.0
    parts = [L.undial_loss(s[:, t : t + 2], z[:, t : t + 2], labels[:, t : t + 2], 3.0 if t == 3 else 0.0, 1)
             for t in range(4)]
    assert L.undial_loss(s, z, labels, only_last).item() == pytest.approx(sum(p.item() for p in parts) / 4, rel=1e-6)


def test_nll_and_npo_against_hand_formulas():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p(token 1 | pos 0) = 3/4
    labels = torch.tensor([[-100, 1]])
    assert L.nll_loss(logits, labels).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert L.sequence_logprob(logits, labels).item() == pytest.approx(math.log(0.75), abs=1e-6)
    student, teacher = torch.tensor([-2.0]), torch.tensor([-1.0])
    expected = -(2 / 0.1) * math.log(1 / (1 + math.exp(0.1 * (-2.0 + 1.0))))
    assert L.npo_loss(student, teacher, beta=0.1).item() == pytest.approx(expected, rel=1e-6)
