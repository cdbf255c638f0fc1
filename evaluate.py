"""
The evaluation of a round, on held-out prompts that never enter training:
  win rate vs base  the greedy answer (and 4 samples) against the base policy's, judged by the
                    world's oracle, an independent --judge, or else the teacher; ties count half
  agreement         how often the student orders held-out teacher-ordered pairs as the teacher
                    did: the distillation the paper claims
  oracle metrics    in the default world: the oracle's score of the answers, and how often the
                    teacher, the student and the round's mined pairs are right by it
"""
import math
import time
from dataclasses import dataclass

from data import Sample

# ---- Win rate against the base policy ------------------------------------------------------------

@dataclass
class Evaluator:
    """Judges held-out answers against the base policy's: the oracle, a --judge or the teacher."""
    name: str
    oracle: object = None
    judge: object = None  # a roles.Scorer

    def outcomes(self, prompts, ours, base, block=64):
        """Per pair of data.Samples: 1 win, 0.5 tie (an invalid judge answer too), 0 loss."""
        if self.oracle is not None:
            return [outcome(oracle_score(self.oracle, p, x) - oracle_score(self.oracle, p, y))
                    for p, x, y in zip(prompts, ours, base)]
        # the same response twice is a tie, without asking (margin None)
        asked = [None if (x.text, x.finished) == (y.text, y.finished) else x
                 for x, y in zip(ours, base)]
        return [outcome(m) for m in self.judge.margins_each(prompts, asked, base, block)]

    def against_base(self, prompts, answers, base, block=64):
        """Per prompt, (greedy outcome, [sample outcomes]) of (greedy, samples) answers against the
        base's; a judge gets the pairs of `block` prompts in one batch."""
        greedy = self.outcomes(prompts, [g for g, _ in answers], [g for g, _ in base], block)
        n = len(answers[0][1]) if answers else 1
        flat = self.outcomes([p for p, (_, s) in zip(prompts, answers) for _ in s],
                             [x for _, s in answers for x in s], [x for _, s in base for x in s],
                             n * block)
        return [(g, flat[i * n:(i + 1) * n]) for i, g in enumerate(greedy)]


def outcome(margin):
    """A margin of ours over the base's as 1 win, 0 loss, 0.5 a tie (also no answer: NaN, None)."""
    if margin is None or math.isnan(margin) or margin == 0:
        return 0.5
    return 1.0 if margin > 0 else 0.0


def oracle_score(oracle, prompt, sample):
    """The default world's oracle on a data.Sample: a truncated response scores 0 (no answer)."""
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
    """Per data.Pair (the teacher's choice first): does the student order it the same way?"""
    chosen = [Sample(None, p.chosen, p.chosen_finished) for p in pairs]
    rejected = [Sample(None, p.rejected, p.rejected_finished) for p in pairs]
    margins = student.margins_each([p.prompt for p in pairs], chosen, rejected, block=64)
    return [m > 0 for m in margins]


def held_out_metrics(evaluator, student, prompts, answers, base, agreement_pairs, oracle=None,
                     block=64):
    """Win rates against the base, length, student-teacher agreement and the oracle's metrics.
    answers, base: per held-out prompt, (greedy data.Sample, [data.Sample] of samples)."""
    outcomes = evaluator.against_base(prompts, answers, base, block)
    greedy = [g for g, _ in answers]
    m = {"win_rate_judge": evaluator.name}
    m.update(win_stats([g for g, _ in outcomes], "win_rate_vs_base"))
    m.update(win_stats([x for _, s in outcomes for x in s], "win_rate_vs_base_sampled"))
    m["policy_len"] = sum(len(s.ids) for s in greedy) / len(greedy)
    agrees = student_agrees(student, agreement_pairs)
    m["student_teacher_agreement"] = mean(agrees)
    if oracle is not None:  # the default world's: on the pairs it tells apart, who is right?
        scores = [oracle_score(oracle, p, s) for p, s in zip(prompts, greedy)]
        m["oracle_reward"], m["oracle_exact"] = mean(scores), mean([x == 1.0 for x in scores])
        both = [(oracle(p.prompt, p.chosen), oracle(p.prompt, p.rejected)) for p in agreement_pairs]
        decided = [i for i, (c, r) in enumerate(both) if c != r]
        m["teacher_oracle_accuracy"] = mean([both[i][0] > both[i][1] for i in decided])
        m["student_oracle_accuracy"] = mean([agrees[i] == (both[i][0] > both[i][1])
                                             for i in decided])
    return m


def pair_metrics(prompts, samples, mined, k, selection, teacher_judge, oracle=None):
    """What a round's mining did: pairs kept and dropped, teacher calls (against all K), lengths."""
    pairs = mined.pairs
    m = {"prompts": len(prompts), "pairs": len(pairs), "pairs_dropped": mined.dropped,
         "teacher_calls": mined.teacher_calls, "selection": selection,
         "teacher_calls_if_scoring_all": len(prompts) * k * (k - 1 if teacher_judge else 1),
         "teacher_overturn_rate": None,
         "truncation_rate": sum(not s.finished for g in samples for s in g) / (len(prompts) * k),
         "chosen_len": mean([len(p.chosen_ids) for p in pairs]),
         "rejected_len": mean([len(p.rejected_ids) for p in pairs]),
         "chosen_longer_share": mean([len(p.chosen_ids) > len(p.rejected_ids) for p in pairs])}
    if selection == "ts-align":
        m["teacher_overturn_rate"] = mined.overturned / max(1, len(pairs))
    if oracle is not None:  # the early warning of over-optimisation: are the mined pairs right?
        both = [(oracle(p.prompt, p.chosen), oracle(p.prompt, p.rejected)) for p in pairs]
        m["pairs_oracle_accuracy"] = mean([c > r for c, r in both if c != r])
    return m


def train_metrics(trained):
    """run_round's training results as metrics, and bytes of weights and AdamW state per process."""
    m = {"student_loss": trained["student"]["loss"]} if "student" in trained else {}
    if "policy" in trained:
        dpo = trained["policy"]
        m.update(dpo_loss=dpo["dpo_loss"], dpo_reward_accuracy=dpo["reward_accuracy"],
                 dpo_reward_margin=dpo["reward_margin"], dpo_first_loss=dpo["dpo_first_loss"])
    m["bytes_per_process"] = {f"{name}_{kind}": t[f"{kind}_bytes"] for name, t in trained.items()
                              for kind in ("param", "optimizer")}
    return m


class Clock:
    """Seconds per phase: lap(name) adds the time since the last lap to name; returns its sum."""

    def __init__(self):
        self.t, self.seconds = time.time(), {}

    def lap(self, name):
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now
        return self.seconds[name]
