"""
The benchmark's realistic section (`python scripts/bench.py --only realistic`): a TS-Align round as a real run
has it, against the same round composed from transformers, used as peers use it.

    python scripts/bench.py --only realistic                       # 6 layers: 30-60 minutes on 2 cores
    python scripts/bench.py --only realistic --realistic-cases student,teacher,dpo   # the quick cases
    python scripts/bench.py --only realistic --realistic-layers 30 # SmolLM2's full depth (hours)

What makes it realistic, where the other sections are not:
- prompts of 100-300 tokens, SmolLM2's chat template included (its token ids; the words between are random);
- at most 256 new tokens, and responses that stop at varied lengths: a seeded draw shaped like the answers of
  SmolLM2-135M-Instruct to 8 chat prompts (K=8, T=1, top-p 0.95): quartiles about 31 / 84 / 201 tokens, 18 of
  64 cut at the limit. One wrapper (`StopSchedule`) forces each row's stop token at its scheduled step, on both
  sides, so both sample the same lengths; the share of sampling row-steps that kept a token is printed;
- five cases: sampling K=8; the student scoring the 8 responses of each prompt; the teacher scoring 2 per
  prompt; a DPO step (its reference pass, then forward, backward and a fused AdamW step); the whole round.

The models keep SmolLM2's widths (policy and student: C 576, 9/3 heads, MLP 1536, V 49152; teacher: 360M's
C 960, 15/5 heads, MLP 2560) with --realistic-layers layers each (default 6, so that the section fits in
less time; SmolLM2 has 30 and 32): every case does the same work per layer on both sides, so the
ratios move little with depth, while the output layer's share grows as layers are removed.
Ours calls the library as tsalign.py does (generate, reward_scores with the prompt as group, reference_logprobs
and response_logprobs on packed pairs); transformers gets the same rows in the same batches and order (its
reward models read right-padded rows in batches of 64, as `scores` in bench.py does).
"""
import statistics
import tempfile
import os

import torch

import data
import losses
import train_loop
from generate import generate

P, K, NEW = 8, 8, 256
STOP, PAD = 2, 0                                   # SmolLM2's <|im_end|> (where a chat answer ends) and pad
CHAT = ([1, 4093, 198], [2, 198, 1, 520, 198])     # "<|im_start|>user\n" ... "<|im_end|>\n<|im_start|>assistant\n"
# Quantiles of the stopped responses' lengths (share of them, tokens), for the seeded draw of `stop_lengths`.
LENGTHS = ((0.0, 8), (0.34, 31), (0.71, 84), (0.75, 201), (1.0, 255))
CUT = 18  # rows of 64 that reach the limit without stopping


def chat_prompts(n, lo, hi, gen, vocab):
    """n prompts of lo..hi tokens, chat template included; the words between are random ids (no special id)."""
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    body = len(CHAT[0]) + len(CHAT[1])
    return [CHAT[0] + torch.randint(3, vocab, (t - body,), generator=gen).tolist() + CHAT[1] for t in lengths]


def stop_lengths(n, new, seed):
    """Each row's length in tokens (its stop token included; `new` for a row cut at the limit): CUT of 64 rows
    cut, the others drawn from LENGTHS, in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    cut = round(CUT * n / 64)
    u = ((torch.arange(n - cut) + torch.rand(n - cut, generator=gen)) / (n - cut)).tolist()  # one in each stratum
    qs, ls = zip(*LENGTHS)
    out = []
    for x in u:
        j = next(j for j in range(1, len(qs)) if x <= qs[j])
        out.append(round(ls[j - 1] + (x - qs[j - 1]) / (qs[j] - qs[j - 1]) * (ls[j] - ls[j - 1])))
    out += [new] * cut
    return [out[i] for i in torch.randperm(n, generator=gen).tolist()]


class StopSchedule:
    """The one wrapper both sides sample under: row r ends with the stop token as its lengths[r]-th token, and
    the stop token is forbidden everywhere else, so the schedule alone decides where rows stop.

    It wraps a model's forward and edits the last position's logits of each call (call t gives token t of
    every row). Rows are told apart by their order: both libraries keep the rows in prompt-major order (K rows a
    prompt), and a row that stopped either stays in the batch (transformers computes it to the end) or leaves
    it (ours); the wrapper knows which rows it stopped, so a call's row count says which case it is."""

    def __init__(self, model, lengths):
        self.model, self.lengths = model, lengths

    def __enter__(self):
        self.calls, self.running = 0, list(range(len(self.lengths)))
        forward = self.model.forward

        def forced(*args, **kwargs):
            out = forward(*args, **kwargs)
            logits = out if torch.is_tensor(out) else out.logits
            self.force(logits if logits.dim() == 2 else logits[:, -1])
            return out

        self.model.forward = forced
        return self

    def __exit__(self, *exc):
        del self.model.forward  # the class's own forward again

    def force(self, last):
        """last (n, V): this call's next-token logits, edited in place."""
        t, n = self.calls, len(last)
        self.calls += 1
        last[:, STOP] = float("-inf")
        if t == 0:  # the prefill: a row per prompt (ours) or per sample (transformers), none stops at its first token
            return
        rows = self.running if n == len(self.running) else range(len(self.lengths))
        assert len(rows) == n, f"call {t}: {n} rows, {len(self.running)} running"
        ending = [i for i, r in enumerate(rows) if r in self.running and self.lengths[r] == t + 1]
        last[ending, STOP] = last[ending].max(-1).values + 50.0  # then it is drawn: the others hold < 1e-20
        ended = {rows[i] for i in ending}
        self.running = [r for r in self.running if r not in ended]


def bench_realistic(bench, args, gen, results):
    layers = args.realistic_layers
    print(f"\nrealistic round: {P} chat prompts of 100-300 tokens, K={K} samples (T=1, top-p 0.95, at most {NEW} "
          f"new tokens, stops as scheduled), SmolLM2-135M's widths with {layers} layers (policy, student) and "
          f"360M's (teacher); repeats {args.realistic_repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        shape = dict(bench.SMOLLM2_135M, num_hidden_layers=layers)
        lm, hf = bench.load_pair(bench.make_checkpoint(os.path.join(tmp, "policy"), args.seed, shape))
        student, hf_student = bench.load_pair(bench.make_checkpoint(os.path.join(tmp, "student"), args.seed + 1, shape,
                                                                    reward=True), True)
        teacher, hf_teacher = bench.load_pair(bench.make_checkpoint(
            os.path.join(tmp, "teacher"), args.seed + 2, dict(bench.SMOLLM2_360M, num_hidden_layers=layers), reward=True), True)
    V = lm.config.vocab_size
    prompts = chat_prompts(P, 100, 300, gen, V)
    lengths = stop_lengths(P * K, NEW, args.seed)
    q = statistics.quantiles(lengths, n=4)
    kept = sum(lengths) / (P * K * max(lengths))
    print(f"  stop schedule: quartiles {q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f} tokens (of those that stop: "
          f"{' / '.join(f'{x:.0f}' for x in statistics.quantiles([n for n in lengths if n < NEW], n=4))}), "
          f"{sum(n == NEW for n in lengths)} of {P * K} cut at {NEW}; kept share of row-steps {kept:.3f}")
    results["realistic kept share"] = kept
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-7, fused=True) for m in (lm, hf, student, hf_student)}

    # ---- the two sides' steps -------------------------------------------------------------------
    def ours_sample():
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(P)]
        with StopSchedule(lm, lengths):
            return generate(lm, prompts, NEW, temperature=1.0, top_p=0.95, eos_token_id=STOP, generator=gens, num_samples=K)

    def theirs_sample():
        with StopSchedule(hf, lengths):
            out = bench.hf_generate(hf, prompts, NEW, stop=STOP, do_sample=True, temperature=1.0, top_k=0, top_p=0.95,
                                    num_return_sequences=K)
        rows = out[:, -(out.shape[1] - max(map(len, prompts))):].tolist()
        return [r[:r.index(STOP) + 1] if STOP in r else r for r in rows]

    def ours_score(rm, rows, keys):
        return train_loop.reward_scores(rm, rows, PAD, 64, groups=keys)

    def theirs_score(hf_rm, rows, keys=None):
        return bench.scores(lambda ids, mask: hf_rm(input_ids=ids, attention_mask=mask).logits[:, 0], rows, 64)

    def ours_dpo(triples):
        ref_c, ref_r = train_loop.reference_logprobs(lm, triples, PAD, batch_size=2 * P)
        batch = data.policy_batch([p for p, _, _ in triples] * 2, [c for _, c, _ in triples] + [r for _, _, r in triples],
                                  PAD, groups=list(range(len(triples))) * 2)  # a pair's prompt computed once
        lm.train()
        logp, _ = train_loop.response_logprobs(lm, batch)
        dpo_step(lm, logp, ref_c, ref_r)
        lm.eval()

    def theirs_dpo(triples):  # how peer trainers write it: full logits, log-softmax, gather, mask, sum
        batch = data.policy_batch([p for p, _, _ in triples] * 2, [c for _, c, _ in triples] + [r for _, _, r in triples], PAD)
        with torch.no_grad():
            ref = hf_logps(batch)
        hf.train()
        dpo_step(hf, hf_logps(batch), ref[:len(triples)], ref[len(triples):])
        hf.eval()

    def hf_logps(batch):
        ids, mask, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        return (logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]).sum(-1)

    def dpo_step(model, logp, ref_c, ref_r):
        n = len(ref_c)
        losses.dpo_loss(logp[:n], logp[n:], ref_c, ref_r)[0].mean().backward()
        opts[model].step()
        opts[model].zero_grad(set_to_none=True)

    def student_step(rm, pairs, ours):
        rows = [c for c, _ in pairs] + [r for _, r in pairs]
        rm.train()
        if ours:
            r = train_loop.rewards(rm, rows, PAD, list(range(len(pairs))) * 2, "cpu")  # as train_reward does
        else:
            ids, mask = data.pad(rows, PAD)
            r = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
        losses.ranking_loss(r[:len(pairs)], r[len(pairs):])[0].mean().backward()
        opts[rm].step()
        opts[rm].zero_grad(set_to_none=True)
        rm.eval()

    def mine(samples, s, t):
        """Per prompt the student's best and worst, ordered by the teacher: (prompt, chosen, rejected) ids."""
        out = []
        for i in range(P):
            b, w = best_worst(s, i)
            c, r = (b, w) if t[2 * i] >= t[2 * i + 1] else (w, b)
            out.append((prompts[i], samples[c], samples[r]))
        return out

    def best_worst(s, i):
        g = s[i * K:(i + 1) * K]
        return i * K + int(g.argmax()), i * K + int(g.argmin())

    def one_round(ours):
        with torch.no_grad():
            samples = ours_sample() if ours else theirs_sample()
            rows = [prompts[i // K] + x for i, x in enumerate(samples)]
            keys = [i // K for i in range(P * K)]
            s = (ours_score(student, rows, keys) if ours else theirs_score(hf_student, rows))
            two = [j for i in range(P) for j in best_worst(s, i)]
            t = (ours_score(teacher, [rows[j] for j in two], [j // K for j in two]) if ours
                 else theirs_score(hf_teacher, [rows[j] for j in two]))
        triples = mine(samples, s, t)
        (ours_dpo if ours else theirs_dpo)(triples)
        student_step(student if ours else hf_student, [(p + c, p + r) for p, c, r in triples], ours)

    # ---- the cases ------------------------------------------------------------------------------
    samples = ours_sample()  # the rows the scoring and DPO cases use (and a warm-up of our sampler)
    assert [len(x) for x in samples] == lengths, "the schedule did not decide the lengths"
    rows = [prompts[i // K] + x for i, x in enumerate(samples)]
    keys = [i // K for i in range(P * K)]
    two = [j for i in range(P) for j in (i * K, i * K + 1 + i % (K - 1))]
    triples = [(prompts[j // K], samples[j], samples[k]) for j, k in zip(two[::2], two[1::2])]
    R = args.realistic_repeats
    if {"sampling", "round"} & set(args.realistic_cases.split(",")):
        theirs_sample()  # a warm-up of transformers' sampler
    cases = {  # name: (ours, theirs, rate unit, warm-up needed: the samplers ran above, the round uses them)
        "sampling": ("sampling K=8", ours_sample, theirs_sample, (sum(lengths), "tok/s"), False),
        "student": ("student scores 64", lambda: ours_score(student, rows, keys), lambda: theirs_score(hf_student, rows),
                    None, True),
        "teacher": ("teacher scores 16", lambda: ours_score(teacher, [rows[j] for j in two], [j // K for j in two]),
                    lambda: theirs_score(hf_teacher, [rows[j] for j in two]), None, True),
        "dpo": ("dpo step (+ref)", lambda: ours_dpo(triples), lambda: theirs_dpo(triples), None, True),
        "round": ("whole round", lambda: one_round(True), lambda: one_round(False), None, False),
    }
    for case in args.realistic_cases.split(","):
        name, ours, theirs, unit, warm = cases[case]
        if warm:
            ours(), theirs()
        t_o, t_t = bench.alternate(R, ours, theirs)
        results[f"realistic {name}"] = bench.report(name, t_o, t_t, unit)
    # Grouping by length: our scorer sorts prompts (with their K rows) by packed length before it cuts
    # batches of 64 rows; here 64 rows are one batch on both sides, so transformers' batches are already ours.
    print("  (scoring: 64 rows are one batch of 64 on both sides, so sorting by length changes no batch; the "
          "ratio is the prompt computed once and the projections on real tokens only)")
