"""The losses of TS-Align, as pure functions on tensors.

TS-Align has two learning signals, one per model that learns:

- The student reward model learns to rank. The teacher says which of two responses is better (chosen,
  rejected); the student is trained with a Bradley-Terry pairwise loss to give the chosen one the higher
  score. See `ranking_loss`.
- The policy learns from the same pairs with DPO: it raises the log-probability of the chosen response
  relative to a frozen reference (the policy at the start of the round) and lowers that of the rejected one.
  See `dpo_loss`, fed by `sequence_logprobs`; `sft_loss` is an optional auxiliary term.

Nothing here touches a model: inputs are logits, labels, masks, log-probs and scores. Pairwise losses come
back unreduced, (B,), with a dict of detached diagnostics; the caller takes the mean.

Shapes: B batch (pairs, or sequences), T time, V vocab, N selected positions (any leading shape).
"""

import torch
import torch.nn.functional as F


def token_logprobs(logits, labels):
    """log p(labels) under softmax(logits), position by position; no shift.

    logits (N, V) or any (..., V), of any float dtype; labels (N) or (...) long -> (N) or (...) float32.
    The log-softmax runs in float32 so that bf16/fp16 logits do not lose the small differences that
    log-probs are made of.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)


def _shifted_token_logprobs(logits, labels, mask):
    """Causal-LM alignment: logits[:, t] predicts labels[:, t + 1]. Returns (B, T-1) log-probs and mask."""
    logp = token_logprobs(logits[:, :-1], labels[:, 1:])  # (B, T-1)
    return logp, mask[:, 1:].to(logp.dtype)  # (B, T-1), (B, T-1)


def sequence_logprobs(logits, labels, mask, average=False):
    """log p(response | prompt): token log-probs summed over the response tokens only.

    logits (B, T, V), labels (B, T), mask (B, T) -> (B,). mask is 1 on the response tokens of labels and 0 on
    prompt and padding, so left or right padding both work. The first token of a row is never predicted, which
    is fine: it is always prompt (or padding). With average=True the sum is divided by the number of response
    tokens (a per-token mean, as IPO's paper uses); DPO's eq. 7 uses the sum, our default.
    """
    logp, m = _shifted_token_logprobs(logits, labels, mask)  # (B, T-1), (B, T-1)
    total = (logp * m).sum(-1)  # (B,)
    if average:
        return total / m.sum(-1).clamp(min=1)
    return total


def ranking_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Bradley-Terry pairwise ranking loss for the student reward model (Ouyang et al. 2022, eq. 1).

        loss = -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2

    r_chosen, r_rejected (B,) scores; margin m a float or (B,) tensor (e.g. the teacher's score gap): the
    chosen score must beat the rejected one by at least m before the loss stops pushing. The centering term
    keeps the scores near zero, since the pairwise term only sees differences and lets them drift.
    Returns losses (B,) and detached metrics: accuracy (share of pairs ranked right) and mean margin.
    """
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    diff = r_chosen - r_rejected  # (B,)
    losses = -F.logsigmoid(diff - margin)
    if center_coef > 0:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    d = diff.detach().float()
    metrics = {"accuracy": (d > 0).float().mean(), "margin": d.mean()}
    return losses, metrics


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    """Direct Preference Optimization loss for the policy, from (B,) summed sequence log-probs.

    With the log-ratio difference h = (pi_c - ref_c) - (pi_r - ref_r):

        sigmoid (Rafailov et al. 2023, eq. 7):  -log sigmoid(beta * h)
          with label smoothing eps, conservative DPO (Mitchell 2023), for labels that are wrong with
          probability eps:  -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
        ipo (Azar et al. 2023, eq. 17):  (h - 1 / (2 beta))^2

    At h = 0, i.e. policy == reference, the sigmoid loss is log 2 and the IPO loss 1 / (4 beta^2): a cheap
    check that the reference is really there. Returns losses (B,) and detached metrics on the implicit rewards
    beta * (pi - ref) of chosen and rejected.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be one of 'sigmoid', 'ipo', got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, got loss_type {loss_type!r}")

    h_chosen = pi_chosen - ref_chosen  # (B,) log-ratio of the chosen response
    h_rejected = pi_rejected - ref_rejected  # (B,)
    h = h_chosen - h_rejected  # (B,)
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    else:
        # IPO in the sum-of-log-probs form: h is built from summed sequence log-probs. The IPO paper averages
        # log-probs per token; we do not (pass average=True to sequence_logprobs for that).
        losses = (h - 1 / (2 * beta)) ** 2

    r_c = beta * h_chosen.detach().float()  # (B,) implicit rewards
    r_r = beta * h_rejected.detach().float()  # (B,)
    metrics = {
        "rewards_chosen": r_c.mean(),
        "rewards_rejected": r_r.mean(),
        "reward_accuracy": (r_c > r_r).float().mean(),
        "reward_margin": (r_c - r_r).mean(),
    }
    return losses, metrics


def sft_loss_from_logprobs(token_logps, mask):
    """Mean negative log-likelihood per masked token over the whole batch: token_logps, mask (B, N) -> ()."""
    m = mask.to(token_logps.dtype)
    return -(token_logps * m).sum() / m.sum().clamp(min=1)


def sft_loss(logits, labels, mask):
    """Supervised fine-tuning loss: the mean NLL per response token, pooled over the batch, not per row.

    logits (B, T, V), labels (B, T), mask (B, T) with the shift of `sequence_logprobs` -> scalar. Every
    response token weighs the same, so long responses count for more than short ones.
    """
    return sft_loss_from_logprobs(*_shifted_token_logprobs(logits, labels, mask))
