"""
TS-Align (Zhang et al., 2024): align a policy with a small student and a large teacher reward model.

Each round, on fresh prompts and with the newest policy (on-policy):
  1. the policy samples K responses per prompt;
  2. the small student scores all K, and keeps its best and worst;
  3. the large teacher scores only those two, and its verdict orders them into a preference pair
     (prompt, chosen, rejected): 2 teacher calls per prompt instead of K;
  4. pairs that teach nothing are dropped (too few finished, identical texts, a tiny margin);
  5. the student learns the teacher's pairs with the pairwise ranking loss, replaying earlier
     rounds' pairs so it keeps what it knew (our reading of the paper's multi-task adapters);
  6. the policy learns the pairs with DPO, the policy at the start of the round as reference.
Then held-out evaluation (evaluate.py), and the round is saved (run.py). The roles (roles.py) sample
and score, sharing each step's blocks of prompts out under torchrun (parallel.py).

    python tsalign.py --rounds 3          # the embedded default world (world.py), offline
    python tsalign.py --rounds 3 --policy DIR --student DIR --teacher DIR --prompts FILE \\
        --prompt-format chatml            # real checkpoints (the options: config.py)
    torchrun --standalone --nproc_per_node 8 tsalign.py ...   # the same run, over 8 processes

Shapes: P prompts, K samples per prompt.
"""
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, replace

import torch

import config
import evaluate
import model
import parallel
import run
import runlock
import train_loop
from checkpoint import load_model
from data import Pair

# ---- One round, step by step ---------------------------------------------------------------------

def candidates(group, repeats=False):
    """A prompt's finished responses (a truncated one never competes), each text once, or with
    repeats all of them (teacher-all, as RLHFlow's iterative DPO). None under two distinct texts."""
    done = [s for s in group if s.finished]
    first = {}
    for s in done:
        first.setdefault(s.text, s)
    if len(first) < 2:
        return None
    return done if repeats else list(first.values())


@dataclass
class Ranked:
    """A prompt's candidates ranked: best and worst index its candidates."""
    best: int
    worst: int
    margin: float             # how much the last ranker prefers best (NaN: no valid answer)
    calls: int = 0            # teacher calls spent on this prompt
    overturned: bool = False  # the teacher reversed the student's order


def best_and_worst(scores, calls=0):
    b, w = int(scores.argmax()), int(scores.argmin())
    return Ranked(b, w, (scores[b] - scores[w]).item(), calls)


def length_penalised(scores, cands, length_penalty):
    """A ranker's scores minus length_penalty x each response's token count (its stop token
    included), as RLHFlow's len_penalty does before it picks a pair: longer must also be better."""
    lengths = torch.tensor([len(c.ids) for c in cands], dtype=scores.dtype)
    return scores - length_penalty * lengths


def student_ranks(student, prompts, pools, length_penalty=0.0, block=64):
    """2. The student scores every candidate, a block of prompts in one batch (less length_penalty
    per token, --student-length-penalty): a Ranked per prompt, None where it has no candidates."""
    scores = student.scores_each(prompts, pools, block)
    return [None if s is None else best_and_worst(length_penalised(s, pool, length_penalty))
            for s, pool in zip(scores, pools)]


def teacher_decides(teacher, prompts, pools, ranked, length_penalty=0.0, block=64):
    """3. The teacher scores only the student's best and worst (2 calls), reversing them where it
    prefers the worst; the margin is its own, less length_penalty per token best has over worst."""
    live = [i for i, r in enumerate(ranked) if r is not None and r.best != r.worst]
    firsts, seconds = [None] * len(ranked), [None] * len(ranked)
    for i in live:
        firsts[i], seconds[i] = pools[i][ranked[i].best], pools[i][ranked[i].worst]
    margins = teacher.margins_each(prompts, firsts, seconds, block)
    m = torch.tensor([margins[i] for i in live])
    if length_penalty:  # (s_b - lambda |b|) - (s_w - lambda |w|)
        longer = [len(firsts[i].ids) - len(seconds[i].ids) for i in live]
        m = m - length_penalty * torch.tensor(longer, dtype=m.dtype)
    out = list(ranked)
    for i, mi in zip(live, m.tolist()):
        b, w = ranked[i].best, ranked[i].worst
        out[i] = Ranked(w, b, -mi, 2, overturned=True) if mi < 0 else Ranked(b, w, mi, 2)
    return out


@dataclass
class Mined:
    """What a round's mining gave: the pairs (in prompt order), and what was dropped and why."""
    pairs: list
    dropped: dict
    teacher_calls: int
    overturned: int  # kept pairs whose order the teacher reversed from the student's


def keep_pairs(prompts, samples, pools, ranked, min_margin):
    """4. A pair per prompt, unless under two responses finished, they are one text or one score,
    the judge's answer was invalid, or the margin is below min_margin (or 0); counted by reason."""
    dropped = dict.fromkeys(("too_few_finished", "identical", "low_margin", "invalid_judge"), 0)
    pairs, overturned = [], 0
    for prompt, group, pool, r in zip(prompts, samples, pools, ranked):
        if r is None:
            dropped["too_few_finished" if sum(s.finished for s in group) < 2 else "identical"] += 1
        elif r.best == r.worst:
            dropped["identical"] += 1
        elif math.isnan(r.margin):
            dropped["invalid_judge"] += 1
        elif r.margin < min_margin or r.margin == 0:
            dropped["low_margin"] += 1
        else:
            c, rej = pool[r.best], pool[r.worst]
            pairs.append(Pair(prompt, c.text, rej.text, c.finished, rej.finished, r.margin, c.ids,
                              rej.ids))
            overturned += r.overturned
    calls = sum(r.calls for r in ranked if r is not None)
    return Mined(pairs, dropped, calls, overturned)


def train_student(student, pairs, training, lora_rank=0, margin=0.0):
    """5. The ranking loss on the teacher's pairs, in the student's own format (a TrainConfig)."""
    rows = [(student.ids(p.prompt, p.chosen, p.chosen_finished),
             student.ids(p.prompt, p.rejected, p.rejected_finished)) for p in pairs]
    if lora_rank:
        model.add_lora(student.model, lora_rank)
    metrics = train_loop.train_reward(student.model, rows, student.pad, training, margin)
    if lora_rank:
        model.merge_lora(student.model)
    return metrics


def train_policy(policy, pairs, training, dpo, lora_rank=0, reference=None):
    """6. DPO (dpo: a config.DPO) on the round's pairs, on the policy's own token ids, against the
    round-start policy (reference None) or the given model (--reference sft: the original)."""
    triples = [(policy.encode(p.prompt), p.chosen_ids, p.rejected_ids) for p in pairs]
    if reference is not None:
        reference = train_loop.reference_logprobs(reference, triples, policy.pad,
                                                  average=dpo.average)
    if lora_rank:
        model.add_lora(policy.model, lora_rank)
    metrics = train_loop.train_dpo(policy.model, triples, policy.pad, training, reference=reference,
                                   **asdict(dpo))
    if lora_rank:  # adapters off is then exactly this round's result; fresh ones next round
        model.merge_lora(policy.model)
    return metrics


def run_round(r, prompts, setup, cfg, replay):
    """One round of TS-Align on fresh prompts (setup: run.Setup; cfg: a RoundConfig), training the
    policy and the student in place. -> the samples, Mined pairs, training metrics, seconds."""
    policy, student, teacher = setup.policy, setup.student, setup.teacher
    clock, block = evaluate.Clock(), cfg.sample_batch
    seeds = [seed_for(cfg.seed, r, "sample", i) for i in range(len(prompts))]
    samples = policy.sample(prompts, seeds, cfg.k, cfg.sampling, block, f"round {r}: sample")  # 1.
    pools = [candidates(g, repeats=cfg.selection == "teacher-all") for g in samples]
    clock.lap("sample")
    if cfg.selection == "teacher-all":  # the baseline: the teacher scores every candidate itself
        ranked = teacher_ranks_all(teacher, prompts, pools, cfg.length_penalty, block)
        clock.lap("teacher_score")
    else:
        ranked = student_ranks(student, prompts, pools, cfg.student_length_penalty, block)  # 2.
        clock.lap("student_score")
        # 3. (student-only, the other baseline, keeps the student's order)
        if cfg.selection == "ts-align":
            ranked = teacher_decides(teacher, prompts, pools, ranked, cfg.length_penalty, block)
            clock.lap("teacher_score")
    mined = keep_pairs(prompts, samples, pools, ranked, cfg.min_margin)  # 4.
    trained, seed = {}, seed_for(cfg.seed, r, "train")
    # 5. (student-only: without a teacher the student has nothing new to learn)
    if mined.pairs and cfg.selection != "student-only":
        training = replace(cfg.student_train, seed=seed, desc=f"round {r}: student")
        trained["student"] = train_student(student, replay + mined.pairs, training,
                                           cfg.student_lora_rank, cfg.student_margin)
        clock.lap("student_train")
    if mined.pairs:  # 6.
        training = replace(cfg.policy_train, seed=seed, desc=f"round {r}: policy (DPO)")
        reference = load_model(cfg.reference_dir, setup.device) if cfg.reference_dir else None
        trained["policy"] = train_policy(policy, mined.pairs, training, cfg.dpo, cfg.lora_rank,
                                         reference)
        clock.lap("policy_train")
    return samples, mined, trained, clock.seconds


def seed_for(seed, r, purpose, i=None):
    """Every random choice derives from --seed, the round, its purpose (and a prompt's index i, for
    its own sampling stream), so a resumed run, or a run on any number of processes, repeats it."""
    purposes = {"prompts": 1, "sample": 2, "eval": 3, "warmup": 4, "train": 5}
    base = (seed * 1_000_003 + r * 7_919 + purposes[purpose]) % 2**62
    return base if i is None else (base * 1_000_003 + i) % 2**62


# ---- The baselines the paper compares with; the pairs the teacher orders outside the rounds ---

def teacher_ranks_all(teacher, prompts, pools, length_penalty=0.0, block=64):
    """Teacher-all, instead of steps 2-3: the teacher scores every candidate, its best and worst the
    pair (a reward model: K calls, less length_penalty a token; a judge: K(K-1), share of wins)."""
    out = []
    for pool, s in zip(pools, teacher.scores_each(prompts, pools, block, batched=False)):
        if pool is None:
            out.append(None)
        elif teacher.judge:
            out.append(best_and_worst(s, len(pool) * (len(pool) - 1)))
        else:
            out.append(best_and_worst(length_penalised(s, pool, length_penalty), len(pool)))
    return out


def teacher_orders(teacher, prompts, responses, min_margin=0.0):
    """The teacher orders the two responses (data.Samples) of each prompt into a pair (step 3), as
    in step 4 leaving out ties, invalid judge answers and margins below min_margin."""
    ranked = teacher_decides(teacher, prompts, responses, [Ranked(0, 1, 0.0)] * len(responses))
    pairs = keep_pairs(prompts, responses, responses, ranked, min_margin).pairs
    # these train and test the student only, which reads text
    return [replace(p, chosen_ids=None, rejected_ids=None) for p in pairs]


def held_out_answers(setup, cfg, r):
    """The policy's answers to the held-out prompts in round r: (greedy, [4 samples]) per prompt."""
    seeds = [seed_for(cfg.seed, r, "eval", i) for i in range(len(setup.eval_prompts))]
    return setup.policy.answer(setup.eval_prompts, seeds, cfg.sampling, cfg.sample_batch,
                               f"round {r}: evaluation")


def held_out_metrics(setup, cfg, answers, base, agreement):
    """Win rates against the base's answers and student-teacher agreement (evaluate's)."""
    return evaluate.held_out_metrics(setup.evaluator, setup.student, setup.eval_prompts, answers,
                                     base, agreement, oracle=setup.oracle, block=cfg.sample_batch)


def round_zero(setup, cfg, warmup, out):
    """Round 0, saved: the base policy's held-out answers, the agreement pairs (the teacher orders
    two base samples of each), and with warmup N > 0 the student trained on N teacher pairs."""
    clock = evaluate.Clock()
    answers = held_out_answers(setup, cfg, 0)
    two_each = [candidates(samples) for _, samples in answers]
    prompts = [p for p, c in zip(setup.eval_prompts, two_each) if c]
    agreement = teacher_orders(setup.teacher, prompts, [c[:2] for c in two_each if c])
    warm, calls = warm_up(setup, cfg, warmup) if warmup > 0 else ([], 0)
    m = {"round": 0, "teacher_calls_warmup": calls, "agreement_pairs": len(agreement),
         **held_out_metrics(setup, cfg, answers, answers, agreement)}
    m["seconds"] = {"eval": clock.lap("eval")}
    run.commit_round(out, 0, run.save_round0, setup, answers, agreement, warm, warmup > 0, m)
    return answers, agreement, warm


def warm_up(setup, cfg, n):
    """--student-warmup n: the teacher orders two base-policy samples of n training prompts, and the
    student learns those pairs before round 1. -> (the pairs, the teacher calls)."""
    rng = random.Random(seed_for(cfg.seed, 0, "warmup"))
    pool = setup.train_prompts or [setup.world.random_prompt(rng) for _ in range(4 * n)]
    prompts = rng.sample(pool, min(len(pool), 2 * n))
    seeds = [seed_for(cfg.seed, 0, "warmup", i) for i in range(len(prompts))]
    groups = setup.policy.sample(prompts, seeds, 2, cfg.sampling, cfg.sample_batch,
                                 "warm-up samples")
    two_each = [(p, c[:2]) for p, c in zip(prompts, map(candidates, groups)) if c][:n]
    warm = teacher_orders(setup.teacher, [p for p, _ in two_each], [c for _, c in two_each],
                          cfg.min_margin)
    if warm:
        training = replace(cfg.student_train, seed=seed_for(cfg.seed, 0, "train"),
                           desc="round 0: student")
        train_student(setup.student, warm, training, cfg.student_lora_rank, cfg.student_margin)
    calls = 2 * len(two_each)
    run.say(f"student warm-up: {len(warm)} teacher-labelled pairs ({calls} teacher calls)")
    return warm, calls


# ---- The run -------------------------------------------------------------------------------------

def main(argv=None):
    args = None
    with parallel.stop_on_signals():  # Ctrl-C and SIGTERM stop the run at its next safe point
        try:
            parsed, explicit = config.parse_args(argv)
            if parsed.report:  # no training: draw the given run folders on the same axes
                return run.draw_report(parsed.report, parsed.output)
            args = run.start(parsed, explicit)
            run_rounds(args)
        except parallel.Stopped as e:  # one line, what is saved, how to continue; 130 or 143
            run.stopped(args and args.out, 128 + e.signum)
        except KeyboardInterrupt:
            run.stopped(args and args.out, 130)
        except run.SaveFailed as e:  # a full disk: the same line, with status 1
            run.save_failed(e)
        finally:
            runlock.unlock()


def run_rounds(args):
    """The run of args (a config.RunConfig, its folder open): round 0, or what a resumed run holds,
    then each round in turn, evaluated and saved; then the table of all rounds."""
    torch.manual_seed(args.seed)  # a student from a causal LM gets a fresh head, drawn from it
    try:
        setup = run.set_up(args, eval_seed=seed_for(args.seed, 0, "eval"))
    except (ValueError, FileNotFoundError) as e:
        config.fail(str(e))
    cfg = config.round_config(args, setup.base_dir)
    parallel.safe_point()  # a Ctrl-C while the models loaded
    done = parallel.broadcast(run.finished_rounds(args.out) if parallel.is_main() else None)
    run.write_config(args)
    resuming = f" (resuming after round {max(done)})" if done else ""
    processes = f", {parallel.world_size()} processes" if parallel.world_size() > 1 else ""
    run.say(f"run folder: {args.out}{resuming}{processes}")
    if done:
        base, agreement, replay = run.resume(setup, args.out, done, args.fsdp)
    else:
        base, agreement, replay = round_zero(setup, cfg, args.student_warmup, args.out)
    for r in range(max(done, default=0) + 1, args.rounds + 1):
        seed = seed_for(args.seed, r, "prompts")
        prompts = run.round_prompts(setup, args.prompts_per_round, seed)
        samples, mined, trained, seconds = run_round(r, prompts, setup, cfg, replay)
        replay += mined.pairs
        if not mined.pairs:
            run.say(f"round {r}: no pairs survived the filters; the policy and student are "
                    f"unchanged", file=sys.stderr)
        clock = evaluate.Clock()
        answers = held_out_answers(setup, cfg, r)
        m = {"round": r, **evaluate.pair_metrics(prompts, samples, mined, cfg.k, cfg.selection,
                                                 setup.teacher.judge, setup.oracle),
             "length_penalty": cfg.length_penalty,
             "student_length_penalty": cfg.student_length_penalty,
             **evaluate.train_metrics(trained),
             **held_out_metrics(setup, cfg, answers, base, agreement),
             "seconds": {**seconds, "eval": clock.lap("eval")}}
        run.commit_round(args.out, r, run.save_round, setup, mined.pairs, answers, base, m)
        run.say(f"round {r}: {m['pairs']} pairs, teacher calls {m['teacher_calls']}, "
                f"win rate vs base {m['win_rate_vs_base']:.3f} "
                f"(sampled {m['win_rate_vs_base_sampled']:.3f}), "
                f"student-teacher agreement {m['student_teacher_agreement'] or 0:.3f}")
    if parallel.is_main():
        run.print_table(args.out)
        run.print_examples(args.out, base)
        print(f"\nreport: {os.path.join(args.out, 'report.html')}")
    parallel.safe_point()  # a Ctrl-C during the last save or the table: the run ends as stopped
    parallel.finish()


if __name__ == "__main__":
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: a failing process reports why
        from torch.distributed.elastic.multiprocessing.errors import record
        record(main)()
    else:
        main()
