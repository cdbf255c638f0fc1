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
from conftest import VOCAB, make_checkpoint, uncached_greedy

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
# K samples of a prompt read its keys and values once: the same attention as K copies would give

@pytest.mark.parametrize("H, Hkv", [(4, 2), (3, 3)])
def test_shared_prefix_attention_equals_attention_over_copies(H, Hkv):
    torch.manual_seed(0)
    cfg = type("Cfg", (), dict(n_layer=1, n_kv_head=Hkv, head_dim=8))
    B, K, Tp, t, D = 3, 4, 6, 2, 8
    cache = M.KVCache(cfg, B, Tp, "cpu", torch.float32)
    cache.k[0].normal_(), cache.v[0].normal_()
    cache.valid[:] = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # left padding
    cache.filled = Tp
    k_pre, v_pre, valid_pre = cache.k[0].clone(), cache.v[0].clone(), cache.valid.clone()
    cache.share_prefix(K, t)
    own = [(torch.randn(B * K, Hkv, 1, D), torch.randn(B * K, Hkv, 1, D)) for _ in range(t)]
    for step, (k, v) in enumerate(own):
        q = torch.randn(B * K, H, 1, D)
        got = cache.attend(0, q, k, v)
        cache.filled += 1
        # the plain way: every row holds a copy of its prompt's keys, then its own; padding masked out
        keys = torch.cat([k_pre.repeat_interleave(K, 0), torch.cat([x for x, _ in own[:step + 1]], 2)], 2)
        values = torch.cat([v_pre.repeat_interleave(K, 0), torch.cat([x for _, x in own[:step + 1]], 2)], 2)
        mask = torch.cat([valid_pre.repeat_interleave(K, 0), torch.ones(B * K, step + 1, dtype=torch.bool)], 1)
        want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None], enable_gqa=H != Hkv)
        assert torch.allclose(got, want, atol=1e-5), step
