"""
How responses are judged: reward models and LLM judges (`Scorer`), and the held-out evaluation built on them.

A `Scorer` (the student, the teacher, an independent judge) gets the *text* of a response and tokenises it
with its own tokenizer and prompt format; with judge=True it is a causal LM asked which of two is better.
The evaluation of a round, on held-out prompts that never enter training:
  win rate vs base   the greedy answer (and 4 samples) against the base policy's, judged by the default
                     world's oracle, an independent --judge, or else the teacher; ties count half
  agreement          how often the student orders a fixed set of held-out teacher-ordered pairs as the
                     teacher did: the distillation the paper claims
  oracle metrics     in the default world: the oracle's score of the answers, and how often the teacher,
                     the student and the round's mined pairs are right by it
"""
import math
import time
from dataclasses import dataclass
from functools import partial

import torch

import data
import train_loop
from checkpoint import load_model
from model import add_reward_head

# ---- Reward models and LLM judges ----------------------------------------------------------------

JUDGE_TEMPLATE = ("Which response to the instruction is better?\n\nInstruction: {prompt}\n\nResponse A: {a}\n\n"
                  "Response B: {b}\n\nAnswer with the letter of the better response, A or B.")


@dataclass
class Scorer:
    m: torch.nn.Module   # a model.RewardModel or encoder.EncoderRewardModel, or with judge=True a model.CausalLM
    tok: object          # its tokenizers.Tokenizer
    fmt: str             # its prompt format (data.FORMATS), or "pair" for an encoder (data.pair_ids)
    eos: int | None      # the token a finished response ends with, for this model (an encoder: None)
    pad: int
    judge: bool = False
    min_mass: float = 0.1  # a judge whose two labels get less probability than this gave an invalid answer

    def ids(self, prompt, response, finished):  # one row, formatted and tokenised for this model
        if self.fmt == "pair":  # an encoder: the bare pair, whether or not the response finished
            return data.pair_ids(self.tok, prompt, response, self.m.config.max_positions)
        return data.reward_ids(self.tok, self.fmt, prompt, response, finished, self.eos)

    def score(self, prompts, responses, finished):  # reward of each (prompt, response text, finished), (N,)
        rows = [self.ids(*x) for x in zip(prompts, responses, finished)]
        return train_loop.reward_scores(self.m, rows, self.pad, groups=prompts)  # a prompt computed once

    def margins(self, prompts, firsts, seconds):
        """How much it prefers each first data.Sample over its second, (N,) on the CPU, 2 calls a pair: a reward
        model scores both; a judge is asked in both orders (disagreeing: a tie, 0; NaN: an invalid answer)."""
        n = len(prompts)
        if not self.judge:
            s = self.score(prompts * 2, [a.text for a in firsts] + [b.text for b in seconds],
                           [a.finished for a in firsts] + [b.finished for b in seconds])
            return s[:n] - s[n:]
        a, b = [x.text for x in firsts], [x.text for x in seconds]
        p1 = self.compare(prompts, a, b)      # P(first better), asked with it first
        p2 = 1 - self.compare(prompts, b, a)  # the same, asked with it second
        margin = (p1 + p2) / 2 - 0.5
        return torch.where((p1 > 0.5) != (p2 > 0.5), torch.zeros_like(margin), margin)  # NaN stays NaN

    def tournament(self, prompt, texts):
        """A judge's scores of n responses to one prompt: each asked against each other in both orders
        (n(n-1) calls), a response's score its share of the wins. -> (scores (n,), calls)."""
        n = len(texts)
        order = [(i, j) for i in range(n) for j in range(n) if i != j]
        p = self.compare([prompt] * len(order), [texts[i] for i, _ in order], [texts[j] for _, j in order])
        wins = torch.zeros(n)
        for (i, j), pi in zip(order, p.tolist()):
            if not math.isnan(pi):  # an invalid answer gives no one the win
                wins[i] += pi
                wins[j] += 1 - pi
        return wins / (2 * (n - 1)), len(order)

    @torch.no_grad()
    def compare(self, prompts, first, second):
        """LLM judge: P(first is better) from the next-token probabilities of the labels "A" and "B",
        (N,) on the CPU, NaN where the two labels get less than min_mass (an invalid answer)."""
        label_ids = [self.tok.encode(x, add_special_tokens=False).ids[0] for x in ("A", "B")]
        rows = [data.encode_prompt(self.tok, self.fmt, JUDGE_TEMPLATE.format(prompt=p, a=a, b=b))
                for p, a, b in zip(prompts, first, second)]
        dev, out = next(self.m.parameters()).device, []
        for s in range(0, len(rows), 16):  # rows of one prompt share the ids they have in common (data.pack)
            b = {k: v.to(dev) for k, v in data.pack(rows[s:s + 16], self.pad, prompts[s:s + 16]).items()}
            last = data.last_index(b, rows[s:s + 16])
            probs = self.m(b["input_ids"], b["attention_mask"], select=last, branch=b["branch"]).float().softmax(-1).cpu()
            pa, pb = probs[:, label_ids[0]], probs[:, label_ids[1]]
            out.append(torch.where(pa + pb < self.min_mass, torch.full_like(pa, float("nan")), pa / (pa + pb)))
        return torch.cat(out)


def load_scorer(path, fmt, device=None, judge=False, min_mass=0.1, reward_head=False):
    """A checkpoint with its tokenizer and prompt format as a Scorer: a reward model, or with judge=True a
    causal LM; with reward_head=True a causal LM gets a fresh scalar head (a student to train)."""
    m = load_model(path, device)
    if judge and m.config.reward:
        raise ValueError(f"{path} is a reward model; an LLM judge must be a causal LM")
    if not judge and not m.config.reward:
        if not reward_head:
            raise ValueError(f"{path} is a causal LM, not a reward model (use --teacher-judge for an LLM judge)")
        m = add_reward_head(m)
    tok = data.load_tokenizer(path)
    if m.config.encoder:  # it reads the pair encoding ("pair"): no prompt format, no stop token
        post = tok.post_processor
        if post is None or post.num_special_tokens_to_add(True) == 0:
            raise ValueError(f"tokenizer.json in {path} has no post-processor that builds pairs; an encoder reward "
                             f"model reads its tokenizer's pair encoding, e.g. [CLS] prompt [SEP] response [SEP]")
        tok.no_truncation()  # data.pair_ids truncates, by its own rule; data.pad pads
        tok.no_padding()
        return Scorer(m, tok, "pair", None, data.pad_id(m.config), judge, min_mass)
    data.check_format(tok, fmt)
    return Scorer(m, tok, fmt, data.end_id(tok, fmt, m.config), data.pad_id(m.config), judge, min_mass)


# ---- Win rate against the base policy ------------------------------------------------------------

@dataclass
class Evaluator:
    """Judges held-out answers against the base policy's: by the oracle (the default world), an
    independent --judge, or the teacher (name says which)."""
    name: str
    oracle: object = None
    judge: Scorer = None

    def outcomes(self, prompts, ours, base):
        """Per pair of data.Samples: 1 win, 0.5 tie, 0 loss (an invalid judge answer counts as a tie)."""
        if self.oracle is not None:
            a = [oracle_score(self.oracle, p, s) for p, s in zip(prompts, ours)]
            b = [oracle_score(self.oracle, p, s) for p, s in zip(prompts, base)]
            return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
        out = [0.5] * len(prompts)  # the same response twice is a tie, without asking
        ask = [i for i, (x, y) in enumerate(zip(ours, base)) if (x.text, x.finished) != (y.text, y.finished)]
        if ask:
            margins = self.judge.margins([prompts[i] for i in ask], [ours[i] for i in ask], [base[i] for i in ask])
            for i, m in zip(ask, margins.tolist()):
                out[i] = 0.5 if math.isnan(m) or m == 0 else 1.0 if m > 0 else 0.0
        return out

    def against_base(self, prompts, answers, base):
        """Outcomes of (greedy, samples) answers against the base's, per prompt: (greedy outcome, [sample outcomes])."""
        greedy = self.outcomes(prompts, [g for g, _ in answers], [g for g, _ in base])
        flat = self.outcomes([p for p, (_, s) in zip(prompts, answers) for _ in s],
                             [x for _, s in answers for x in s], [x for _, s in base for x in s])
        n = len(answers[0][1]) if answers else 0
        return [(g, flat[i * n:(i + 1) * n]) for i, g in enumerate(greedy)]


def oracle_score(oracle, prompt, sample):
    """The default world's oracle on a data.Sample: a truncated response scores 0, as it never answered."""
    return oracle(prompt, sample.text) if sample.finished else 0.0


def win_stats(outcomes, prefix):
    n = len(outcomes)
    avg = sum(outcomes) / n
    sd = math.sqrt(sum((o - avg) ** 2 for o in outcomes) / max(1, n - 1))
    return {prefix: avg, prefix.replace("win_rate", "win_rate_stderr"): sd / math.sqrt(n),
            prefix.replace("win_rate", "wins"): sum(o == 1.0 for o in outcomes),
            prefix.replace("win_rate", "ties"): sum(o == 0.5 for o in outcomes),
            prefix.replace("win_rate", "losses"): sum(o == 0.0 for o in outcomes)}


def mean(xs):
    return sum(xs) / len(xs) if xs else None  # None (null in metrics.jsonl): a mean over nothing


# ---- A round's metrics ---------------------------------------------------------------------------

def student_agrees(student, pairs):
    """For each pair (a data.Pair, the teacher's choice first): does the student order it the same way?"""
    s = student.score([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                      [p.chosen_finished for p in pairs] + [p.rejected_finished for p in pairs])
    return (s[:len(pairs)] > s[len(pairs):]).tolist()


def held_out_metrics(evaluator, student, prompts, answers, base, agreement_pairs, oracle=None, block=64):
    """Win rates against the base, length, student-teacher agreement and, with an oracle, its metrics.
    answers, base: per held-out prompt, (greedy data.Sample, [data.Sample] of samples)."""
    outcomes = train_loop.spread(evaluator.against_base, prompts, answers, base, block=block)
    greedy = [g for g, _ in answers]
    m = {"win_rate_judge": evaluator.name}
    m.update(win_stats([g for g, _ in outcomes], "win_rate_vs_base"))
    m.update(win_stats([x for _, s in outcomes for x in s], "win_rate_vs_base_sampled"))
    m["policy_len"] = sum(len(s.ids) for s in greedy) / len(greedy)
    with train_loop.gathered(student.m):
        agrees = train_loop.spread(partial(student_agrees, student), agreement_pairs, block=64)
    m["student_teacher_agreement"] = mean(agrees)
    if oracle is not None:  # the default world's; on the pairs it tells apart, are teacher and student right?
        scores = [oracle_score(oracle, p, s) for p, s in zip(prompts, greedy)]
        m["oracle_reward"], m["oracle_exact"] = mean(scores), mean([x == 1.0 for x in scores])
        both = [(oracle(p.prompt, p.chosen), oracle(p.prompt, p.rejected)) for p in agreement_pairs]
        decided = [i for i, (c, r) in enumerate(both) if c != r]
        m["teacher_oracle_accuracy"] = mean([both[i][0] > both[i][1] for i in decided])
        m["student_oracle_accuracy"] = mean([agrees[i] == (both[i][0] > both[i][1]) for i in decided])
    return m


def pair_metrics(prompts, samples, mined, k, selection, teacher_judge, oracle=None):
    """What a round's mining did: pairs kept and dropped, teacher calls against scoring all K, lengths."""
    pairs = mined.pairs
    m = {"prompts": len(prompts), "pairs": len(pairs), "pairs_dropped": mined.dropped,
         "teacher_calls": mined.teacher_calls, "selection": selection,
         "teacher_calls_if_scoring_all": len(prompts) * k * (k - 1 if teacher_judge else 1),
         "teacher_overturn_rate": mined.overturned / max(1, len(pairs)) if selection == "ts-align" else None,
         "truncation_rate": sum(not s.finished for g in samples for s in g) / (len(prompts) * k),
         "chosen_len": mean([len(p.chosen_ids) for p in pairs]),
         "rejected_len": mean([len(p.rejected_ids) for p in pairs]),
         "chosen_longer_share": mean([len(p.chosen_ids) > len(p.rejected_ids) for p in pairs])}
    if oracle is not None:  # the early warning of over-optimisation: are the mined pairs still right?
        both = [(oracle(p.prompt, p.chosen), oracle(p.prompt, p.rejected)) for p in pairs]
        m["pairs_oracle_accuracy"] = mean([c > r for c, r in both if c != r])
    return m


def train_metrics(trained):
    """The round's training results (run_round's) as metrics, with the bytes of weights and AdamW state each
    process held (under --fsdp, its shards)."""
    m = {"student_loss": trained["student"]["loss"]} if "student" in trained else {}
    if "policy" in trained:
        dpo = trained["policy"]
        m.update(dpo_loss=dpo["dpo_loss"], dpo_reward_accuracy=dpo["reward_accuracy"],
                 dpo_reward_margin=dpo["reward_margin"], dpo_first_loss=dpo["dpo_first_loss"])
    m["bytes_per_process"] = {f"{name}_{kind}": t[f"{kind}_bytes"] for name, t in trained.items()
                              for kind in ("param", "optimizer")}
    return m


class Clock:
    """Wall-clock seconds per phase: lap(name) adds the time since the last lap to name, and returns it."""

    def __init__(self):
        self.t, self.seconds = time.time(), {}

    def lap(self, name):
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now
        return self.seconds[name]
