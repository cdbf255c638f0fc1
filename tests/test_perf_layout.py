"""The fast paths give the same answers as the plain ones, and never use stale weights.

Linear fuses projections (q, k and v in one matrix; gate and up in another) with one LoRA adapter per part,
the K samples of a prompt share its keys and values in the KV cache, and sample_token draws by inverse CDF;
each is checked against the textbook form. Sampling must see every
weight change (an optimizer step, an in-place edit through .data, load_state_dict, a LoRA merge): after
each, greedy decoding equals a fresh uncached forward.
"""
import pytest
import torch
import torch.nn.functional as F

import checkpoint as C
import generate as G
import model as M
from conftest import VOCAB, hf_load, make_checkpoint, uncached_greedy

PROMPTS = [[5, 9, 14, 3, 77], [8, 8, 101, 42, 6, 19, 23, 4, 11], [60]]  # mixed lengths: left padding in the batch


# -----------------------------------------------------------------------------
# Linear: a fused projection with one adapter per part equals separate projections with their own

def test_fused_linear_with_adapters_equals_one_per_projection():
    torch.manual_seed(0)
    parts = (12, 4, 4)  # q, k, v
    lin = M.Linear(16, sum(parts), parts=parts)
    lin.lora_a = torch.nn.ParameterList(torch.randn(3, 16) for _ in parts)
    lin.lora_b = torch.nn.ParameterList(torch.randn(n, 3) for n in parts)
    lin.lora_scale = 0.5
    x = torch.randn(2, 5, 16, requires_grad=True)
    w, b = lin.weight.split(parts), lin.bias.split(parts)
    separate = torch.cat([F.linear(x, w[j] + 0.5 * lin.lora_b[j] @ lin.lora_a[j], b[j]) for j in range(3)], -1)
    assert torch.allclose(lin(x), separate, atol=1e-5)
    assert torch.allclose(F.linear(x, lin.weight + M.lora_delta(lin), lin.bias), separate, atol=1e-5)
    g = torch.randn_like(separate)  # and the adapters get the gradients the separate ones would
    got = torch.autograd.grad(lin(x), [x, *lin.lora_a, *lin.lora_b], g)
    want = torch.autograd.grad(separate, [x, *lin.lora_a, *lin.lora_b], g)
    for u, v in zip(got, want):
        assert torch.allclose(u, v, atol=1e-4)


# -----------------------------------------------------------------------------
# Sampling never runs on stale weights

def check_sampling_uses_current_weights(lm, n=6):
    """Greedy generate (batch of 3, batch of 1, and 2 samples per prompt) equals an uncached forward each step."""
    batch = G.generate(lm, PROMPTS, n)
    single = G.generate(lm, PROMPTS[1:2], n)
    pairs = G.generate(lm, PROMPTS, n, num_samples=2)
    for i, p in enumerate(PROMPTS):
        ref, gaps = uncached_greedy(lm, p, n)
        upto = next((t for t, g in enumerate(gaps) if g < 1e-5), n)  # either token is right from a near-tie on
        assert batch[i][:upto] == ref[:upto], f"prompt {i}: generate {batch[i]} vs plain forward {ref}"
        assert pairs[2 * i] == pairs[2 * i + 1] == batch[i]
    assert single == batch[1:2]
    return batch


def test_weight_updates_reach_sampling(tmp_path):
    lm = C.load_model(make_checkpoint(tmp_path / "a", "llama_tied", seed=0))
    other = C.load_model(make_checkpoint(tmp_path / "b", "llama_tied", seed=1))
    seen = [check_sampling_uses_current_weights(lm)]

    def changed():
        out = check_sampling_uses_current_weights(lm)
        assert out != seen[-1], "the weight change did not change the samples: the check would prove nothing"
        seen.append(out)

    # 1. an optimizer step
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=0.05)
    ids = torch.tensor([PROMPTS[1]])
    F.cross_entropy(lm(ids)[0, :-1], ids[0, 1:]).neg().backward()  # push away from the data: a big change
    opt.step()
    lm.eval()
    changed()
    # 2. an in-place edit through .data, which a cache keyed on the weight's version counter would miss
    lm.decoder.blocks[0].mlp.down.weight.data.mul_(-3.0)
    lm.lm_head.weight.data.add_(0.5 * torch.randn(VOCAB, lm.config.n_embd, generator=torch.Generator().manual_seed(0)))
    changed()
    # 3. load_state_dict with another model's weights
    lm.load_state_dict(other.state_dict())
    changed()
    # 4. a LoRA adapter, then merged into the weights
    M.add_lora(lm, rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lin in M.lora_layers(lm):
            for b in lin.lora_b:
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
    changed()
    M.merge_lora(lm)
    assert check_sampling_uses_current_weights(lm) == seen[-1]  # merging changes nothing


# -----------------------------------------------------------------------------
# The inverse-CDF draw samples the distribution that temperature, top-k and top-p describe

def expected_probs(logits, temperature, top_k=None, top_p=None):
    """The textbook pipeline: (B, V) probabilities after temperature, top-k and top-p (sort-based)."""
    z = logits / temperature
    if top_k is not None:
        z = z.masked_fill(z < z.topk(top_k, -1).values[:, -1:], float("-inf"))
    p = z.softmax(-1)
    if top_p is not None:
        sp, order = p.sort(-1, descending=True)
        sp = sp * ((sp.cumsum(-1) - sp) < top_p)
        p = torch.zeros_like(p).scatter(-1, order, sp)
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=3),
                                dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=5, top_p=0.6),
                                dict(temperature=1.0, top_p=0.3)])  # many rejected tries: the fallback runs
def test_sample_token_distribution(kw):
    g = torch.Generator().manual_seed(0)
    logits = 1.5 * torch.randn(3, 8, generator=g)
    logits[2, 5] = float("-inf")  # a token that may never be drawn
    n = 40_000
    draws = G.sample_token(logits.repeat(n, 1), generator=g, **kw).view(n, 3)  # (n, 3)
    freq = torch.stack([torch.bincount(draws[:, r], minlength=8) for r in range(3)]).float() / n  # (3, V)
    p = expected_probs(logits, **kw)
    assert not ((p == 0) & (freq > 0)).any(), "drew a token of probability zero"
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-6).all(), f"{kw}: frequencies {freq} vs probabilities {p}"


def test_sample_token_keeps_at_least_the_top_token():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert G.sample_token(logits[:1].repeat(100, 1), 1.0, top_p=1e-6, generator=g).eq(0).all()
    assert G.sample_token(logits[:1].repeat(100, 1), 1.0, top_k=1, generator=g).eq(0).all()
    # a uniform row with top_p 0.5 keeps two of its four tokens (ties broken by the sort), never more
    assert len(set(G.sample_token(logits[1:].repeat(2000, 1), 1.0, top_p=0.5, generator=g).tolist())) == 2


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.9])
def test_nucleus_membership_equals_a_stable_sort(top_p):
    """The sort-free test of nucleus membership keeps exactly the tokens a stable descending sort keeps,
    ties included (logits rounded to quarters, as coarse as bf16 ones: many tokens share a value)."""
    g = torch.Generator().manual_seed(1)
    probs = ((8 * torch.randn(16, 50, generator=g)).round() / 4).softmax(-1)  # (16, 50)
    assert (probs[:, :, None] == probs[:, None, :]).sum() > 2 * probs.numel(), "few ties: the test tests less"
    p, order = probs.sort(dim=-1, descending=True, stable=True)
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (p.cumsum(-1) - p) < top_p)  # (16, 50)
    for tok in range(probs.shape[1]):
        assert torch.equal(G.in_nucleus(probs, torch.full((16,), tok), top_p), kept[:, tok]), tok


# -----------------------------------------------------------------------------
# A prompt shared by G branches: each branch gets exactly what it gets alone (one attention path for all)

WINDOWED = dict(sliding_window=4)  # Mistral: every layer windowed, the window shorter than the rows


def packed(rows, side):
    """Rows of (prompt, [continuations]) packed one per batch row, as data.pack lays them out: the prompt
    as branch 0, then continuation g as branch g, padded on `side`. Returns ids, mask, branch (B, T) and, for
    each (row, g), the flat indices of its path (prompt then continuation) into B*T."""
    flat = [(p + [t for c in cs for t in c], [0] * len(p) + [g + 1 for g, c in enumerate(cs) for _ in c]) for p, cs in rows]
    T = max(len(ids) for ids, _ in flat)
    ids, mask, branch = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(3))
    paths = {}
    for i, ((p, cs), (row, br)) in enumerate(zip(rows, flat)):
        a = 0 if side == "right" else T - len(row)
        ids[i, a:a + len(row)], mask[i, a:a + len(row)], branch[i, a:a + len(row)] = torch.tensor(row), 1, torch.tensor(br)
        at = a + len(p)
        for g, c in enumerate(cs):
            paths[i, g] = [i * T + a + j for j in range(len(p))] + [i * T + at + j for j in range(len(c))]
            at += len(c)
    return ids, mask, branch, paths


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_prompt_shared_by_branches_equals_each_sequence_alone(tmp_path, family, side):
    """Logits and rewards of every token of every branch equal the sequence (prompt + branch) alone, by our
    plain forward and by transformers; with a sliding window shorter than the rows for Mistral."""
    kw = WINDOWED if family == "mistral" else {}
    lm = C.load_model(make_checkpoint(tmp_path / "lm", family, **kw))
    rm = C.load_model(make_checkpoint(tmp_path / "rm", family, reward=True, **kw))
    hf, hf_rm = hf_load(str(tmp_path / "lm")), hf_load(str(tmp_path / "rm"), reward=True)
    g = torch.Generator().manual_seed(0)
    ids_of = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    rows = [(ids_of(7), [ids_of(5), ids_of(1), ids_of(9)]), (ids_of(3), [ids_of(4)]), (ids_of(11), [ids_of(2), ids_of(6)])]
    ids, mask, branch, paths = packed(rows, side)
    with torch.no_grad():
        logits = lm(ids, mask, branch=branch).flatten(0, 1)                             # (B*T, V)
        ends = torch.tensor([path[-1] for path in paths.values()])
        rewards = rm(ids, mask, branch=branch, select=ends)                              # (N,)
        for (i, gi), path in paths.items():
            seq = torch.tensor([rows[i][0] + rows[i][1][gi]])
            alone = lm(seq)[0]
            assert (logits[path] - alone).abs().max() <= 1e-5, (i, gi)
            assert (logits[path] - hf(seq).logits[0]).abs().max() <= 1e-4, (i, gi)
            r = rewards[list(paths).index((i, gi))]
            assert (r - rm(seq)[0]).abs() <= 1e-5 and (r - hf_rm(seq).logits[0, 0]).abs() <= 1e-4, (i, gi)


def hf_greedy_with_stops(hf, prompt, n, stops):
    """transformers' greedy continuation of one prompt alone, stopping at (and keeping) a stop id."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                      eos_token_id=stops, pad_token_id=stops[0])
    return out[0, len(prompt):].tolist()


def live_rows_per_step(lm, run):
    """run() under a hook on the output layer: how many rows it computed at each call."""
    seen = []
    handle = lm.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    try:
        return run(), seen
    finally:
        handle.remove()


def test_rows_that_stop_leave_the_batch_and_greedy_stays_exact(tmp_path):
    """Greedy rows stop at different steps: each equals transformers' greedy answer alone and our uncached
    one, and from the step after a row stops, the output layer no longer computes it."""
    d = make_checkpoint(tmp_path / "lm", "llama")
    lm, hf = C.load_model(d), hf_load(d)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 6, 12, 3, 7)]
    n = 16
    with torch.no_grad():
        free = G.generate(lm, prompts, n)
        # stop ids that end most rows at different steps, and leave one running to the end
        firsts = {}
        for o in free:
            for t, x in enumerate(o):
                firsts.setdefault(x, []).append(t)
        stops = sorted(firsts, key=lambda x: -len(set(firsts[x])))[:3]
        out, seen = live_rows_per_step(lm, lambda: G.generate(lm, prompts, n, eos_token_id=stops))
    lengths = [len(o) for o in out]
    assert len(set(lengths)) >= 3 and max(lengths) == n, lengths  # rows do stop at different steps
    for p, o, f in zip(prompts, out, free):
        t = next((t for t, x in enumerate(f) if x in stops), None)
        assert o == (f if t is None else f[:t + 1])
        ref, gaps = uncached_greedy(lm, p, len(o))
        upto = next((t for t, gap in enumerate(gaps) if gap < 1e-5), len(o))
        assert o[:upto] == ref[:upto]
        assert o == hf_greedy_with_stops(hf, p, n, stops)
    # call s computes the token at step s for the rows still running then: those longer than s
    assert seen == [len(prompts)] + [sum(length > s for length in lengths) for s in range(1, max(lengths))]


def uncached_sample(lm, prompt, n, u, stops, **kw):
    """One sample, a full forward per step, drawing with the given random numbers u (n, r)."""
    seq = list(prompt)
    with torch.no_grad():
        for t in range(n):
            logits = lm(torch.tensor([seq]))[0, -1:]
            seq.append(int(G.sample_token(logits, u=u[t:t + 1], **kw)))
            if seq[-1] in stops:
                break
    return seq[len(prompt):]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_samples_that_stop_at_different_steps_equal_sampling_each_alone(tmp_path, family):
    """K samples per prompt with per-prompt generators: the samples of a prompt stop at different steps, the
    cache drops them as they stop, and each sample equals an uncached sampler given its random numbers."""
    lm = C.load_model(make_checkpoint(tmp_path / "lm", family, **(WINDOWED if family == "mistral" else {})))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 10, 3)]
    K, n, kw = 4, 14, dict(temperature=1.0, top_p=0.9)
    stops = list(range(3, 3 + VOCAB // 12))  # a twelfth of the vocabulary: samples stop early and late
    kept = []
    keep = M.KVCache.keep
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M.KVCache, "keep", lambda self, *a: kept.append(len(a[0])) or keep(self, *a))
        out = G.generate(lm, prompts, n, eos_token_id=stops, num_samples=K, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)], **kw)
    assert kept, "no row ever left the batch: the test would not test it"
    for i, p in enumerate(prompts):
        lengths = [len(o) for o in out[i * K:(i + 1) * K]]
        u = 1.0 - torch.rand(K, n, G.random_numbers(kw["top_p"]), generator=torch.Generator().manual_seed(7 + i))
        for k in range(K):
            assert out[i * K + k] == uncached_sample(lm, p, n, u[k], stops, **kw), (i, k)
    assert len({len(o) for o in out}) >= 3
