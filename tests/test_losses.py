"""Tests for losses.py: hand-computed values, an independent float64 formula, stability, masks, gradients."""

import math

import numpy as np
import pytest
import torch

from losses import dpo_loss, ranking_loss, sequence_logprobs, sft_loss, token_logprobs


def neg_log_sigmoid(x):
    """-log(1 / (1 + exp(-x))) written the naive way, in float64 numpy: fine for moderate x."""
    x = np.asarray(x, dtype=np.float64)
    return -np.log(1.0 / (1.0 + np.exp(-x)))


def log_softmax_loop(logits_row, label):
    """log p(label) for one position by the definition, in float64."""
    z = logits_row.double()
    return (z[label] - torch.log(torch.exp(z).sum())).item()


# ---------------------------------------------------------------------------------------------------------
# token and sequence log-probs


def test_token_logprobs_hand_value_and_shape():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.5)]]))


def test_token_logprobs_bf16_runs_in_float32():
    torch.manual_seed(0)
    logits = (torch.randn(4, 50) * 5).bfloat16()
    labels = torch.randint(0, 50, (4,))
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    expected = [log_softmax_loop(logits[i], labels[i]) for i in range(4)]
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def response_logits(logits, mask):
    """Full logits (B, T, V) -> those of the positions that predict a response token, (N, V), as
    sequence_logprobs takes them (training computes only these)."""
    return logits[:, :-1][mask[:, 1:].bool()]


def hand_sequence_logprob(logits, labels, mask, b):
    """Loop over positions: token t (t >= 1) is predicted by logits[t - 1]; keep it if mask[t] is 1."""
    total, count = 0.0, 0
    for t in range(1, labels.shape[1]):
        if mask[b, t]:
            total += log_softmax_loop(logits[b, t - 1], labels[b, t])
            count += 1
    return total, count


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_logprobs_matches_hand_loop(padding):
    torch.manual_seed(1)
    B, T, V = 3, 9, 11
    prompt_lens, resp_lens = [2, 3, 1], [4, 2, 5]
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = prompt_lens[b] + resp_lens[b]
        start = T - n if padding == "left" else 0
        mask[b, start + prompt_lens[b]: start + n] = 1  # response tokens only
    summed = sequence_logprobs(response_logits(logits, mask), labels, mask)
    averaged = sequence_logprobs(response_logits(logits, mask), labels, mask, average=True)
    assert summed.shape == (B,)
    for b in range(B):
        total, count = hand_sequence_logprob(logits, labels, mask, b)
        assert count == resp_lens[b]
        assert summed[b].item() == pytest.approx(total, abs=1e-5)
        assert averaged[b].item() == pytest.approx(total / count, abs=1e-5)


def test_sequence_logprobs_same_alone_and_padded():
    """A sequence's log-prob alone equals its value inside a left-padded batch: masks come from lengths."""
    torch.manual_seed(2)
    V = 7
    logits = torch.randn(1, 5, V)
    labels = torch.randint(0, V, (1, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    alone = sequence_logprobs(response_logits(logits, mask), labels, mask)
    pad = 3  # junk logits and labels in the padding must not matter
    logits_p = torch.cat([torch.randn(1, pad, V) * 50, logits], 1)
    mask_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), mask], 1)
    padded = sequence_logprobs(response_logits(logits_p, mask_p), torch.cat([torch.randint(0, V, (1, pad)), labels], 1), mask_p)
    torch.testing.assert_close(alone, padded)


def test_sequence_logprobs_empty_response_average_is_zero_not_nan():
    logits = torch.randn(2, 4, 5)
    labels = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0]])
    out = sequence_logprobs(response_logits(logits, mask), labels, mask, average=True)
    assert out[0].item() == 0.0 and torch.isfinite(out).all()


def test_sft_loss_is_pooled_mean_nll():
    torch.manual_seed(3)
    B, T, V = 2, 6, 8
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]])  # 5 tokens and 1 token
    totals, counts = zip(*(hand_sequence_logprob(logits, labels, mask, b) for b in range(B)))
    expected = -sum(totals) / sum(counts)  # pooled over tokens, not a mean of per-row means
    logps = sequence_logprobs(response_logits(logits, mask), labels, mask)
    assert sft_loss(logps, mask[:, 1:].sum(1)).item() == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(-(totals[0] / 5 + totals[1] / 1) / 2, abs=1e-3)
    assert sft_loss(torch.tensor([-3.0, -6.0]), torch.tensor([2, 1])).item() == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------------------
# ranking loss


def test_ranking_loss_hand_values():
    r_c, r_r = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    losses, metrics = ranking_loss(r_c, r_r, margin=0.5)
    # pair 0: diff 1.5, minus the margin 1.0; pair 1: diff -2, minus the margin -2.5
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.5))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    assert metrics["accuracy"].item() == pytest.approx(0.5)
    assert metrics["margin"].item() == pytest.approx((1.5 - 2.0) / 2)
    assert not metrics["accuracy"].requires_grad
    losses, metrics = ranking_loss(torch.zeros(2), torch.zeros(2))  # a tie is not ranked right
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    assert metrics["accuracy"].item() == 0.0


def test_ranking_loss_margin_and_reference_formula():
    rng = np.random.default_rng(4)
    r_c, r_r = (rng.normal(size=16) * 3 for _ in range(2))
    m = 0.7
    losses, _ = ranking_loss(torch.tensor(r_c), torch.tensor(r_r), margin=m)
    np.testing.assert_allclose(losses.numpy(), neg_log_sigmoid(r_c - r_r - m), rtol=1e-10)
    losses0, _ = ranking_loss(torch.tensor(r_c), torch.tensor(r_r))
    np.testing.assert_allclose(losses0.numpy(), neg_log_sigmoid(r_c - r_r), rtol=1e-10)


def test_ranking_loss_stable_at_large_scores():
    r_c = torch.tensor([1000.0, -1000.0], requires_grad=True)
    r_r = torch.tensor([-1000.0, 1000.0])
    losses, _ = ranking_loss(r_c, r_r)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(r_c.grad).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(2000.0)


def test_ranking_loss_rejects_negative_margin():
    with pytest.raises(ValueError, match="margin must be >= 0, got -0.1"):
        ranking_loss(torch.zeros(2), torch.zeros(2), margin=-0.1)


# ---------------------------------------------------------------------------------------------------------
# DPO


def dpo_inputs(h_c, h_r):
    """Policy/reference log-probs whose log-ratios are h_c and h_r, with nonzero reference values."""
    ref_c, ref_r = torch.tensor([-30.0] * len(h_c)), torch.tensor([-25.0] * len(h_r))
    return ref_c + torch.tensor(h_c), ref_r + torch.tensor(h_r), ref_c, ref_r


def test_dpo_at_reference_is_log2_and_ipo_quarter_beta_sq():
    pi = torch.tensor([-12.0, -40.0])
    rej = torch.tensor([-9.0, -70.0])
    losses, metrics = dpo_loss(pi, rej, pi.clone(), rej.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    assert metrics["reward_margin"].item() == 0.0 and metrics["reward_accuracy"].item() == 0.0
    for beta in (0.1, 0.5):
        losses, _ = dpo_loss(pi, rej, pi.clone(), rej.clone(), beta=beta, loss_type="ipo")
        torch.testing.assert_close(losses, torch.full((2,), 1 / (4 * beta ** 2)))


def test_dpo_sigmoid_uses_reference_and_matches_formula():
    rng = np.random.default_rng(5)
    pi_c, pi_r, ref_c, ref_r = (rng.normal(size=32) * 10 - 50 for _ in range(4))
    beta = 0.3
    t = [torch.tensor(x) for x in (pi_c, pi_r, ref_c, ref_r)]
    losses, _ = dpo_loss(*t, beta=beta)
    h = (pi_c - ref_c) - (pi_r - ref_r)
    np.testing.assert_allclose(losses.numpy(), neg_log_sigmoid(beta * h), rtol=1e-10)
    eps = 0.2
    losses, _ = dpo_loss(*t, beta=beta, label_smoothing=eps)
    expected = (1 - eps) * neg_log_sigmoid(beta * h) + eps * neg_log_sigmoid(-beta * h)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10)


def test_dpo_hand_values_smoothing_and_ipo():
    pi_c, pi_r, ref_c, ref_r = dpo_inputs([2.0], [-1.0])  # h = 3
    beta = 0.5
    losses, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-1.5)) + 0.1 * math.log(1 + math.exp(1.5))
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    losses, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type="ipo")
    assert losses.item() == pytest.approx((3.0 - 1.0) ** 2)
    assert metrics["rewards_chosen"].item() == pytest.approx(1.0)
    assert metrics["rewards_rejected"].item() == pytest.approx(-0.5)
    assert metrics["reward_margin"].item() == pytest.approx(1.5)
    assert metrics["reward_accuracy"].item() == 1.0


def test_dpo_metrics_are_means_over_batch():
    _, metrics = dpo_loss(*dpo_inputs([1.0, -2.0, 0.5], [0.0, 1.0, 0.0]), beta=2.0)
    assert metrics["rewards_chosen"].item() == pytest.approx(2.0 * (1.0 - 2.0 + 0.5) / 3)
    assert metrics["rewards_rejected"].item() == pytest.approx(2.0 * 1.0 / 3)
    assert metrics["reward_accuracy"].item() == pytest.approx(2 / 3)
    assert metrics["reward_margin"].item() == pytest.approx(2.0 * (1.0 - 3.0 + 0.5) / 3)


def test_dpo_stable_at_large_log_ratios():
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.25), ("ipo", 0.0)):
        pi_c = torch.tensor([1000.0, -1000.0], requires_grad=True)
        pi_r = torch.tensor([-1000.0, 1000.0], requires_grad=True)
        losses, _ = dpo_loss(pi_c, pi_r, torch.zeros(2), torch.zeros(2), beta=1.0, loss_type=loss_type,
                             label_smoothing=eps)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pi_c.grad).all() and torch.isfinite(pi_r.grad).all()
    losses, _ = dpo_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]), torch.zeros(1), torch.zeros(1),
                         beta=1.0)
    assert losses.item() == pytest.approx(2000.0)  # -log sigmoid(-2000), not inf


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_gradient_raises_chosen_lowers_rejected(loss_type):
    pi_c = torch.tensor([-20.0, -5.0], requires_grad=True)
    pi_r = torch.tensor([-20.0, -8.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-20.0, -6.0]), torch.tensor([-20.0, -7.0])  # h = 0 and h = 2 (< 1/(2 beta))
    losses, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    # gradient descent moves opposite the gradient: chosen up needs grad < 0, rejected down needs grad > 0
    assert (pi_c.grad < 0).all() and (pi_r.grad > 0).all()
    assert ref_c.grad is None


@pytest.mark.parametrize("kwargs, name", [
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(loss_type="hinge"), "loss_type"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
])
def test_dpo_rejects_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dpo_loss(*dpo_inputs([0.0], [0.0]), **kwargs)
