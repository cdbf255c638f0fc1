"""
Sampling from a causal LM: a small pipeline on the last position's logits, and a batched loop with
a KV cache. `sample_token` turns logits into next tokens (temperature 0: argmax; else temperature,
top-k, top-p, one draw). `generate` left-pads many prompts to one length and fills the KV cache in
one prefill, a row per prompt; its K samples then decode in that row as K branches that all read
the prompt's keys and values (model.visible), a token a step. A sample that stops leaves: the next
steps compute only the running ones, and now and then the cache drops the stopped ones' slots, and
the rows whose samples all stopped.

Shapes: P prompts, K samples per prompt, N = P * K samples, V vocab; the decoding grid is
(rows, columns): a row per prompt still running, a column per sample.
"""
import torch

from model import KVCache


# ---- The pipeline: logits of the last position -> the next token ---------------------------------

NUCLEUS_TRIES = 3  # top-p draws from the full distribution before a row falls back to a sort


def random_numbers(top_p):
    """Random numbers a row's draw takes: one, or with top-p one per try, one for the fallback."""
    return 1 if top_p is None or top_p >= 1 else NUCLEUS_TRIES + 1


def sample_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None, u=None):
    """logits (B, V) -> next token ids (B,). Temperature 0 is argmax; else temperature, top-k, top-p
    (the smallest set of most probable tokens reaching top_p of the mass; Holtzman et al. 2020),
    a draw. u: its random numbers in (0, 1], (B, random_numbers(top_p)); None: from generator."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1)      # (B, V)
    if u is None:
        u = 1.0 - torch.rand(len(probs), random_numbers(top_p), generator=generator,
                             device=probs.device)
    u = u.to(cdf)
    tok = draw(cdf, u[:, 0])    # (B,)
    if top_p is None or top_p >= 1:
        return tok
    return nucleus(probs, cdf, tok, u, top_p)


def draw(cdf, u):
    """Inverse-CDF draw, (B,): the first token whose cumulative probability reaches u * total; u in
    (0, 1] never draws probability 0. One random number a row (torch.multinomial: one per token)."""
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(-1)


def in_nucleus(probs, tok, top_p):
    """Whether each row's token (B,) is in its top-p nucleus: the tokens ranked before it (more
    probable, or as probable with a lower id, as a stable sort) hold less than top_p of the mass."""
    p = probs.gather(-1, tok[:, None])  # (B, 1)
    ids = torch.arange(probs.shape[-1], device=probs.device)
    before = (probs > p) | ((probs == p) & (ids < tok[:, None]))  # (B, V)
    return torch.where(before, probs, 0.0).sum(-1) < top_p  # (B,)


def nucleus(probs, cdf, tok, u, top_p):
    """Top-p by rejection, with no sort of every row's vocabulary each step: a draw from the full
    distribution, kept if in the nucleus (with probability >= top_p), follows the nucleus exactly.
    Rows rejected NUCLEUS_TRIES times draw from the sorted nucleus with their last random number."""
    tok, todo = tok.clone(), ~in_nucleus(probs, tok, top_p)  # (B,), (B,)
    for r in range(1, NUCLEUS_TRIES):
        rows = todo.nonzero().squeeze(-1)
        if len(rows) == 0:
            return tok
        t = draw(cdf[rows], u[rows, r])
        ok = in_nucleus(probs[rows], t, top_p)
        tok[rows[ok]] = t[ok]
        todo[rows[ok]] = False
    rows = todo.nonzero().squeeze(-1)
    if len(rows):
        p, order = probs[rows].sort(dim=-1, descending=True, stable=True)  # (R, V)
        c = p.cumsum(-1)
        kept = (c - p < top_p) & (p > 0)  # the mass before a token is below top_p
        tok[rows] = order.gather(-1, draw((p * kept).cumsum(-1), u[rows, -1])[:, None]).squeeze(-1)
    return tok


def _check_sampling(prompts, max_new_tokens, temperature, top_k, top_p, num_samples, max_positions):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts "
                         "(lists of token ids)")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError("max_new_tokens and num_samples must be >= 1, "
                         f"got {max_new_tokens} and {num_samples}")
    if (temperature < 0 or (top_k is not None and top_k < 1)
            or (top_p is not None and not 0 < top_p <= 1)):
        raise ValueError("need temperature >= 0, top_k >= 1, 0 < top_p <= 1; "
                         f"got {temperature}, {top_k}, {top_p}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_positions:
        raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds "
                         f"the model's context of {max_positions} positions")


# ---- The loop: prefill once, then one token per step for every row still running ---------------

@torch.no_grad()
def generate(lm, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             eos_token_id=None, generator=None, num_samples=1):
    """Sample continuations of many prompts (lists of token ids, any lengths) in one batch.

    Returns each sample's new token ids (P * K lists, prompt i's at i*K .. i*K+K-1), ending with its
    stop token if it stopped on one (else it was truncated at max_new_tokens). eos_token_id: an id,
    a list of ids (e.g. lm.config.stop_token_ids) or None (never stop). generator: one
    torch.Generator for the batch, or one CPU generator per prompt, drawn from up front: a prompt's
    samples then depend neither on its batch (or process) nor on when the samples beside it stop."""
    cfg = lm.config
    _check_sampling(prompts, max_new_tokens, temperature, top_k, top_p, num_samples,
                    cfg.max_positions)
    per_prompt = isinstance(generator, (list, tuple))
    if per_prompt and len(generator) != len(prompts):
        raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts; "
                         "give one per prompt")
    stops = torch.tensor([] if eos_token_id is None else eos_token_id,
                         dtype=torch.long).reshape(-1)  # (n_stops,)
    device = next(lm.parameters()).device
    P, K = len(prompts), num_samples
    # Left-pad the prompts to one length: the prefill, a row per prompt ending in its last slot.
    Tp = max(len(p) for p in prompts)
    ids = torch.zeros(P, Tp, dtype=torch.long)
    mask = torch.zeros(P, Tp, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.tensor(p)
        mask[i, Tp - len(p):] = 1
    ids, mask, stops = ids.to(device), mask.to(device), stops.to(device)
    # A prompt's row then holds its K samples as branches 1..K: each step adds one slot per sample.
    cache = KVCache(cfg, P, Tp + (max_new_tokens - 1) * K, device, next(lm.parameters()).dtype)
    logits = lm(ids, mask, select="last", cache=cache)  # (P, V): the output layer on the last slot
    # (rows, columns): the sample each cell decodes, -1: none
    grid = torch.arange(P * K, device=device).view(P, K)
    logits = logits.repeat_interleave(K, 0)  # (N, V): the K samples of a prompt start alike
    tokens = torch.zeros(P * K, max_new_tokens, dtype=torch.long, device=device)
    length = torch.zeros(P * K, dtype=torch.long, device=device)  # new tokens kept per sample
    done = torch.zeros(P * K, dtype=torch.bool, device=device)
    u = None
    if per_prompt and temperature > 0:  # (N, max_new_tokens, n): row i*K+k is sample k of prompt i
        n = random_numbers(top_p)
        u = 1.0 - torch.cat([torch.rand(K, max_new_tokens, n, generator=g)
                             for g in generator]).to(device)
    live = torch.ones(P, K, dtype=torch.bool, device=device)  # (rows, columns): cells decoding
    for t in range(max_new_tokens):
        running = grid[live]  # (n,): the samples decoding, in cell order
        nxt = sample_token(logits, temperature, top_k, top_p, generator,
                           None if u is None else u[running, t])  # (n,)
        tokens[running, t] = nxt
        length[running] += 1
        done[running] = torch.isin(nxt, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        live = live & ~done[grid.clamp(min=0)]
        rows, columns = int(live.any(1).sum()), int(live.sum(1).max())
        if 4 * rows * columns <= 3 * live.numel():  # a quarter of the cells would go: drop them
            grid, live = _compact(cache, grid, live, max_new_tokens - 1 - t)
        step = torch.zeros_like(grid)
        step[live] = tokens[grid[live], t]
        branch = torch.arange(1, grid.shape[1] + 1, device=device).expand_as(grid)
        logits = lm(step, live.long(), select=live, cache=cache, branch=branch)  # (n', V)
    length = length.tolist()
    return [tokens[i, :length[i]].tolist() for i in range(P * K)]


def _compact(cache, grid, live, steps):
    """Drop the rows whose samples all stopped (prompt too), and in the others the stopped samples'
    cells and slots; live ones move left, in order. steps: decoding steps left (a slot a column)."""
    rows = live.any(1).nonzero().squeeze(1)                  # (P',)
    grid, live = grid[rows], live[rows]
    col = live.long().cumsum(1) - 1                          # (P', G): each live cell's new column
    G = int(live.sum(1).max())
    new_branch = torch.where(live, col + 1, -1)              # old branch c+1 -> new, -1: dropped
    cache.keep(rows, torch.cat([torch.zeros_like(rows)[:, None], new_branch], 1), steps * G)
    new_grid = torch.full((len(rows), G), -1, dtype=grid.dtype, device=grid.device)
    new_grid[live.nonzero()[:, 0], col[live]] = grid[live]
    return new_grid, new_grid >= 0
