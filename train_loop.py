"""
One plain training loop, and the three ways TS-Align uses it.

  train_reward  the student (or a teacher) learns to rank with the pairwise loss: its score of the
                chosen response should beat that of the rejected one
  train_dpo     the policy learns from the same pairs with DPO; the reference log-probs are computed
                once, before the first update, in a no-grad pass, so no reference model stays in memory
  train_sft     a causal LM imitates responses (how the default world builds its base policy)

The loop itself (`train`) is AdamW, linear warm-up then cosine or constant learning rate, gradient
clipping and accumulation, a tqdm bar, and a guard that refuses to apply a non-finite update. Each
function returns the mean of its metrics over the final epoch.

Everything here works on token ids: turning text into ids, and ids into padded batches, is data.py's job.
Shapes: B batch, T time, C model dim, V vocab, N response positions in a batch.
"""
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import data
import losses


@dataclass
class TrainConfig:
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 8           # examples (or pairs) per micro-batch
    grad_accum: int = 1           # micro-batches per optimizer step
    warmup: float = 0.1           # share of the steps with a linear warm-up
    schedule: str = "cosine"      # cosine (to zero) or constant, after the warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0                 # shuffling order
    desc: str = "train"           # progress-bar label
    progress: bool = True

    def __post_init__(self):
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"need lr > 0 and epochs, batch_size, grad_accum >= 1; got {self}")
        if not 0 <= self.warmup < 1 or self.schedule not in ("cosine", "constant"):
            raise ValueError(f"need 0 <= warmup < 1 and schedule cosine|constant; got {self.warmup}, {self.schedule}")


class NonFiniteError(FloatingPointError):
    pass


# -----------------------------------------------------------------------------
# The loop

def lr_factor(step, total, warmup_steps, schedule):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(model, n_examples, loss_fn, tc):
    """Minimise loss_fn over n_examples examples.

    loss_fn(indices) -> (mean loss over those examples, dict of float metrics). Returns the metrics and
    the loss averaged over the final epoch (weighted by examples). A non-finite loss or gradient raises
    NonFiniteError before the optimizer touches anything, so the weights stay as they were."""
    if n_examples == 0:
        raise ValueError(f"{tc.desc}: nothing to train on")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    per_step = tc.batch_size * tc.grad_accum
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = tc.epochs * steps_per_epoch
    warmup_steps = round(tc.warmup * total)
    gen = torch.Generator().manual_seed(tc.seed)
    model.train()
    bar = tqdm(total=total, desc=tc.desc, disable=not tc.progress, leave=False, dynamic_ncols=True)
    step = 0
    for epoch in range(tc.epochs):
        order = torch.randperm(n_examples, generator=gen).tolist()
        sums, seen = {}, 0
        for start in range(0, n_examples, per_step):
            chunk = order[start:start + per_step]
            for g in opt.param_groups:
                g["lr"] = tc.lr * lr_factor(step, total, warmup_steps, tc.schedule)
            for mb in range(0, len(chunk), tc.batch_size):
                idx = chunk[mb:mb + tc.batch_size]
                loss, metrics = loss_fn(idx)
                if not torch.isfinite(loss):
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteError(f"{tc.desc}: loss is {loss.item()} at step {step}; the update was not "
                                         f"applied and the weights are as they were before it")
                (loss * len(idx) / len(chunk)).backward()  # each example weighs the same in the step
                metrics = {"loss": loss.item(), **metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
                seen += len(idx)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            if not torch.isfinite(grad_norm):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"{tc.desc}: gradient norm is {grad_norm.item()} at step {step}; the update "
                                     f"was not applied and the weights are as they were before it")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", epoch=epoch + 1, refresh=False)
    bar.close()
    model.eval()
    return {k: v / seen for k, v in sums.items()}


# -----------------------------------------------------------------------------
# Log-probs of responses, with the output layer only where it is needed

def response_logprobs(lm, batch):
    """Summed log-probs of each row's response tokens, (B,), and their counts, (B,).

    The output layer (C x V, the largest matmul of a small model) runs only on the N positions that
    predict a response token, not on every prompt and padding position."""
    ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    h = lm.hidden_states(ids, mask)               # (B, T, C)
    sel = resp[:, 1:].bool()                      # (B, T-1): position t predicts token t+1
    logits = lm.logits(h[:, :-1][sel])            # (N, V)
    logp = losses.token_logprobs(logits, ids[:, 1:][sel])  # (N,)
    row = torch.arange(len(ids), device=ids.device)[:, None].expand_as(sel)[sel]  # (N,) row of each position
    total = torch.zeros(len(ids), device=ids.device, dtype=logp.dtype).index_add(0, row, logp)  # (B,)
    return total, sel.sum(1)


def _device(model):
    return next(model.parameters()).device


def _pair_batch(pairs, idx, pad_id, device):
    """Chosen rows then rejected rows, one batch: (2B, T) tensors."""
    prompts = [pairs[i][0] for i in idx] * 2
    responses = [pairs[i][1] for i in idx] + [pairs[i][2] for i in idx]
    return {k: v.to(device) for k, v in data.policy_batch(prompts, responses, pad_id).items()}


@torch.no_grad()
def reference_logprobs(lm, pairs, pad_id, batch_size=16):
    """Log-probs of the chosen and rejected responses under lm, each (P,), in one no-grad pass.

    pairs: list of (prompt_ids, chosen_ids, rejected_ids)."""
    lm.eval()
    chosen, rejected = [], []
    for s in range(0, len(pairs), batch_size):
        idx = list(range(s, min(s + batch_size, len(pairs))))
        logp, _ = response_logprobs(lm, _pair_batch(pairs, idx, pad_id, _device(lm)))
        chosen.append(logp[:len(idx)])
        rejected.append(logp[len(idx):])
    return torch.cat(chosen), torch.cat(rejected)


# -----------------------------------------------------------------------------
# The three trainers

def train_dpo(lm, pairs, pad_id, tc, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_coef=0.0,
              reference=None):
    """DPO (Rafailov et al. 2023, eq. 7) on pairs of the policy's own token ids.

    pairs: list of (prompt_ids, chosen_ids, rejected_ids), responses ending in their stop token where they
    stopped. reference: precomputed (ref_chosen, ref_rejected) log-probs, or None to use lm itself as it is
    now (the round-start policy). With sft_coef > 0, adds that times the chosen response's per-token NLL."""
    own_reference = reference is None
    ref_c, ref_r = reference_logprobs(lm, pairs, pad_id, 2 * tc.batch_size) if own_reference else reference
    device = _device(lm)
    ref_c, ref_r = ref_c.to(device), ref_r.to(device)
    first = {}

    def loss_fn(idx):
        logp, n_tok = response_logprobs(lm, _pair_batch(pairs, idx, pad_id, device))
        B = len(idx)
        pi_c, pi_r = logp[:B], logp[B:]
        idx_t = torch.tensor(idx, device=device)
        dpo, m = losses.dpo_loss(pi_c, pi_r, ref_c[idx_t], ref_r[idx_t], beta, loss_type, label_smoothing)
        loss = dpo.mean()
        metrics = {"dpo_loss": loss.item(), **{k: float(v) for k, v in m.items()}}
        if sft_coef > 0:
            sft = -(pi_c / n_tok[:B].clamp(min=1)).mean()
            loss = loss + sft_coef * sft
            metrics["sft_loss"] = sft.item()
        if not first:  # the sanity check of PITFALLS.md: the policy equals its reference at step 0
            first.update(dpo_first_loss=metrics["dpo_loss"], first_margin=metrics["reward_margin"])
            if own_reference and abs(metrics["reward_margin"]) > 1e-3:
                raise RuntimeError(f"DPO reference check failed: implicit reward margin {metrics['reward_margin']:.2e} "
                                   f"at step 0, where the policy equals its reference and it must be 0")
        return loss, metrics

    metrics = train(lm, len(pairs), loss_fn, tc)
    return {**metrics, **first}


def train_reward(rm, pairs, pad_id, tc, margin=0.0, center_coef=0.0):
    """Pairwise ranking loss (Bradley-Terry) on pairs of (chosen_ids, rejected_ids), each already
    formatted and tokenised for this reward model (data.reward_ids)."""
    device = _device(rm)

    def loss_fn(idx):
        rows = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
        ids, mask = data.pad(rows, pad_id)
        r = rm(ids.to(device), mask.to(device))  # (2B,)
        loss, m = losses.ranking_loss(r[:len(idx)], r[len(idx):], margin, center_coef)
        return loss.mean(), {k: float(v) for k, v in m.items()}

    return train(rm, len(pairs), loss_fn, tc)


def train_sft(lm, examples, pad_id, tc):
    """Supervised fine-tuning: mean NLL of the response tokens of (prompt_ids, response_ids) examples."""
    device = _device(lm)

    def loss_fn(idx):
        batch = data.policy_batch([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id)
        logp, n_tok = response_logprobs(lm, {k: v.to(device) for k, v in batch.items()})
        return -logp.sum() / n_tok.sum().clamp(min=1), {}

    return train(lm, len(examples), loss_fn, tc)


@torch.no_grad()
def reward_scores(rm, rows, pad_id, batch_size=64):
    """Scores of many tokenised sequences, (N,) on the CPU, in batches."""
    rm.eval()
    out = []
    for s in range(0, len(rows), batch_size):
        ids, mask = data.pad(rows[s:s + batch_size], pad_id)
        out.append(rm(ids.to(_device(rm)), mask.to(_device(rm))).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
