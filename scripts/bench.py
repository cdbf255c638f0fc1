"""
Speed of our sampler, training step and whole TS-Align round against transformers', as ratios in one process.

    python scripts/bench.py                          # every section, 5 repeats
    python scripts/bench.py --only greedy,sample --repeats 7
    python scripts/bench.py --skip-positions --skip-round --skip-realistic
    python scripts/bench.py --only realistic          # a round as a real run has it (scripts/bench_realistic.py)

The policy is a random-init Llama with SmolLM2-135M's configuration (30 layers, C 576, MLP 1536, 9 heads,
3 key/value heads, V 49152, tied embeddings), built with transformers and saved into a temporary folder.
Ours loads it with checkpoint.load_model, transformers with from_pretrained in float32; both run with their
defaults (transformers: its generate(), DynamicCache, SDPA attention). The round section adds a student
reward model of the same shape and a teacher reward model of SmolLM2-360M's shape (32 layers, C 960, 15
heads, 5 key/value heads), and times one round's compute on both sides: the policy samples K=8 for 16
prompts, the student scores every sample, the teacher scores two per prompt, then one DPO step and one
student step on the round's pairs (ours computes each prompt once for its rows, as tsalign.py does). The
realistic section (its own file) has chat prompts of 100-300 tokens and responses that stop at varied lengths.

Each measurement runs ours and transformers alternately in this process, and which side goes first swaps
every repeat, so the slow drift of a shared machine hits both. We print each side's median and the ratio
of the medians, their time over ours (> 1: ours is faster); "pairs" is the range of the per-repeat ratios.
Tokens/s counts new tokens over wall time including the prefill, with stop tokens disabled on both sides
(eos_token_id=None for ours, min_new_tokens for transformers).

On a shared machine, OpenMP threads that spin while they wait fight other processes for the cores, and
every parallel region can then stall for milliseconds: timings of both sides swing by 2-10x. This script
sets OMP_WAIT_POLICY=PASSIVE (unless the environment sets it), which makes them far steadier (it changes
how the threads wait, not what is computed). The header names the CPU, torch, its BLAS and the commit, and
prints the load average so a noisy run can be recognised.

The encoder section (`--only encoder`) scores 16 pairs of 256 tokens with a random DeBERTa of deberta-v3-base's
shape (12 layers, C 768, 12 heads, V 128100, 256 position buckets, shared keys, c2p and p2c): encoder.py
against transformers' DebertaV2ForSequenceClassification.

Not a test (pytest collects only test_*.py); the targets at the end are the performance issue's.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see the docstring
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import data  # noqa: E402
import losses  # noqa: E402
import train_loop  # noqa: E402
from checkpoint import load_model  # noqa: E402
from generate import generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("greedy", "sample", "positions", "train", "round", "encoder", "realistic")
NEW = 64          # new tokens per sequence in the greedy and sampling sections
NEAR_TIE = 1e-4   # a top-two logit gap below this may legitimately pick either token
TARGETS = {"greedy b=1": 1.3, "greedy b=16": 1.3, "ts-align sample": 3.0, "dpo step": 1.15, "round": 2.0,
           "encoder": 1.0, "realistic sampling K=8": 3.0, "realistic student scores 64": 1.6,
           "realistic dpo step (+ref)": 1.5, "realistic whole round": 2.0}

# SmolLM2-135M's config.json, with random weights.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0)
# SmolLM2-360M's: the teacher of the round section.
SMOLLM2_360M = dict(SMOLLM2_135M, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                    num_attention_heads=15, num_key_value_heads=5)


def build_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side and case (warm-up runs come on top)")
    p.add_argument("--only", default=None, help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}")
    for s in SECTIONS:
        p.add_argument(f"--skip-{s}", action="store_true", help=f"skip the {s} section")
    p.add_argument("--checkpoint", default=None, help="use this Llama checkpoint folder instead of a fresh random one")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the random weights")
    p.add_argument("--realistic-layers", type=int, default=6, help="layers of each model in the realistic section")
    p.add_argument("--realistic-repeats", type=int, default=None, help="repeats of the realistic section (default --repeats)")
    p.add_argument("--realistic-cases", default="sampling,student,teacher,dpo,round",
                   help="comma-separated cases of the realistic section, of: sampling, student, teacher, dpo, round")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    only = set(SECTIONS) if args.only is None else set(args.only.split(","))
    if only - set(SECTIONS):
        p.error(f"unknown sections {sorted(only - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in only and not getattr(args, f"skip_{s}")]
    args.realistic_repeats = args.realistic_repeats or args.repeats
    return args


# -----------------------------------------------------------------------------
# Helpers: the models, prompts, and alternating timing

def make_checkpoint(folder, seed, shape=SMOLLM2_135M, reward=False):
    import transformers as tf
    transformers_logging_off(tf)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = tf.LlamaForSequenceClassification if reward else tf.LlamaForCausalLM
        hf = cls(tf.LlamaConfig(**shape, num_labels=1)).float()
    hf.save_pretrained(folder)
    return folder


def load_pair(folder, reward=False):
    import transformers as tf
    transformers_logging_off(tf)
    ours = load_model(folder, device="cpu")
    auto = tf.AutoModelForSequenceClassification if reward else tf.AutoModelForCausalLM
    return ours, auto.from_pretrained(folder, dtype=torch.float32).eval()


def transformers_logging_off(tf):
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()


def random_prompts(n, lo, hi, gen, vocab):
    """n prompts of lo..hi random token ids (never id 0, the checkpoint's BOS/EOS)."""
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(1, vocab, (t,), generator=gen).tolist() for t in lengths]


def left_pad(prompts):
    """(B, T) ids and mask, left-padded with 0: how transformers' generate wants a mixed batch."""
    return data.pad(prompts, 0, side="left")


def hf_generate(hf, prompts, n, stop=None, **kw):
    """transformers' generate on left-padded prompts: n new tokens, or with a stop id, at most n."""
    ids, mask = left_pad(prompts)
    until = dict(min_new_tokens=n) if stop is None else dict(eos_token_id=stop)
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, **until, **kw)


def scores(score, rows, batch):
    """score(ids, mask) on rows of ids right-padded in batches, as both sides' reward models read them: (N,)."""
    return torch.cat([score(*data.pad(rows[s:s + batch], 0)) for s in range(0, len(rows), batch)])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(repeats, ours, theirs):
    """Run ours() and theirs() `repeats` times each, alternating which goes first; lists of seconds."""
    t_ours, t_theirs = [], []
    for r in range(repeats):
        order = [(ours, t_ours), (theirs, t_theirs)]
        for fn, times in (order if r % 2 == 0 else order[::-1]):
            times.append(timed(fn)[0])
    return t_ours, t_theirs


def report(name, t_ours, t_theirs, unit=None):
    """Print medians and the ratio of medians (theirs over ours); unit=(count, label) adds a rate."""
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    pairs = [b / a for a, b in zip(t_ours, t_theirs)]
    rate = "" if unit is None else (f"   ours {unit[0] / mo:8.1f} {unit[1]}   transformers {unit[0] / mt:8.1f} {unit[1]}")
    print(f"  {name:<18} ours {mo * 1e3:9.1f} ms   transformers {mt * 1e3:9.1f} ms   ratio {mt / mo:5.2f}x"
          f"   (pairs {min(pairs):.2f}-{max(pairs):.2f}){rate}", flush=True)
    return mt / mo


def top2_gap(logits):
    """(..., V) -> (...): how far the best logit is ahead of the second."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def first_near_tie(gaps):
    """The first index whose top-two gap is below NEAR_TIE, or None."""
    return next((t for t, g in enumerate(gaps) if g < NEAR_TIE), None)


def first_mismatch(a, b):
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@torch.no_grad()
def uncached_logits(lm, prompt, new):
    """Our logits at each position that predicts a token of `new`, from one full forward with no cache: (n, V)."""
    ids = torch.tensor([prompt + new])
    h = lm.hidden_states(ids)[0, len(prompt) - 1:-1]  # (n, C)
    return lm.logits(h)


def check_greedy(lm, prompts, ours, hf_out):
    """Ours against transformers (up to the first near-tie in their logits) and against our uncached path."""
    hf_tokens = hf_out.sequences[:, -NEW:].tolist()
    hf_gaps = torch.stack([top2_gap(step) for step in hf_out.logits], dim=1)  # (B, NEW): their raw logits
    hf_ties = [first_near_tie(row) for row in hf_gaps.tolist()]
    bad_hf, bad_uncached, ties = [], [], []
    for i, (p, o) in enumerate(zip(prompts, ours)):
        upto = NEW if hf_ties[i] is None else hf_ties[i]
        if hf_ties[i] is not None:
            ties.append((i, hf_ties[i]))
        if o[:upto] != hf_tokens[i][:upto]:
            bad_hf.append((i, first_mismatch(o, hf_tokens[i])))
        logits = uncached_logits(lm, p, o)  # (NEW, V)
        tie = first_near_tie(top2_gap(logits).tolist())
        upto = NEW if tie is None else tie
        if logits.argmax(-1).tolist()[:upto] != o[:upto]:
            bad_uncached.append(i)
    tie_text = ", ".join(f"row {i} at step {t}" for i, t in ties) or "none"
    print(f"  parity: near-ties in transformers' logits: {tie_text}")
    print(f"  parity: token-identical to transformers up to the first near-tie: "
          f"{'yes' if not bad_hf else 'NO, rows (row, first mismatch) ' + str(bad_hf)}; "
          f"to our uncached path: {'yes' if not bad_uncached else 'NO, rows ' + str(bad_uncached)}", flush=True)
    return not bad_hf and not bad_uncached


# -----------------------------------------------------------------------------
# Sections

def bench_greedy(lm, hf, args, gen, results):
    print("\ngreedy: 64 new tokens, prompts of 20-60 random ids (left-padded for transformers)")
    V = lm.config.vocab_size
    for B in (1, 16):
        prompts = random_prompts(B, 20, 60, gen, V)
        # Warm-up run of each side, which also gives the tokens and logits for the parity check.
        ours = generate(lm, prompts, NEW, eos_token_id=None)
        hf_out = hf_generate(hf, prompts, NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
        results[f"parity b={B}"] = check_greedy(lm, prompts, ours, hf_out)
        t_o, t_t = alternate(args.repeats, lambda: generate(lm, prompts, NEW, eos_token_id=None),
                             lambda: hf_generate(hf, prompts, NEW, do_sample=False))
        results[f"greedy b={B}"] = report(f"b={B}", t_o, t_t, (B * NEW, "tok/s"))


def bench_sample(lm, hf, args, gen, results):
    P, K = 8, 8
    print(f"\nts-align sampling: {P} prompts of 100-200 ids, K={K} samples each, temperature 1, top-p 0.95, "
          f"no top-k, {NEW} new tokens")
    prompts = random_prompts(P, 100, 200, gen, lm.config.vocab_size)
    g = torch.Generator().manual_seed(args.seed)

    def ours():
        return generate(lm, prompts, NEW, temperature=1.0, top_p=0.95, eos_token_id=None, generator=g, num_samples=K)

    def theirs():
        return hf_generate(hf, prompts, NEW, do_sample=True, temperature=1.0, top_k=0, top_p=0.95,
                           num_return_sequences=K)

    # A small warm-up of both code paths (a full one would cost a repeat), then check one full run's shape.
    generate(lm, prompts[:1], 2, temperature=1.0, top_p=0.95, eos_token_id=None, num_samples=2)
    hf_generate(hf, prompts[:1], 2, do_sample=True, top_k=0, top_p=0.95, num_return_sequences=2)
    shapes = []
    t_o, t_t = alternate(args.repeats, lambda: shapes.append([len(x) for x in ours()]), theirs)
    assert shapes[0] == [NEW] * (P * K), "ours did not sample K full-length responses per prompt"
    results["ts-align sample"] = report("K=8 samples", t_o, t_t, (P * K * NEW, "tok/s"))


def step_times(embedding, run):
    """Seconds between consecutive calls of the token embedding (one per forward) during run()."""
    stamps = []
    handle = embedding.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        run()
    finally:
        handle.remove()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bench_positions(lm, hf, args, gen, results):
    steps = 9
    print(f"\ntime per new token at a position (batch 1, median of {steps - 1} decode steps after the prefill)")
    V = lm.config.vocab_size
    per = {}
    for pos in (64, 256, 1024):
        prompt = random_prompts(1, pos, pos, gen, V)

        def ours():
            return statistics.median(step_times(lm.decoder.tok_emb,
                                                lambda: generate(lm, prompt, steps, eos_token_id=None))[1:])

        def theirs():
            return statistics.median(step_times(hf.model.embed_tokens,
                                                lambda: hf_generate(hf, prompt, steps, do_sample=False))[1:])

        t_o, t_t = [], []
        for r in range(args.repeats):
            pair = [(ours, t_o), (theirs, t_t)]
            for fn, ts in (pair if r % 2 == 0 else pair[::-1]):
                ts.append(fn())
        per[pos] = statistics.median(t_o)
        report(f"position {pos}", t_o, t_t)
    flat = per[1024] / per[64]
    print(f"  ours at 1024 / at 64: {flat:.2f}x (flat is 1.0)")
    results["position 1024/64"] = flat


def bench_train(lm, hf, args, gen, results):
    P, Tp, Tr = 4, 40, 60
    print(f"\ndpo training step: {P} pairs, {Tp}-token prompts, {Tr}-token responses, forward + backward of chosen "
          f"and rejected, AdamW step")
    V = lm.config.vocab_size
    prompts = random_prompts(P, Tp, Tp, gen, V)
    chosen, rejected = random_prompts(P, Tr, Tr, gen, V), random_prompts(P, Tr, Tr, gen, V)
    batch = data.policy_batch(prompts * 2, chosen + rejected, 0)  # chosen rows, then rejected rows
    ref = torch.randn(2 * P, generator=gen) - 300.0  # fixed reference log-probs (their values do not matter)
    lm.train()
    hf.train()
    opt_ours = train_loop.make_optimizer(list(lm.parameters()), train_loop.TrainConfig(lr=1e-6))
    # transformers' Trainer (and TRL's DPOTrainer on it) defaults to optim="adamw_torch_fused" with torch >= 2.8
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-6, fused=True)

    def ours():
        logp, _ = train_loop.response_logprobs(lm, batch)  # (2P,)
        return step(logp, opt_ours)

    def theirs():  # how peer trainers write it: full logits, log-softmax, gather, mask, sum
        ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        return step((logp * resp[:, 1:]).sum(-1), opt_hf)

    def step(logp, opt):
        loss = losses.dpo_loss(logp[:P], logp[P:], ref[:P], ref[P:])[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_ours, first_hf = ours(), theirs()  # warm-up; both models start from the same weights
    print(f"  first-step loss: ours {first_ours:.6f}, transformers {first_hf:.6f}")
    t_o, t_t = alternate(args.repeats, ours, theirs)
    lm.eval()
    hf.eval()
    results["dpo step"] = report("step", t_o, t_t, (2 * P * (Tp + Tr), "tok/s"))


def bench_round(lm, hf, args, gen, results):
    P, K, Tr = 16, 8, NEW
    print(f"\na whole round: {P} prompts of 20-60 ids, the policy samples K={K} each (T=1, top-p 0.95, {Tr} new "
          f"tokens), the student (135M shape) scores all {P * K}, the teacher (360M shape) scores {2 * P}; one DPO step "
          f"and one student step on the {P} pairs (fused AdamW on both sides)")
    V = lm.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        student, hf_student = load_pair(make_checkpoint(os.path.join(tmp, "student"), args.seed + 1, reward=True), True)
        teacher, hf_teacher = load_pair(make_checkpoint(os.path.join(tmp, "teacher"), args.seed + 2, SMOLLM2_360M,
                                                        reward=True), True)
    prompts = random_prompts(P, 20, 60, gen, V)
    g = torch.Generator().manual_seed(args.seed)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-7, fused=True) for m in (lm, hf, student, hf_student)}

    def pairs_of(samples, student_scores, teacher_scores):
        """Per prompt the student's best and worst sample, ordered by the teacher: (chosen, rejected) ids."""
        out = []
        for i in range(P):
            s = student_scores[i * K:(i + 1) * K]
            b, w = int(s.argmax()), int(s.argmin())
            c, r = (b, w) if teacher_scores[2 * i] >= teacher_scores[2 * i + 1] else (w, b)
            out.append((samples[i * K + c], samples[i * K + r]))
        return out

    def one_round(sample, score, logps, student_model, policy_model):
        """score(model, rows, keys, train): rewards of rows (keys: the prompt of each); logps(prompts, responses,
        keys): the policy's log-probs of the responses. Each side's own way of doing both is below."""
        keys = [i // K for i in range(P * K)]
        with torch.no_grad():
            samples = sample()                                                                  # P*K lists of ids
            rows = [prompts[i // K] + x for i, x in enumerate(samples)]
            s = score(student_model, rows, keys, False)                                         # (P*K,)
            best = [(i * K + int(s[i * K:(i + 1) * K].argmax()), i * K + int(s[i * K:(i + 1) * K].argmin()))
                    for i in range(P)]
            t = score(teacher if student_model is student else hf_teacher, [rows[j] for pair in best for j in pair],
                      [i for i in range(P) for _ in range(2)], False)                        # (2P,)
        pairs = pairs_of(samples, s, t)
        policy_model.train()
        logp = logps(prompts * 2, [c for c, _ in pairs] + [r for _, r in pairs], list(range(P)) * 2)
        loss = losses.dpo_loss(logp[:P], logp[P:], logp[:P].detach(), logp[P:].detach())[0].mean()
        loss.backward()
        opts[policy_model].step()
        opts[policy_model].zero_grad(set_to_none=True)
        policy_model.eval()
        student_model.train()
        r = score(student_model, [p + c for p, (c, _) in zip(prompts, pairs)] + [p + r for p, (_, r) in zip(prompts, pairs)],
                  list(range(P)) * 2, True)
        losses.ranking_loss(r[:P], r[P:])[0].mean().backward()
        opts[student_model].step()
        opts[student_model].zero_grad(set_to_none=True)
        student_model.eval()

    def ours():
        def score(rm, rows, keys, train):  # a prompt computed once for its rows (data.pack), as tsalign.py does
            if not train:
                return train_loop.reward_scores(rm, rows, 0, 64, groups=keys)
            return train_loop.rewards(rm, rows, 0, keys, "cpu")  # as train_loop.train_reward does

        one_round(lambda: generate(lm, prompts, Tr, temperature=1.0, top_p=0.95, eos_token_id=None, generator=g,
                                   num_samples=K), score,
                  lambda ps, rs, keys: train_loop.response_logprobs(lm, data.policy_batch(ps, rs, 0, groups=keys))[0],
                  student, lm)

    def theirs():
        def sample():
            out = hf_generate(hf, prompts, Tr, do_sample=True, temperature=1.0, top_k=0, top_p=0.95,
                              num_return_sequences=K)
            return out[:, -Tr:].tolist()

        def score(rm, rows, keys, train):  # right-padded rows, in batches of 64
            fn = lambda ids, mask: rm(input_ids=ids, attention_mask=mask).logits[:, 0]  # noqa: E731
            return fn(*data.pad(rows, 0)) if train else scores(fn, rows, 64)

        def dpo_logps(ps, rs, keys):  # how peer trainers write it: full logits, log-softmax, gather, mask, sum
            batch = data.policy_batch(ps, rs, 0)
            ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
            logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
            return (logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]).sum(-1)

        one_round(sample, score, dpo_logps, hf_student, hf)

    ours_small = (lambda: generate(lm, prompts[:1], 2, temperature=1.0, top_p=0.95, eos_token_id=None, num_samples=2))
    ours_small()  # warm-up of both sampling paths
    hf_generate(hf, prompts[:1], 2, do_sample=True, top_k=0, top_p=0.95, num_return_sequences=2)
    t_o, t_t = alternate(args.repeats, ours, theirs)
    results["round"] = report("round", t_o, t_t, (P * K * Tr, "sampled tok/s"))


# deberta-v3-base's config.json (the shape of OpenAssistant's reward-model-deberta-v3-base), with random weights.
DEBERTA_V3_BASE = dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
                       position_buckets=256, max_relative_positions=-1, share_att_key=True, pos_att_type="p2c|c2p",
                       position_biased_input=False, type_vocab_size=0, norm_rel_ebd="layer_norm", layer_norm_eps=1e-7,
                       hidden_act="gelu", pad_token_id=0, num_labels=1)


def bench_encoder(lm, hf, args, gen, results):
    B, T = 16, 256
    print(f"\nencoder reward model (deberta-v3-base's shape, random weights): rewards of {B} pairs of {T} tokens, "
          f"float32, no grad; transformers' DebertaV2ForSequenceClassification against encoder.py")
    import transformers as tf
    transformers_logging_off(tf)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 3)
        folder = os.path.join(tmp, "deberta-v3-base-random")
        tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**DEBERTA_V3_BASE)).float().save_pretrained(folder)
        ours, theirs = load_pair(folder, reward=True)
    ids = torch.randint(1, DEBERTA_V3_BASE["vocab_size"], (B, T), generator=gen)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        diff = (ours(ids, mask) - theirs(input_ids=ids, attention_mask=mask).logits[:, 0]).abs().max().item()
        print(f"  max |reward difference| {diff:.2e}")
        t_o, t_t = alternate(args.repeats, lambda: ours(ids, mask),
                             lambda: theirs(input_ids=ids, attention_mask=mask).logits)
    results["encoder"] = report(f"score b={B} T={T}", t_o, t_t, (B * T, "tok/s"))


def machine():
    """The CPU model, torch and its BLAS, and the commit: every figure names where it was measured."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    try:
        lscpu = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                     .splitlines() if ":" in line)
        cpu += f" (vendor {lscpu['Vendor ID'].strip()}, family {lscpu['CPU family'].strip()}, model {lscpu['Model'].strip()})"
    except (OSError, KeyError):
        pass
    blas = next((part.split("=")[1] for part in torch.__config__.show().replace(",", " ").split() if
                 part.startswith("BLAS_INFO=")), "unknown")
    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return (f"cpu: {cpu}, {os.cpu_count()} CPUs; torch {torch.__version__}, BLAS {blas}, {torch.get_num_threads()} "
            f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; commit {git.stdout.strip() or 'unknown'}")


# -----------------------------------------------------------------------------

def main(argv=None):
    args = build_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # transformers samples from the global generator
    print(machine())
    print(f"load average {os.getloadavg()[0]:.1f}, repeats {args.repeats}, sections {', '.join(args.sections)}")
    results = {}
    t0 = time.perf_counter()
    lm = hf = None
    if set(args.sections) - {"realistic"}:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.checkpoint or make_checkpoint(os.path.join(tmp, "smollm2-135m-random"), args.seed)
            lm, hf = load_pair(folder)
    gen = torch.Generator().manual_seed(args.seed)
    for s in args.sections:
        if s == "realistic":  # its own models (scripts/bench_realistic.py)
            import bench_realistic
            bench_realistic.bench_realistic(sys.modules[__name__], args, gen, results)
        else:
            globals()[f"bench_{s}"](lm, hf, args, gen, results)
    if results:
        print(f"\nsummary ({time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}):")
        for name, target in TARGETS.items():
            if name in results:
                r = results[name]
                print(f"  {name:<18} {r:5.2f}x   target >= {target:.2f}x   {'ok' if r >= target else 'MISSED'}")
        for name in ("parity b=1", "parity b=16"):
            if name in results:
                print(f"  {name:<18} {'ok' if results[name] else 'FAILED'}")
        if "realistic kept share" in results:
            print(f"  {'realistic kept share':<18} {results['realistic kept share']:5.3f}   (row-steps that kept a token)")
        if "position 1024/64" in results:
            print(f"  {'position 1024/64':<18} {results['position 1024/64']:5.2f}x   (flat is 1.0)")


if __name__ == "__main__":
    main()
