"""
One plain training loop, and the three ways TS-Align uses it.

  train_reward  the student (or a teacher) learns to rank with the pairwise loss
  train_dpo     the policy learns from the same pairs with DPO; the reference log-probs are
                computed once, before the first update, in a no-grad pass (no reference model kept)
  train_sft     a causal LM imitates responses (how the default world builds its base policy)

The loop (`train`): AdamW, linear warm-up then a cosine or constant learning rate, gradient
clipping and accumulation, a tqdm bar, a guard against a non-finite update, and a safe point per
micro-batch where a Ctrl-C stops the run; it returns the final epoch's mean metrics. Under torchrun
it is data-parallel: W processes take the very steps one would (the lines marked `# torchrun`).
All on token ids (data.py). Shapes: B batch, T time, C model dim, V vocab, N response positions.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import data
import losses
from model import shares_prefix
# torchrun (parallel.py): in one process world_size() is 1, rank() 0, and the rest does nothing
from parallel import (gathered, is_main, rank, sharded, spread, stop_if, stop_votes, sum_over_ranks,
                      world_size)


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
            raise ValueError(f"need 0 <= warmup < 1 and schedule cosine|constant; got "
                             f"{self.warmup}, {self.schedule}")


class NonFiniteError(FloatingPointError):
    pass


# ---- The loop ------------------------------------------------------------------------------------

def lr_factor(step, total, warmup_steps, schedule):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, tc):
    """AdamW, fused: one kernel per step for all parameters instead of a loop over the tensors (as
    Hugging Face's Trainer does by default since torch 2.8)."""
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)


def train(model, n_examples, loss_fn, tc):
    """Minimise loss_fn(net, indices) -> (mean loss over those examples, dict of float metrics);
    net: the model, or its DDP wrapper under torchrun. -> the final epoch's mean metrics. A
    non-finite loss or gradient raises NonFiniteError before any update: the weights stay."""
    if n_examples == 0:
        raise ValueError(f"{tc.desc}: nothing to train on")
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    W, R = world_size(), rank()  # torchrun
    # torchrun: DDP hooks an all-reduce of the gradients into backward (our models hold no buffers
    # to re-broadcast); a sharded model reduce-scatters its gradients itself.
    net = DistributedDataParallel(model) if W > 1 and not sharded(model) else model
    opt = make_optimizer(params, tc)
    per_step = tc.batch_size * tc.grad_accum
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = tc.epochs * steps_per_epoch
    warmup_steps = round(tc.warmup * total)
    gen = torch.Generator().manual_seed(tc.seed)  # the same order on every rank
    model.train()
    bar = tqdm(total=total, desc=tc.desc, disable=not (tc.progress and is_main()), leave=False,
               dynamic_ncols=True)
    step = 0
    for epoch in range(tc.epochs):
        order = torch.randperm(n_examples, generator=gen).tolist()
        sums, seen = {}, 0
        for start in range(0, n_examples, per_step):
            chunk = order[start:start + per_step]
            for g in opt.param_groups:
                g["lr"] = tc.lr * lr_factor(step, total, warmup_steps, tc.schedule)
            for mb in range(0, len(chunk), tc.batch_size):
                share = chunk[mb:mb + tc.batch_size][R::W]  # torchrun: this rank's share
                # torchrun: every rank runs as many backward passes, as each ends in an all-reduce:
                # one with no example in this micro-batch runs one with weight 0.
                loss, metrics = loss_fn(net, share or chunk[mb:mb + 1])
                # a safe point (parallel.safe_point), in the all-reduce of the finite check
                votes = [float(not torch.isfinite(loss)), *stop_votes()]
                bad, *votes = sum_over_ranks(votes, device)  # torchrun
                stop_if(votes)
                if bad:
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteError(f"{tc.desc}: loss is not finite at step {step} (here "
                                         f"{loss.item()}); the update was not applied and the "
                                         f"weights are as they were before it")
                # Each example weighs the same in the step; DDP averages over the W ranks (* W).
                (loss * (len(share) * W / len(chunk))).backward()
                metrics = {"loss": loss.item(), **metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(share)
                seen += len(share)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)  # on every rank
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if not torch.isfinite(grad_norm):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"{tc.desc}: gradient norm is {grad_norm.item()} at step "
                                     f"{step}; the update was not applied and the weights are as "
                                     f"they were before it")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / max(1, seen):.4f}", epoch=epoch + 1,
                            refresh=False)
    bar.close()
    model.eval()
    keys = sorted(sums)
    totals = sum_over_ranks([sums[k] for k in keys] + [seen], device)  # torchrun
    return {**{k: v / totals[-1] for k, v in zip(keys, totals)}, "param_bytes": nbytes(params),
            "optimizer_bytes": nbytes(v for s in opt.state.values() for v in s.values())}


def nbytes(tensors):
    """The bytes of the tensors this process holds (under --fsdp, its shards)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local)


# ---- Log-probs of responses, with the output layer only where it is needed -----------------------

def response_logprobs(lm, batch, average=False):
    """log p(response | prompt) of each row of data.policy_batch, (R,) float32, summed (average: the
    mean) over its response tokens, and their number (R,). The output layer runs only at the N
    positions predicting one. lm: a CausalLM or its DDP wrapper (called, so that it all-reduces)."""
    logits = lm(batch["input_ids"], batch["attention_mask"], select=batch["predict"],
                branch=batch.get("branch"))                                         # (N, V)
    logp = losses.token_logprobs(logits, batch["target"])                           # (N,)
    n = batch["n_tokens"]
    total = torch.zeros(len(n), device=logp.device, dtype=logp.dtype)
    total = total.index_add(0, batch["row"], logp)                                  # (R,)
    return (total / n.clamp(min=1) if average else total), n


def _device(model):
    return next(model.parameters()).device


def _pair_batch(pairs, pad_id, device, share=True):
    """Id triples as one batch: chosen rows, then rejected (2B); share: a pair's prompt once."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    groups = list(range(len(pairs))) * 2 if share else None
    batch = data.policy_batch(prompts, responses, pad_id, groups=groups)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _pair_logprobs(lm, pad_id, average, pairs):
    lm.eval()
    logp, _ = response_logprobs(lm, _pair_batch(pairs, pad_id, _device(lm), shares_prefix(lm)),
                                average)
    n = len(pairs)
    return list(zip(logp[:n].tolist(), logp[n:].tolist()))  # (chosen, rejected) per pair


def reference_logprobs(lm, pairs, pad_id, batch_size=16, average=False):
    """Log-probs of the chosen and rejected responses of (prompt_ids, chosen_ids, rejected_ids)
    triples under lm, each (P,) on the CPU, in a no-grad pass."""
    with gathered(lm):  # torchrun: blocks of pairs shared out
        out = spread(partial(_pair_logprobs, lm, pad_id, average), pairs, block=batch_size)
    return torch.tensor([c for c, _ in out]), torch.tensor([r for _, r in out])


# ---- The three trainers --------------------------------------------------------------------------

def train_dpo(lm, pairs, pad_id, tc, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
              sft_coef=0.0, average=False, reference=None, rdpo_alpha=0.0):
    """DPO (Rafailov et al. 2023, eq. 7) on (prompt, chosen, rejected) triples of the policy's own
    ids; log-probs summed over the response tokens, or averaged (IPO's form). reference: precomputed
    (ref_chosen, ref_rejected) log-probs, or None for lm as it is now (the round-start policy).
    sft_coef > 0 adds losses.sft_loss of the chosen; rdpo_alpha > 0 is R-DPO's length term."""
    own_reference = reference is None
    share = shares_prefix(lm)
    if own_reference:
        reference = reference_logprobs(lm, pairs, pad_id, 2 * tc.batch_size, average)
    ref_c, ref_r = reference
    device = _device(lm)
    ref_c, ref_r = ref_c.to(device), ref_r.to(device)
    first = {}

    def loss_fn(net, idx):
        batch = _pair_batch([pairs[i] for i in idx], pad_id, device, share)
        logp, n_tok = response_logprobs(net, batch, average)
        B = len(idx)
        pi_c, pi_r = logp[:B], logp[B:]
        idx_t = torch.tensor(idx, device=device)
        dpo, m = losses.dpo_loss(pi_c, pi_r, ref_c[idx_t], ref_r[idx_t], beta, loss_type,
                                 label_smoothing, rdpo_alpha, n_tok[:B].float(), n_tok[B:].float())
        loss = dpo.mean()
        metrics = {"dpo_loss": loss.item(), **{k: float(v) for k, v in m.items()}}
        if sft_coef > 0:
            sft = losses.sft_loss(pi_c * n_tok[:B] if average else pi_c, n_tok[:B])
            loss = loss + sft_coef * sft
            metrics["sft_loss"] = sft.item()
        if not first:  # at step 0 the policy is its own reference: loss log 2, reward margin 0
            first.update(dpo_first_loss=metrics["dpo_loss"], first_margin=metrics["reward_margin"])
            if own_reference and abs(metrics["reward_margin"]) > 1e-3:
                raise RuntimeError(f"DPO reference check failed: implicit reward margin "
                                   f"{metrics['reward_margin']:.2e} at step 0, where the policy "
                                   f"equals its reference and it must be 0")
        return loss, metrics

    metrics = train(lm, len(pairs), loss_fn, tc)
    return {**metrics, **first}


def train_reward(rm, pairs, pad_id, tc, margin=0.0):
    """The ranking loss (losses.ranking_loss) on (chosen_ids, rejected_ids) pairs already formatted
    for this reward model (data.reward_ids); a pair's rows packed, its prompt computed once."""
    device, share = _device(rm), shares_prefix(rm)

    def loss_fn(net, idx):
        rows = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
        groups = list(range(len(idx))) * 2 if share else None  # a pair's rows packed together
        r = rewards(net, rows, pad_id, groups, device)  # (2B,)
        loss, m = losses.ranking_loss(r[:len(idx)], r[len(idx):], margin)
        return loss.mean(), {k: float(v) for k, v in m.items()}

    return train(rm, len(pairs), loss_fn, tc)


def train_sft(lm, examples, pad_id, tc):
    """Supervised fine-tuning (losses.sft_loss) on (prompt_ids, response_ids) examples."""
    device = _device(lm)

    def loss_fn(net, idx):
        batch = data.policy_batch([examples[i][0] for i in idx], [examples[i][1] for i in idx],
                                  pad_id)
        logp, n_tok = response_logprobs(net, {k: v.to(device) for k, v in batch.items()})
        return losses.sft_loss(logp, n_tok), {}

    return train(lm, len(examples), loss_fn, tc)


@torch.no_grad()
def reward_scores(rm, rows, pad_id, batch_size=64, groups=None):
    """Scores of many tokenised rows, (N,) on the CPU, in batches of about batch_size rows taken by
    length (little padding). groups: a key per row (e.g. its prompt); rows with equal keys share
    their common prefix (data.pack), unless rm reads whole rows (an encoder)."""
    rm.eval()
    share = shares_prefix(rm)
    members = {}
    for i, key in enumerate(groups if groups is not None and share else range(len(rows))):
        members.setdefault(key, []).append(i)
    units = sorted(members.values(), key=lambda u: _packed_length([rows[i] for i in u]))
    out, device = torch.zeros(len(rows)), _device(rm)
    start = 0
    while start < len(units):  # whole groups, until the next would pass batch_size rows
        end = start + 1
        while end < len(units) and sum(map(len, units[start:end + 1])) <= batch_size:
            end += 1
        idx = [i for u in units[start:end] for i in u]
        keys = [j for j, u in enumerate(units[start:end]) for _ in u] if share else None
        out[idx] = rewards(rm, [rows[i] for i in idx], pad_id, keys, device).float().cpu()
        start = end
    return out


def rewards(rm, rows, pad_id, groups, device):
    """A reward model's score of each row, (R,): rows with equal groups keys packed to compute
    their common prefix once (data.pack), or with groups None each padded alone (data.pad)."""
    if groups is None:
        ids, mask = data.pad(rows, pad_id)
        return rm(ids.to(device), mask.to(device))
    b = data.pack(rows, pad_id, groups)
    return rm(b["input_ids"].to(device), b["attention_mask"].to(device),
              branch=b["branch"].to(device), select=data.last_index(b, rows).to(device))


def _packed_length(rows):
    return sum(map(len, rows)) - (len(rows) - 1) * data.common_prefix(rows)
