"""
One plain training loop, and the three ways TS-Align uses it.

  train_reward  the student (or a teacher) learns to rank with the pairwise loss
  train_dpo     the policy learns from the same pairs with DPO; the reference log-probs are computed
                once, before the first update, in a no-grad pass, so no reference model stays in memory
  train_sft     a causal LM imitates responses (how the default world builds its base policy)

The loop (`train`) is AdamW, linear warm-up then a cosine or constant learning rate, gradient clipping and
accumulation, a tqdm bar, a guard that refuses a non-finite update, and a safe point per micro-batch where a
Ctrl-C stops the run; each trainer returns the mean of its metrics over the final epoch. Under torchrun it is data-parallel, and W processes take the very steps
that one would. Everything here works on token ids (data.py makes them).
Shapes: B batch, T time, C model dim, V vocab, N response positions in a batch.
"""
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import data
import losses
from model import shares_prefix


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


# ---- Data parallel: what changes when torchrun starts W processes --------------------------------
# torchrun starts one process per device with its RANK, the WORLD_SIZE and its LOCAL_RANK (its device on the
# machine). Every process holds all the models, and work is split two ways: blocks of a list of work go to
# the ranks in turn and every rank gets every result (`spread`); in training each rank takes its share of
# every batch, DistributedDataParallel all-reduces the gradients, and every rank takes the same step.

def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Only rank 0 prints, shows progress bars and writes files."""
    return rank() == 0


def init_distributed(device, always=False):
    """Join torchrun's process group if started by torchrun with several processes (or with always, even one,
    as FSDP2 needs), and return the device this process uses (cuda:LOCAL_RANK on GPUs). Plain `python` runs
    return device unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not (always and "LOCAL_RANK" in os.environ):
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """Rank 0's obj, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(model):
    """--fsdp: shard the model across the processes with FSDP2 (torch.distributed.fsdp.fully_shard): each
    decoder block, then the rest (embeddings, final norm, output layer, tied or not). Each process then keeps
    1/W of every weight, of its gradient and of its AdamW state; a forward gathers a block's weights just
    before it runs, and training equals one process's, as DDP's does."""
    from torch.distributed.fsdp import fully_shard
    for block in (model.encoder if model.config.encoder else model.decoder).blocks:  # an encoder's (encoder.py) too
        fully_shard(block)
    return fully_shard(model)


def sharded(model):
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2's parameters are DTensors


@contextmanager
def gathered(*models):
    """The full weights of the sharded models on every process while the block runs, and no collective in
    their forwards: so inference may do unequal work per process (spread's blocks), and sampling gathers
    once, not once per token. Memory: each process holds the full weights for that time. Models that are
    not sharded are left as they are."""
    from torch.distributed.fsdp import FSDPModule
    units = [(u, u is m) for m in models if sharded(m) for u in m.modules() if isinstance(u, FSDPModule)]
    for u, _ in units:  # every process calls this at the same point: the gathers are collectives
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u, root in units:
            u.reshard()
            u.set_reshard_after_forward(not root, recurse=False)  # FSDP2's own defaults: the root keeps its


def spread(fn, *columns, block=64, desc=None):
    """fn over blocks of items, shared out among the processes: the one primitive that splits work under
    torchrun (in one process, a plain loop over the blocks).

    columns: lists of equal length n. Cut into blocks of `block` items, process r of W calls
    fn(*columns[s:s + block]) on blocks r, r+W, ..., and fn returns one result per item. Every process gets
    all n results, in order, each computed as one process computes it. Results travel between processes
    as pickles (keep them small, on the CPU). desc: a progress bar over this process's blocks."""
    starts = range(0, len(columns[0]), block)
    ours = [s for j, s in enumerate(starts) if j % world_size() == rank()]
    bar = tqdm(total=len(ours), desc=desc, disable=desc is None or not is_main(), leave=False, dynamic_ncols=True)
    done = {}
    for j in range(math.ceil(len(starts) / world_size())):  # as many turns on every process, each a safe point
        safe_point()
        if j < len(ours):
            done[ours[j]] = fn(*(c[ours[j]:ours[j] + block] for c in columns))
            bar.update()
    bar.close()
    if world_size() > 1:
        parts = [None] * world_size()
        dist.all_gather_object(parts, done)
        done = {s: out for part in parts for s, out in part.items()}
    return [x for s in starts for x in done[s]]


def _sum_over_ranks(values, device):
    """Each of a list of floats summed over the ranks (a collective: every rank must call it)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- Stopping at a safe point: Ctrl-C and SIGTERM -------------------------------------------------
# The signal handler (stop_on_signals) only records the signal in stop_signal; the run stops at the next
# safe point: every training micro-batch and every block of spread's work. So an interrupt is never lost
# (Python drops an exception raised inside a finalizer, a progress bar's for one), and under torchrun every
# process stops at the same point: they agree there in one all-reduce, and none is left in a collective.

stop_signal = None  # signal.SIGINT or signal.SIGTERM, once one arrived


class Stopped(BaseException):
    """A Ctrl-C or SIGTERM acted on. A BaseException, as KeyboardInterrupt is: no `except Exception` takes it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop_votes():  # this process's [Ctrl-C, SIGTERM], to be summed over the ranks
    return [float(stop_signal == signal.SIGINT), float(stop_signal == signal.SIGTERM)]


def _stop_if(votes):
    """Raise Stopped if any process got a signal: its own, or else SIGTERM over Ctrl-C."""
    if votes[0] or votes[1]:
        raise Stopped(stop_signal or (signal.SIGTERM if votes[1] else signal.SIGINT))


def safe_point():
    """Stop here if any process got a signal (a collective under torchrun: every rank must call it)."""
    on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"  # nccl reduces GPU tensors only
    _stop_if(_sum_over_ranks(_stop_votes(), "cuda" if on_gpu else "cpu"))


@contextmanager
def stop_on_signals():
    """While the block runs, Ctrl-C (SIGINT) and SIGTERM (what a job scheduler sends) are recorded, and the run
    stops at its next safe point. A second one, a second or more later, raises Stopped at once; sooner, it is
    the first delivered again (a terminal sends Ctrl-C to every process, and torchrun passes it on too)."""
    global stop_signal
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    first = []

    def record(signum, frame):
        global stop_signal
        if stop_signal is None:
            stop_signal = signum
            first.append(time.monotonic())
        elif time.monotonic() - first[0] > 1:
            raise Stopped(signum)

    stop_signal = None
    before = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        stop_signal = None


# ---- The loop ------------------------------------------------------------------------------------

def lr_factor(step, total, warmup_steps, schedule):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, tc):
    """AdamW, fused: one kernel per step for all parameters, 4x faster than the default per-tensor loop
    for 135M parameters on this CPU (and what Hugging Face's Trainer uses by default since torch 2.8)."""
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)


def train(model, n_examples, loss_fn, tc):
    """Minimise loss_fn over n_examples examples. loss_fn(net, indices) -> (mean loss over those examples,
    dict of float metrics); net: the model, or its DistributedDataParallel wrapper under torchrun. Returns
    the final epoch's mean metrics and loss. A non-finite loss or gradient raises NonFiniteError before the
    optimizer touches anything, so the weights stay as they were."""
    if n_examples == 0:
        raise ValueError(f"{tc.desc}: nothing to train on")
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    W, R = world_size(), rank()
    # DDP's wrapper hooks an all-reduce of the gradients into backward (our models hold no buffers, so it
    # has none to re-broadcast). A sharded model reduce-scatters its gradients itself.
    net = DistributedDataParallel(model) if W > 1 and not sharded(model) else model
    opt = make_optimizer(params, tc)
    per_step = tc.batch_size * tc.grad_accum
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = tc.epochs * steps_per_epoch
    warmup_steps = round(tc.warmup * total)
    gen = torch.Generator().manual_seed(tc.seed)  # the same order on every rank
    model.train()
    bar = tqdm(total=total, desc=tc.desc, disable=not (tc.progress and is_main()), leave=False, dynamic_ncols=True)
    step = 0
    for epoch in range(tc.epochs):
        order = torch.randperm(n_examples, generator=gen).tolist()
        sums, seen = {}, 0
        for start in range(0, n_examples, per_step):
            chunk = order[start:start + per_step]
            for g in opt.param_groups:
                g["lr"] = tc.lr * lr_factor(step, total, warmup_steps, tc.schedule)
            for mb in range(0, len(chunk), tc.batch_size):
                share = chunk[mb:mb + tc.batch_size][R::W]  # this rank's examples of the micro-batch
                # Every rank runs the same number of backward passes, as each ends in an all-reduce: a
                # rank with no example in this micro-batch runs one with weight 0.
                loss, metrics = loss_fn(net, share or chunk[mb:mb + 1])
                bad, *votes = _sum_over_ranks([float(not torch.isfinite(loss)), *_stop_votes()], device)
                _stop_if(votes)  # a safe point (see safe_point), in the collective every micro-batch has anyway
                if bad:
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteError(f"{tc.desc}: loss is not finite at step {step} (here {loss.item()}); the "
                                         f"update was not applied and the weights are as they were before it")
                # Each example weighs the same in the step; DDP averages over the W ranks, hence the * W.
                (loss * (len(share) * W / len(chunk))).backward()
                metrics = {"loss": loss.item(), **metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(share)
                seen += len(share)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)  # the same on every rank
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if not torch.isfinite(grad_norm):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"{tc.desc}: gradient norm is {grad_norm.item()} at step {step}; the update "
                                     f"was not applied and the weights are as they were before it")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / max(1, seen):.4f}", epoch=epoch + 1, refresh=False)
    bar.close()
    model.eval()
    keys = sorted(sums)
    totals = _sum_over_ranks([sums[k] for k in keys] + [seen], device)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (this process's shard)
    nbytes = lambda ts: sum(local(t).numel() * t.element_size() for t in ts if torch.is_tensor(t))  # noqa: E731
    return {**{k: v / totals[-1] for k, v in zip(keys, totals)}, "param_bytes": nbytes(params),
            "optimizer_bytes": nbytes(v for s in opt.state.values() for v in s.values())}


# ---- Log-probs of responses, with the output layer only where it is needed -----------------------

def response_logprobs(lm, batch, average=False):
    """log p(response | prompt) of each row (data.policy_batch), (R,) float32, summed over its response tokens
    (losses.sequence_logprobs' rule) or with average=True their mean, and its number of response tokens, (R,).
    The output layer runs only on the N positions that predict a response token. lm: a CausalLM, or its
    DistributedDataParallel wrapper (which must be called, not bypassed, to all-reduce the gradients)."""
    logits = lm(batch["input_ids"], batch["attention_mask"], select=batch["predict"], branch=batch.get("branch"))  # (N, V)
    logp = losses.token_logprobs(logits, batch["target"])                                                        # (N,)
    n = batch["n_tokens"]
    total = torch.zeros(len(n), device=logp.device, dtype=logp.dtype).index_add(0, batch["row"], logp)          # (R,)
    return (total / n.clamp(min=1) if average else total), n


def _device(model):
    return next(model.parameters()).device


def _pair_batch(pairs, pad_id, device, share=True):
    """Chosen rows then rejected rows of (prompt_ids, chosen_ids, rejected_ids) triples, one batch of 2B rows;
    with share, each pair packed in one row, its prompt computed once for both (data.pack)."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    groups = list(range(len(pairs))) * 2 if share else None
    return {k: v.to(device) for k, v in data.policy_batch(prompts, responses, pad_id, groups=groups).items()}


@torch.no_grad()
def _pair_logprobs(lm, pad_id, average, pairs):
    lm.eval()
    logp, _ = response_logprobs(lm, _pair_batch(pairs, pad_id, _device(lm), shares_prefix(lm)), average)
    return list(zip(logp[:len(pairs)].tolist(), logp[len(pairs):].tolist()))  # (chosen, rejected) per pair


def reference_logprobs(lm, pairs, pad_id, batch_size=16, average=False):
    """Log-probs of the chosen and rejected responses of (prompt_ids, chosen_ids, rejected_ids) triples
    under lm, each (P,) on the CPU, in a no-grad pass."""
    with gathered(lm):
        out = spread(partial(_pair_logprobs, lm, pad_id, average), pairs, block=batch_size)
    return torch.tensor([c for c, _ in out]), torch.tensor([r for _, r in out])


# ---- The three trainers --------------------------------------------------------------------------

def train_dpo(lm, pairs, pad_id, tc, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_coef=0.0,
              average=False, reference=None, rdpo_alpha=0.0):
    """DPO (Rafailov et al. 2023, eq. 7) on (prompt_ids, chosen_ids, rejected_ids) triples of the policy's own
    token ids; log-probs summed over the response tokens, or averaged (average=True, IPO's form). reference:
    precomputed (ref_chosen, ref_rejected) log-probs, or None for lm as it is now (the round-start policy).
    With sft_coef > 0, adds that times losses.sft_loss of the chosen responses; rdpo_alpha > 0 is R-DPO's
    length term, on the responses' token counts."""
    own_reference = reference is None
    share = shares_prefix(lm)
    ref_c, ref_r = reference_logprobs(lm, pairs, pad_id, 2 * tc.batch_size, average) if own_reference else reference
    device = _device(lm)
    ref_c, ref_r = ref_c.to(device), ref_r.to(device)
    first = {}

    def loss_fn(net, idx):
        logp, n_tok = response_logprobs(net, _pair_batch([pairs[i] for i in idx], pad_id, device, share), average)
        B = len(idx)
        pi_c, pi_r = logp[:B], logp[B:]
        idx_t = torch.tensor(idx, device=device)
        dpo, m = losses.dpo_loss(pi_c, pi_r, ref_c[idx_t], ref_r[idx_t], beta, loss_type, label_smoothing,
                                 rdpo_alpha, n_tok[:B].float(), n_tok[B:].float())
        loss = dpo.mean()
        metrics = {"dpo_loss": loss.item(), **{k: float(v) for k, v in m.items()}}
        if sft_coef > 0:
            sft = losses.sft_loss(pi_c * n_tok[:B] if average else pi_c, n_tok[:B])
            loss = loss + sft_coef * sft
            metrics["sft_loss"] = sft.item()
        if not first:  # at step 0 the policy is its own reference: loss log 2, implicit reward margin 0
            first.update(dpo_first_loss=metrics["dpo_loss"], first_margin=metrics["reward_margin"])
            if own_reference and abs(metrics["reward_margin"]) > 1e-3:
                raise RuntimeError(f"DPO reference check failed: implicit reward margin {metrics['reward_margin']:.2e} "
                                   f"at step 0, where the policy equals its reference and it must be 0")
        return loss, metrics

    metrics = train(lm, len(pairs), loss_fn, tc)
    return {**metrics, **first}


def train_reward(rm, pairs, pad_id, tc, margin=0.0):
    """The pairwise ranking loss (losses.ranking_loss) on pairs of (chosen_ids, rejected_ids), each
    already formatted and tokenised for this reward model (data.reward_ids); the two rows of a pair packed
    together, so their prompt is computed once (data.pack)."""
    device = _device(rm)
    share = shares_prefix(rm)

    def loss_fn(net, idx):
        rows = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
        if share:
            b = data.pack(rows, pad_id, list(range(len(idx))) * 2)
            r = net(b["input_ids"].to(device), b["attention_mask"].to(device), branch=b["branch"].to(device),
                    select=data.last_index(b, rows).to(device))  # (2B,)
        else:
            ids, mask = data.pad(rows, pad_id)
            r = net(ids.to(device), mask.to(device))  # (2B,)
        loss, m = losses.ranking_loss(r[:len(idx)], r[len(idx):], margin)
        return loss.mean(), {k: float(v) for k, v in m.items()}

    return train(rm, len(pairs), loss_fn, tc)


def train_sft(lm, examples, pad_id, tc):
    """Supervised fine-tuning (losses.sft_loss) on the response tokens of (prompt_ids, response_ids) examples."""
    device = _device(lm)

    def loss_fn(net, idx):
        batch = data.policy_batch([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id)
        logp, n_tok = response_logprobs(net, {k: v.to(device) for k, v in batch.items()})
        return losses.sft_loss(logp, n_tok), {}

    return train(lm, len(examples), loss_fn, tc)


@torch.no_grad()
def reward_scores(rm, rows, pad_id, batch_size=64, groups=None):
    """Scores of many tokenised sequences, (N,) on the CPU, in batches of about batch_size rows, taken by
    length so that padding stays small. groups: a key per row (e.g. its prompt); rows with equal keys are
    packed to compute their common prefix once (data.pack), unless rm reads whole rows (an encoder)."""
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
        part = [rows[i] for i in idx]
        if share:
            b = data.pack(part, pad_id, [j for j, u in enumerate(units[start:end]) for _ in u])
            r = rm(b["input_ids"].to(device), b["attention_mask"].to(device), branch=b["branch"].to(device),
                   select=data.last_index(b, part).to(device))
        else:
            ids, mask = data.pad(part, pad_id)
            r = rm(ids.to(device), mask.to(device))
        out[idx] = r.float().cpu()
        start = end
    return out


def _packed_length(rows):
    return sum(map(len, rows)) - (len(rows) - 1) * data.common_prefix(rows)
