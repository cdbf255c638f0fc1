"""Tests for model.py against transformers (the independent reference), on tiny random checkpoints.

Every comparison is with transformers run in the same test, or with an invariance of our own model
(a padded row equals the sequence alone, cached equals uncached), never with stored earlier outputs.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

import checkpoint as C
import generate as G
import model as M
from conftest import BOS, EOS, FAMILIES, PAD, VOCAB, hf_load, make_checkpoint, uncached_greedy



@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd in this module's tests (scoped to each test, so other test modules are unaffected)."""
    with torch.no_grad():
        yield

LOGIT_TOL = 1e-4


def rand_ids(*shape, seed=0, low=3):
    """Random token ids that avoid PAD (0), BOS (1) and EOS (2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, shape, generator=g)


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One checkpoint per (family, reward), built on first use and shared by the module's tests
    (tests that change a folder copy it first)."""
    root = tmp_path_factory.mktemp("ckpts")
    made = {}

    def get(family, reward=False):
        key = (family, reward)
        if key not in made:
            made[key] = make_checkpoint(root / f"{family}_{'rm' if reward else 'lm'}", family, reward)
        return made[key]

    return get


# -----------------------------------------------------------------------------
# 1. Logit and reward parity with transformers

@pytest.mark.parametrize("family", FAMILIES)
def test_logit_parity(ckpts, family):
    d = ckpts(family)
    hf, ours = hf_load(d), C.load_model(d)
    assert isinstance(ours, M.CausalLM)
    ids = rand_ids(3, 40, seed=1)
    ref = hf(ids).logits
    assert maxdiff(ours(ids), ref) <= LOGIT_TOL
    assert maxdiff(ours(ids, torch.ones_like(ids)), ref) <= LOGIT_TOL
    assert maxdiff(ours.logits(ours.hidden_states(ids)), ref) <= LOGIT_TOL
    assert ref.std() > 0.3  # logits are not all ~0 (a wrong model could not pass by being tiny)


# A reward model has no output layer: tie_word_embeddings ties nothing in it, so llama_tied would repeat llama.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama_tied"])
def test_reward_parity(ckpts, family):
    d = ckpts(family, reward=True)
    hf, rm = hf_load(d, reward=True), C.load_model(d)
    assert isinstance(rm, M.RewardModel)
    assert hf.config.pad_token_id == PAD
    ids = rand_ids(4, 20, seed=2)  # no PAD token anywhere: transformers reads the last position
    mask = torch.ones_like(ids)
    ref = hf(ids, attention_mask=mask).logits[:, 0]
    r = rm(ids, mask)
    assert r.shape == (4,)
    assert maxdiff(r, ref) <= LOGIT_TOL
    assert ref.std() > 1e-3  # the rows differ, so reading the wrong row or position would show


# -----------------------------------------------------------------------------
# 2. Padding invariance

def pad_batch(seqs, side, seed=0):
    """Pad to one length with *garbage* ids (not PAD), so only the mask can hide them."""
    T = max(len(s) for s in seqs)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(seqs), T), generator=g)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    spans = []
    for i, s in enumerate(seqs):
        a = T - len(s) if side == "left" else 0
        ids[i, a:a + len(s)] = torch.tensor(s)
        mask[i, a:a + len(s)] = 1
        spans.append((a, a + len(s)))
    return ids, mask, spans


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(ckpts, family, side):
    seqs = [rand_ids(n, seed=10 + n).tolist() for n in (14, 6, 10)]
    lm, hf = C.load_model(ckpts(family)), hf_load(ckpts(family))
    rm, hf_rm = C.load_model(ckpts(family, True)), hf_load(ckpts(family, True), reward=True)
    ids, mask, spans = pad_batch(seqs, side)
    logits, rewards = lm(ids, mask), rm(ids, mask)
    for i, (s, (a, b)) in enumerate(zip(seqs, spans)):
        alone = torch.tensor([s])
        ref_alone = hf(alone).logits[0]  # unpadded, so valid for GPT-2 too
        assert maxdiff(lm(alone)[0], ref_alone) <= LOGIT_TOL
        assert maxdiff(logits[i, a:b], lm(alone)[0]) <= 1e-5, f"row {i} ({side}-padded)"
        assert maxdiff(logits[i, a:b], ref_alone) <= LOGIT_TOL
        r_alone = rm(alone)
        assert maxdiff(r_alone, hf_rm(alone).logits[:, 0]) <= LOGIT_TOL
        assert maxdiff(rewards[i], r_alone[0]) <= 1e-5, f"reward of row {i} ({side}-padded)"


# -----------------------------------------------------------------------------
# 3. pad == eos

def test_reward_pad_equals_eos(tmp_path):
    d = make_checkpoint(tmp_path / "rm", "llama", reward=True, pad_token_id=EOS, eos_token_id=EOS)
    rm, hf = C.load_model(d), hf_load(d, reward=True)
    assert rm.config.pad_token_id == EOS == rm.config.stop_token_ids[0]
    seq = rand_ids(9, seed=3).tolist() + [EOS]        # a finished response: its last real token is EOS
    other = rand_ids(13, seed=4).tolist()
    T = len(other)
    ids = torch.full((2, T), EOS)                      # right-padded with the pad id, which is EOS
    ids[0, :len(seq)] = torch.tensor(seq)
    ids[1] = torch.tensor(other)
    mask = torch.zeros_like(ids)
    mask[0, :len(seq)] = 1
    mask[1] = 1
    ours = rm(ids, mask)[0]
    # Reference: transformers on the sequence alone, reading its true last token (no pad id set, batch 1).
    hf.config.pad_token_id = None
    ref = hf(torch.tensor([seq])).logits[0, 0]
    assert maxdiff(ours, ref) <= LOGIT_TOL
    assert maxdiff(ours, rm(torch.tensor([seq]))[0]) <= 1e-5
    # The naive rule (last position where ids != pad_id) reads the token before the EOS: a different value.
    naive_last = (ids[0] != EOS).nonzero().max().item()
    assert naive_last == len(seq) - 2
    h = rm.decoder(ids, mask)
    naive = rm.score(h[0, naive_last]).squeeze(-1)
    assert maxdiff(naive, ours) > 1e-3, "test is vacuous: the naive rule would give the same reward"
    hf.config.pad_token_id = EOS  # transformers' own ids != pad rule, on the padded batch
    assert maxdiff(hf(ids, attention_mask=mask).logits[0, 0], ours) > 1e-3


# -----------------------------------------------------------------------------
# 4. Greedy generation: cached == uncached, and == transformers up to a near-tie

PROMPTS = [rand_ids(n, seed=20 + n).tolist() for n in (5, 11, 3, 8)]


def hf_greedy(hf, prompt, n):
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=PAD, bos_token_id=BOS, return_dict_in_generate=True, output_logits=True)
    ids = torch.tensor([prompt])
    hf.generation_config.eos_token_id = None  # else generate fills in the model's EOS, which min_new_tokens masks
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    toks = out.sequences[0, len(prompt):].tolist()
    gaps = []
    for t, logits in enumerate(out.logits):
        top2 = logits[0].topk(2).values
        gaps.append((top2[0] - top2[1]).item())
        if gaps[-1] >= 1e-4:  # transformers itself picked the argmax of its raw logits (nothing suppressed)
            assert toks[t] == int(logits[0].argmax())
    assert len(toks) == n
    return toks, gaps


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2"])
def test_greedy_generate(ckpts, family):
    d = ckpts(family)
    lm, hf = C.load_model(d), hf_load(d)
    n = 12
    out = G.generate(lm, PROMPTS, n, eos_token_id=None)
    assert len(out) == len(PROMPTS) and all(len(o) == n for o in out)
    distinct = set()
    for i, p in enumerate(PROMPTS):
        ref, gaps = uncached_greedy(lm, p, n)
        for t in range(n):  # token for token (a tie below 1e-6 would make either choice right)
            if gaps[t] < 1e-6:
                break
            assert out[i][t] == ref[t], f"prompt {i}: cached differs from uncached at step {t}"
        hf_toks, hf_gaps = hf_greedy(hf, p, n)
        tie = next((t for t, g in enumerate(hf_gaps) if g < 1e-4), None)
        upto = n if tie is None else tie  # from a near-tie on, either choice is right
        if tie is not None:
            print(f"{family} prompt {i}: near-tie in transformers' logits at step {tie} (gap {hf_gaps[tie]:.2e})")
        assert out[i][:upto] == hf_toks[:upto], (
            f"{family} prompt {i}: ours {out[i]} vs transformers {hf_toks}"
            + ("" if tie is None else f" (near-tie at step {tie})"))
        distinct.update(out[i])
    assert len(distinct) >= 4  # the outputs are not one repeated token (a weak check would pass then)


# -----------------------------------------------------------------------------
# 5. Stop ids, logprobs, num_samples, sampling

@pytest.fixture(scope="module")
def llama_lm(ckpts):
    return C.load_model(ckpts("llama"))


def test_stop_ids(llama_lm):
    lm, n = llama_lm, 12
    free = G.generate(lm, PROMPTS, n, eos_token_id=None)
    assert all(len(o) == n for o in free)

    def first(o, stops):
        return next((t for t, x in enumerate(o) if x in stops), None)

    # Pick two stop ids from the free-running outputs such that rows stop on different ids and at least
    # one row never stops.
    cands = sorted({x for o in free for x in o})
    chosen = None
    for a in cands:
        for b in cands:
            if a >= b:
                continue
            hits = [first(o, (a, b)) for o in free]
            which = {free[i][t] for i, t in enumerate(hits) if t is not None}
            if which == {a, b} and any(t is None for t in hits) and any(t not in (None, n - 1) for t in hits):
                chosen = (a, b)
                break
        if chosen:
            break
    assert chosen, f"no suitable stop ids in {free}"
    out = G.generate(lm, PROMPTS, n, eos_token_id=list(chosen))
    for o, f in zip(out, free):
        t = first(f, chosen)
        if t is None:
            assert o == f and len(o) == n
        else:
            assert o == f[:t + 1] and o[-1] in chosen  # stops at the first stop id and keeps it
    # None never stops, even though the outputs contain the ids.
    assert G.generate(lm, PROMPTS, n, eos_token_id=None) == free
    # A single int works as a stop id too.
    a = chosen[0]
    for o, f in zip(G.generate(lm, PROMPTS, n, eos_token_id=a), free):
        t = first(f, (a,))
        assert o == (f if t is None else f[:t + 1])


def test_num_samples_are_prompt_major(llama_lm):
    lm, n, K = llama_lm, 8, 3
    greedy = G.generate(lm, PROMPTS, n)
    # K greedy samples per prompt, prompt-major, all equal to the greedy output.
    many = G.generate(lm, PROMPTS, n, num_samples=K)
    assert many == [greedy[i] for i in range(len(PROMPTS)) for _ in range(K)]
    # Sampled with top-k 1 (temperature 0.8): sample i*K+j continues prompt i, so it is prompt i's greedy answer.
    g = torch.Generator().manual_seed(0)
    assert G.generate(lm, PROMPTS, n, temperature=0.8, top_k=1, num_samples=K, generator=g) == many
    out = G.generate(lm, PROMPTS, n, temperature=0.8, top_k=40, num_samples=K, generator=g)
    assert len(out) == len(PROMPTS) * K
    assert len({tuple(o) for o in out}) > len(PROMPTS)  # samples of a prompt differ


def test_sampling_reproducible_and_top_k_1(llama_lm):
    lm, n = llama_lm, 10

    def sample(seed, **kw):
        return G.generate(lm, PROMPTS, n, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7, top_p=0.9) == sample(7, top_p=0.9)
    greedy = G.generate(lm, PROMPTS, n)
    assert sample(7, top_k=1) == greedy
    assert sample(7) != greedy
    assert sample(3, top_p=1e-6) == greedy  # the smallest set reaching top_p is the top token alone


def test_per_prompt_generators_make_samples_independent_of_the_batch(llama_lm):
    """With one generator per prompt, a prompt's K samples are the same whatever shares its batch (what
    lets torchrun processes split the prompts and still draw what one process draws)."""
    lm, n, K = llama_lm, 10, 3

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = G.generate(lm, PROMPTS[:2], n, temperature=1.0, top_p=0.9, generator=gens(10, 11), num_samples=K)
    b = G.generate(lm, [PROMPTS[2], PROMPTS[0]], n, temperature=1.0, top_p=0.9, generator=gens(12, 10), num_samples=K)
    alone = G.generate(lm, PROMPTS[:1], n, temperature=1.0, top_p=0.9, generator=gens(10), num_samples=K)
    assert a[:K] == b[K:] == alone
    assert len({tuple(s) for s in alone}) > 1  # the K rows of a prompt draw different numbers
    assert G.generate(lm, PROMPTS[:1], n, temperature=1.0, generator=gens(13), num_samples=K) != alone
    with pytest.raises(ValueError, match="one per prompt"):
        G.generate(lm, PROMPTS[:2], n, temperature=1.0, generator=gens(1))


# -----------------------------------------------------------------------------
# 6. stop_token_ids from generation_config.json

def test_stop_token_ids_from_generation_config(tmp_path):
    d = make_checkpoint(tmp_path / "m", "llama")
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS, "eos_token_id": [EOS, 7], "pad_token_id": PAD}, f)
    assert json.load(open(os.path.join(d, "config.json")))["eos_token_id"] == EOS
    assert GenerationConfig.from_pretrained(d).eos_token_id == [EOS, 7]
    assert C.load_model(d).config.stop_token_ids == [EOS, 7]
    os.remove(os.path.join(d, "generation_config.json"))
    assert C.load_model(d).config.stop_token_ids == [EOS]


# -----------------------------------------------------------------------------
# 7. transformers 4.x config layout

def to_v4_layout(d, scaling_key):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    kind = rope.pop("rope_type", "default")
    cfg["rope_scaling"] = None if kind == "default" else {scaling_key: kind, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.46.0"
    json.dump(cfg, open(path, "w"), indent=2)
    return cfg


@pytest.mark.parametrize("family,scaling_key", [("llama3_rope", "type"), ("llama3_rope", "rope_type"),
                                                ("qwen2", "type"), ("mistral", "type")])
def test_v4_config_layout(ckpts, tmp_path, family, scaling_key):
    src = ckpts(family)
    d = str(tmp_path / "v4")
    shutil.copytree(src, d)
    cfg = to_v4_layout(d, scaling_key)
    assert "rope_parameters" not in cfg and "dtype" not in cfg and "rope_theta" in cfg
    ours = C.load_model(d)
    ids = rand_ids(2, 60, seed=5)
    ref = hf_load(src)(ids).logits
    assert maxdiff(ours(ids), ref) <= LOGIT_TOL
    assert maxdiff(hf_load(d)(ids).logits, ref) <= LOGIT_TOL  # transformers reads the rewritten config the same


def test_v4_linear_rope_scaling(tmp_path):
    d = make_checkpoint(tmp_path / "lin", "llama",
                        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0})
    ids = rand_ids(2, 50, seed=6)
    ref = hf_load(d)(ids).logits
    assert maxdiff(C.load_model(d)(ids), ref) <= LOGIT_TOL
    to_v4_layout(d, "type")
    assert maxdiff(C.load_model(d)(ids), ref) <= LOGIT_TOL
    # the scaling matters: without it the logits differ
    plain = make_checkpoint(tmp_path / "plain", "llama", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert maxdiff(hf_load(plain)(ids).logits, ref) > 1e-2


# -----------------------------------------------------------------------------
# 8. Sharded checkpoints

@pytest.mark.parametrize("family,reward", [("llama", False), ("gpt2", False), ("qwen3", True)])
def test_sharded_checkpoint(tmp_path, family, reward):
    d = make_checkpoint(tmp_path / "sh", family, reward, max_shard_size="20KB")
    files = os.listdir(d)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) >= 3
    ids = rand_ids(2, 16, seed=7)
    ref = hf_load(d, reward)(ids).logits
    ours = C.load_model(d)(ids)
    assert maxdiff(ours, ref[:, 0] if reward else ref) <= LOGIT_TOL


# -----------------------------------------------------------------------------
# 9. Save round trip

DUMMY_FILES = {"tokenizer.json": '{"version": "1.0", "dummy": true}',
               "tokenizer_config.json": '{"model_max_length": 128, "dummy": 1}',
               "generation_config.json": json.dumps({"bos_token_id": BOS, "eos_token_id": [EOS, 9],
                                                     "pad_token_id": PAD})}


def perturb_(m, seed):
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", ["llama_tied", "qwen3", "gpt2"])
def test_save_round_trip(ckpts, tmp_path, family):
    src = str(tmp_path / "src")
    shutil.copytree(ckpts(family), src)
    for name, text in DUMMY_FILES.items():
        with open(os.path.join(src, name), "w") as f:
            f.write(text)
    ours = C.load_model(src)
    perturb_(ours, 1)  # save must write our current weights, not copy the source's
    if family == "llama_tied":
        assert ours.lm_head.weight is ours.decoder.tok_emb.weight
    d2 = str(tmp_path / "out")
    C.save_model(ours, d2)
    ids = rand_ids(3, 20, seed=8)
    hf = AutoModelForCausalLM.from_pretrained(d2, dtype=torch.float32).eval()
    assert maxdiff(hf(ids).logits, ours(ids)) <= 1e-5
    assert maxdiff(hf_load(src)(ids).logits, ours(ids)) > 1e-3  # the perturbation is visible
    for name, text in DUMMY_FILES.items():
        assert open(os.path.join(d2, name)).read() == text
    a, b = json.load(open(os.path.join(src, "config.json"))), json.load(open(os.path.join(d2, "config.json")))
    assert set(a) <= set(b)
    for k in set(a) - {"architectures", "dtype", "torch_dtype"}:
        assert a[k] == b[k], k
    # and our own loader reads it back
    assert maxdiff(C.load_model(d2)(ids), ours(ids)) <= 1e-5

    # A reward model made from the LM saves as a *ForSequenceClassification transformers loads.
    rm = M.add_reward_head(ours)
    d3 = str(tmp_path / "rm")
    C.save_model(rm, d3)
    assert json.load(open(os.path.join(d3, "config.json")))["architectures"][0].endswith("ForSequenceClassification")
    hf_rm = AutoModelForSequenceClassification.from_pretrained(d3, dtype=torch.float32).eval()
    assert hf_rm.config.pad_token_id == PAD and hf_rm.config.num_labels == 1
    mask = torch.ones_like(ids)
    assert maxdiff(hf_rm(ids, attention_mask=mask).logits[:, 0], rm(ids, mask)) <= 1e-5
    assert maxdiff(C.load_model(d3)(ids, mask), rm(ids, mask)) <= 1e-5


def test_save_over_sharded_checkpoint(tmp_path):
    """Saving into a folder that holds a sharded checkpoint (here the model's own source folder, which
    save_model explicitly allows) must not leave the old weights to be loaded back: transformers reads the
    new model.safetensors, and so must we."""
    d = make_checkpoint(tmp_path / "sh", "llama", max_shard_size="20KB")
    ours = C.load_model(d)
    perturb_(ours, 2)
    C.save_model(ours, d)
    ids = rand_ids(2, 12, seed=12)
    assert maxdiff(hf_load(d)(ids).logits, ours(ids)) <= 1e-5
    assert maxdiff(C.load_model(d)(ids), ours(ids)) <= 1e-5, "load_model read the stale shards"


# -----------------------------------------------------------------------------
# 10. add_reward_head leaves the LM alone

@pytest.mark.parametrize("family", ["llama_tied", "gpt2"])
def test_add_reward_head_leaves_lm_unchanged(ckpts, family):
    d = ckpts(family)
    lm, hf = C.load_model(d), hf_load(d)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    rm = M.add_reward_head(lm)
    assert isinstance(rm, M.RewardModel) and rm.config.reward and not lm.config.reward
    assert lm.config.arch == hf.config.architectures[0]
    after = lm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lm_ptrs = {p.data_ptr() for p in lm.parameters()}
    assert not lm_ptrs & {p.data_ptr() for p in rm.parameters()}
    for p in rm.parameters():
        p.add_(1.0)
    ids = rand_ids(2, 12, seed=9)
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    assert maxdiff(lm(ids), hf(ids).logits) <= LOGIT_TOL
    # the reward model's decoder is a copy of the LM's (checked before the +1 above changed it)
    rm2 = M.add_reward_head(lm)
    assert maxdiff(rm2.decoder(ids), lm.decoder(ids)) == 0


# -----------------------------------------------------------------------------
# 11. Clear errors

def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def _config(drop=(), **changes):
    """An edit of a checkpoint folder: these keys of config.json changed, those in drop removed."""
    def edit(d):
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg = {k: v for k, v in {**cfg, **changes}.items() if k not in drop}
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return edit


def _tensors(change):
    """An edit of a checkpoint folder: its tensors go through change(state_dict) in place."""
    def edit(d):
        st = os.path.join(d, "model.safetensors")
        sd = load_file(st)
        change(sd)
        save_file(sd, st, metadata={"format": "pt"})
    return edit


def _write(name, text):
    def edit(d):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return edit


GONE, BAD, EXTRA = "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.extra.weight"

# (edit of a copy of a good Llama checkpoint, the exception, a regex its one-line message must match)
CHECKPOINT_ERRORS = {
    "unknown architecture": (_config(architectures=["BertModel"]), ValueError,
                             r"BertModel.*supported: .*LlamaForCausalLM.*Qwen3ForCausalLM.*GPT2LMHeadModel"),
    "config not JSON": (_write("config.json", '{"architectures": ["LlamaForCausalLM"],'), ValueError,
                        r"config .*config\.json is not valid JSON"),
    "config lacks a key": (_config(drop=["hidden_size"]), ValueError, r"config\.json in .* lacks the key 'hidden_size'"),
    "missing tensor": (_tensors(lambda sd: sd.pop(GONE)), ValueError, rf"missing tensor '{GONE}'"),
    "wrong shape": (_tensors(lambda sd: sd.update({BAD: torch.zeros(sd[BAD].shape[0] + 1, sd[BAD].shape[1])})),
                    ValueError, rf"tensor '{BAD}' .* has shape \(33, 64\), expected \(32, 64\)"),
    "unexpected tensor": (_tensors(lambda sd: sd.update({EXTRA: torch.zeros(2)})), ValueError,
                          rf"does not use: \['{EXTRA}'\]"),
    "no weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), FileNotFoundError,
                   r"no model\.safetensors or model\.safetensors\.index\.json in"),
    "two labels": (_config(architectures=["LlamaForSequenceClassification"], id2label={"0": "a", "1": "b"}),
                   ValueError, r"with 2 labels is not a reward model; expected num_labels 1"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_ERRORS))
def test_checkpoint_errors(ckpts, tmp_path, case):
    edit, error, message = CHECKPOINT_ERRORS[case]
    d = str(tmp_path / "ckpt")
    shutil.copytree(ckpts("llama"), d)
    edit(d)
    with pytest.raises(error, match=message) as e:
        C.load_model(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("folder, message", [("nope", r"checkpoint folder .*nope does not exist"),
                                             ("empty", r"no config\.json in .*empty: not a Hugging Face checkpoint")])
def test_not_a_checkpoint_folder(tmp_path, folder, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=message):
        C.load_model(str(tmp_path / folder))


@pytest.mark.parametrize("prompts, n, message", [([], 4, "non-empty list of non-empty prompts"),
                                                 ([[5], []], 4, "non-empty list of non-empty prompts"),
                                                 ([[5]], 0, "max_new_tokens and num_samples must be >= 1, got 0 and 1")])
def test_generate_errors(llama_lm, prompts, n, message):
    with pytest.raises(ValueError, match=message):
        G.generate(llama_lm, prompts, n)


def test_lora_rank_error(llama_lm):
    with pytest.raises(ValueError, match="LoRA rank must be >= 1, got 0"):
        M.add_lora(llama_lm, 0)


# -----------------------------------------------------------------------------
# 12. LoRA

def lora_params(m):
    return [(n, p) for n, p in m.named_parameters() if ".lora_" in n]


def randomize_lora_b_(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in lora_params(m):
        if ".lora_b." in name:  # one adapter per projection, fused ones included
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
            n += 1
    return n


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_lora_zero_init_and_merge(ckpts, tmp_path, family):
    d = ckpts(family)
    lm, hf = C.load_model(d), hf_load(d)
    ids = rand_ids(2, 16, seed=11)
    base = lm(ids)
    M.add_lora(lm, rank=4, alpha=8)
    assert torch.equal(lm(ids), base)
    assert maxdiff(lm(ids), hf(ids).logits) <= LOGIT_TOL
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    lp = lora_params(lm)
    n_targets = 7 if family != "gpt2" else 6  # q k v o gate up down (GPT-2: no gate)
    assert len(lp) == 2 * n_targets * lm.config.n_layer
    assert trainable == {n for n, _ in lp}
    assert randomize_lora_b_(lm) == n_targets * lm.config.n_layer
    adapted = lm(ids)
    assert maxdiff(adapted, base) > 1e-2  # the adapter has an effect
    # Saving an unmerged adapter writes the merged weights, which transformers reads as such.
    C.save_model(lm, str(tmp_path / "saved"))
    assert maxdiff(hf_load(str(tmp_path / "saved"))(ids).logits, adapted) <= 1e-5
    M.merge_lora(lm)
    assert not lora_params(lm)
    assert maxdiff(lm(ids), adapted) <= 1e-5
    assert all(p.requires_grad for p in lm.parameters())


def test_lora_reward_model_trainable_params(ckpts):
    rm = C.load_model(ckpts("qwen2", reward=True))
    M.add_lora(rm, rank=2)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_params(rm)} | {"score.weight"}


def test_generate_uses_updated_weights(ckpts):
    lm = C.load_model(ckpts("qwen2"))
    n = 8
    before = G.generate(lm, PROMPTS, n)
    # a LoRA update, merged
    M.add_lora(lm, rank=4)
    randomize_lora_b_(lm, seed=3)
    with_adapter = G.generate(lm, PROMPTS, n)
    assert with_adapter != before
    for p, o in zip(PROMPTS, with_adapter):
        assert o == uncached_greedy(lm, p, n)[0]
    M.merge_lora(lm)
    assert G.generate(lm, PROMPTS, n) == with_adapter
    # a manual in-place update of a base weight
    with torch.no_grad():
        lm.decoder.blocks[1].mlp.down.weight.mul_(-3.0)
    after = G.generate(lm, PROMPTS, n)
    assert after != with_adapter
    for p, o in zip(PROMPTS, after):
        assert o == uncached_greedy(lm, p, n)[0]


# -----------------------------------------------------------------------------
# 13. KV cache size and the context limit

def test_kv_cache_sized_to_need(tmp_path, monkeypatch):
    d = make_checkpoint(tmp_path / "long", "llama", max_position_embeddings=8192)
    lm = C.load_model(d)
    assert lm.config.max_positions == 8192
    made = []

    class Recording(M.KVCache):
        def __init__(self, cfg, B, S, device, dtype):
            made.append((B, S))
            super().__init__(cfg, B, S, device, dtype)

    monkeypatch.setattr(G, "KVCache", Recording)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    out = G.generate(lm, prompts, 4)
    # the longest prompt plus a slot per token fed back (the last one never is), not the 8192 positions
    assert made == [(2, 5 + 3)]
    G.generate(lm, prompts, 4, num_samples=3)  # K samples: a row per prompt, its slots once, then K a step
    assert made[1] == (2, 5 + 3 * 3)
    assert [len(o) for o in out] == [4, 4]
    hf = hf_load(d)
    for p, o in zip(prompts, out):
        assert o == hf_greedy(hf, p, 4)[0]


def test_context_limit(llama_lm):
    lm = llama_lm
    assert lm.config.max_positions == 128
    with pytest.raises(ValueError) as e:
        G.generate(lm, [[5] * 120, [6] * 3], 9)
    one_line(e, "128")
    out = G.generate(lm, [[5] * 120, [6] * 3], 8)  # exactly fits
    assert [len(o) for o in out] == [8, 8]
