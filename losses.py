"""The losses of TS-Align, as pure functions on tensors, one learning signal per model that learns:

- The student reward model learns to rank: given the teacher's (chosen, rejected), a
  Bradley-Terry pairwise loss pushes the chosen one's score up (`ranking_loss`).
- The policy learns from the same pairs with DPO: it raises the log-probability of the chosen
  response relative to a frozen reference (the policy at the start of the round) and lowers that
  of the rejected one (`dpo_loss`, fed by `sequence_logprobs`). `sft_loss` builds the default
  world's base policy, and is an optional extra term of DPO.

Only torch is imported. Pairwise losses come back unreduced, (B,), with detached diagnostics.

Shapes: B batch (pairs, or sequences), T time, V vocab, N selected positions.
"""

import torch
import torch.nn.functional as F


def token_logprobs(logits, labels):
    """log p(labels) under softmax(logits), position by position, no shift: (..., V), (...) ->
    (...) float32. The log-softmax is float32, so bf16 logits keep log-probs' small differences."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)


def sequence_logprobs(logits, labels, mask, average=False):
    """log p(response | prompt) of each row, (B,) float32, from its response positions' logits.

    labels (B, T) token ids; mask (B, T), 1 exactly on the response tokens (left or right padding);
    logits (N, V) at the N positions that predict a response token, row-major: position t predicts
    labels[:, t + 1] (from full logits, `logits[:, :-1][mask[:, 1:].bool()]`: training computes the
    output layer, a small model's largest matmul, only there). Summed over the response tokens
    (DPO's eq. 7, our default), or with average=True their per-token mean, as the IPO paper (Azar
    et al. 2023) and TRL's IPO loss use."""
    sel = mask[:, 1:].bool()  # (B, T-1): does position t predict a response token?
    logp = token_logprobs(logits, labels[:, 1:][sel])  # (N,)
    row = torch.arange(len(labels), device=labels.device)[:, None].expand_as(sel)[sel]  # (N,)
    total = torch.zeros(len(labels), device=logp.device, dtype=logp.dtype).index_add(0, row, logp)
    return total / sel.sum(1).clamp(min=1) if average else total  # (B,)


def ranking_loss(r_chosen, r_rejected, margin=0.0):
    """Pairwise ranking loss for the student reward model: Bradley-Terry (Ouyang et al. 2022,
    eq. 1), with the margin of a margin ranking loss (the loss the paper names for its student):

        loss = -log sigmoid(r_c - r_r - m)

    r_chosen, r_rejected (B,) scores; margin m >= 0 (`--student-margin`; 0: plain Bradley-Terry):
    the chosen must beat the rejected by about m before the loss stops pushing. Returns losses (B,)
    and detached metrics: accuracy (share of pairs ranked right) and mean margin."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    diff = r_chosen - r_rejected  # (B,)
    losses = -F.logsigmoid(diff - margin)
    d = diff.detach().float()
    metrics = {"accuracy": (d > 0).float().mean(), "margin": d.mean()}
    return losses, metrics


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0, rdpo_alpha=0.0, len_chosen=None, len_rejected=None):
    """Direct Preference Optimization loss for the policy, from (B,) summed sequence log-probs.

    With the log-ratio difference h = (pi_c - ref_c) - (pi_r - ref_r):

        sigmoid (Rafailov et al. 2023, eq. 7):  -log sigmoid(beta * h)
          with label smoothing eps, conservative DPO (Mitchell 2023), for labels that are wrong
          with probability eps:  -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
        ipo (Azar et al. 2023, eq. 17):  (h - 1 / (2 beta))^2
        R-DPO (Park et al. 2024, "Disentangling Length from Quality in DPO"), with rdpo_alpha > 0
          and the responses' token counts (B,):
          the sigmoid's argument beta * h becomes  beta * h + alpha (|y_c| - |y_r|),
          from a length-regularised reward r - alpha |y|: a preference that the chosen response's
          extra length already explains is not learned again, so length is not what it learns.

    At h = 0 (policy == reference), a cheap check that the reference is there, the sigmoid loss is
    log 2 (R-DPO's -log sigmoid(alpha (|y_c| - |y_r|))) and the IPO loss 1 / (4 beta^2). Returns
    losses (B,) and detached metrics on the implicit rewards beta * (pi - ref) of both responses."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be one of 'sigmoid', 'ipo', got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError("label_smoothing applies to loss_type 'sigmoid' only, "
                         f"got loss_type {loss_type!r}")
    if rdpo_alpha < 0 or (rdpo_alpha > 0 and (loss_type != "sigmoid" or len_chosen is None
                                              or len_rejected is None)):
        raise ValueError("rdpo_alpha must be >= 0, and > 0 needs loss_type 'sigmoid' and both "
                         f"lengths; got {rdpo_alpha}, {loss_type!r}")

    h_chosen = pi_chosen - ref_chosen  # (B,) log-ratio of the chosen response
    h_rejected = pi_rejected - ref_rejected  # (B,)
    h = h_chosen - h_rejected  # (B,)
    if loss_type == "sigmoid":
        eps = label_smoothing
        if rdpo_alpha == 0:
            z = beta * h  # (B,)
        else:
            z = beta * h + rdpo_alpha * (len_chosen - len_rejected)  # (B,) R-DPO
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    else:
        # With summed log-probs by default; the IPO paper averages them per token
        # (sequence_logprobs' average=True, `--average-logprobs`).
        losses = (h - 1 / (2 * beta)) ** 2

    r_c = beta * h_chosen.detach().float()  # (B,) implicit rewards
    r_r = beta * h_rejected.detach().float()  # (B,)
    metrics = {"rewards_chosen": r_c.mean(), "rewards_rejected": r_r.mean(),
               "reward_accuracy": (r_c > r_r).float().mean(), "reward_margin": (r_c - r_r).mean()}
    return losses, metrics


def sft_loss(logps, n_tokens):
    """Supervised fine-tuning: the mean negative log-likelihood per response token over the batch
    (each token weighs the same), from summed log-probs (B,) and token counts (B,) -> scalar."""
    return -logps.sum() / n_tokens.sum().clamp(min=1)
