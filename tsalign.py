"""
TS-Align (Zhang et al., 2024): align a policy with a cheap student reward model and an expensive teacher.

Each round, on fresh prompts and with the newest policy (on-policy):
  1. the policy samples K responses per prompt;
  2. the small student scores all K, and keeps its best and worst;
  3. the large teacher scores only those two, and its verdict orders them into a preference pair
     (prompt, chosen, rejected): 2 teacher calls per prompt instead of K;
  4. pairs that teach nothing are dropped (too few finished responses, identical texts, a tiny margin);
  5. the student learns the teacher's pairs with the pairwise ranking loss, replaying earlier rounds'
     pairs so it keeps what it knew (our reading of the paper's multi-task adapter training);
  6. the policy learns the pairs with DPO, the policy at the start of the round as reference.
Then held-out evaluation (evaluate.py), and the round is saved (run.py). Under torchrun every process
runs this file: `spread` shares each step's blocks of prompts out, and training is data-parallel.

    python tsalign.py --rounds 3          # the embedded default world (world.py), offline
    python tsalign.py --rounds 3 --policy DIR --student DIR --teacher DIR --prompts FILE --prompt-format chatml
    torchrun --standalone --nproc_per_node 8 tsalign.py ...   # the same run, data-parallel over 8 processes

Shapes: P prompts, K samples per prompt.
"""
import argparse
import math
import os
import random
import sys
from dataclasses import dataclass, replace
from functools import partial

import torch

import data
import evaluate
import model
import run
import runlock
import train_loop
from checkpoint import load_model
from data import Pair, Sample
from generate import generate
from train_loop import TrainConfig, spread

# ---- One round, step by step ---------------------------------------------------------------------

def sample(policy, prompts, seeds, k, max_new_tokens, temperature=1.0, top_p=None):
    """1. K responses to each prompt, in one batch: a list (P) of lists (K) of Sample. seeds: one per prompt,
    so its samples do not depend on the batch or process it lands in (None and temperature 0: greedy)."""
    gens = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
    toks = generate(policy.lm, [policy.encode(p) for p in prompts], max_new_tokens, temperature=temperature,
                    top_p=top_p, eos_token_id=policy.stops, generator=gens, num_samples=k)
    return [[Sample(t, *data.response_text(policy.tok, t, policy.stops)) for t in toks[i * k:(i + 1) * k]]
            for i in range(len(prompts))]


def candidates(group, repeats=False):
    """The responses of one prompt that may enter a pair: the finished ones (a truncated response never
    competes), each text once; with repeats, every finished sample (teacher-all scores them all, as
    RLHFlow-style iterative DPO does). None when they hold fewer than two distinct texts."""
    done = [s for s in group if s.finished]
    first = {}
    for s in done:
        first.setdefault(s.text, s)
    return None if len(first) < 2 else done if repeats else list(first.values())


@dataclass
class Ranked:
    """A prompt's candidates ranked: best and worst index its candidates."""
    best: int
    worst: int
    margin: float             # how much the last ranker (student, then teacher) prefers best; NaN: invalid judge
    calls: int = 0            # teacher calls spent on this prompt
    overturned: bool = False  # the teacher reversed the student's order


def best_and_worst(scores, calls=0):
    b, w = int(scores.argmax()), int(scores.argmin())
    return Ranked(b, w, (scores[b] - scores[w]).item(), calls)


def length_penalised(scores, cands, length_penalty):
    """A ranker's scores minus length_penalty x each response's token count (the policy's sampled ids, its
    stop token included), as RLHFlow's len_penalty does before it picks a pair: longer must also be better."""
    return scores - length_penalty * torch.tensor([len(c.ids) for c in cands], dtype=scores.dtype)


def student_ranks(student, prompts, pools, length_penalty=0.0):
    """2. The student scores every candidate of every prompt, in one batched pass (less length_penalty per
    token, --student-length-penalty): a Ranked per prompt."""
    live = [i for i, c in enumerate(pools) if c is not None]
    flat = [(prompts[i], c) for i in live for c in pools[i]]
    scores = student.score([p for p, _ in flat], [c.text for _, c in flat], [c.finished for _, c in flat]) if flat else []
    if flat and length_penalty:
        scores = length_penalised(scores, [c for _, c in flat], length_penalty)
    out, at = [None] * len(pools), 0
    for i in live:
        out[i] = best_and_worst(scores[at:at + len(pools[i])])
        at += len(pools[i])
    return out


def teacher_decides(teacher, prompts, pools, ranked, length_penalty=0.0):
    """3. The teacher scores only the student's best and worst (2 calls), and its verdict orders them:
    where it prefers the student's worst, the pair is reversed. The margin becomes the teacher's (less
    length_penalty per token the best is longer than the worst, --length-penalty)."""
    live = [i for i, r in enumerate(ranked) if r is not None and r.best != r.worst]
    out = list(ranked)
    if live:
        firsts, seconds = [pools[i][ranked[i].best] for i in live], [pools[i][ranked[i].worst] for i in live]
        m = teacher.margins([prompts[i] for i in live], firsts, seconds)
        if length_penalty:  # (s_b - lambda |b|) - (s_w - lambda |w|)
            longer = torch.tensor([len(b.ids) - len(w.ids) for b, w in zip(firsts, seconds)], dtype=m.dtype)
            m = m - length_penalty * longer
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
    overturned: int


def keep_pairs(prompts, samples, pools, ranked, min_margin):
    """4. A pair per prompt, unless: fewer than two responses finished, the finished ones are all one
    text or all scored the same, the judge's answer was invalid, or the margin is below min_margin (a
    tie included). Each drop is counted by its reason."""
    dropped = dict.fromkeys(("too_few_finished", "identical", "low_margin", "invalid_judge"), 0)
    pairs = []
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
            pairs.append(Pair(prompt, c.text, rej.text, c.finished, rej.finished, r.margin, c.ids, rej.ids))
    ranked = [r for r in ranked if r is not None]
    return Mined(pairs, dropped, sum(r.calls for r in ranked), sum(r.overturned for r in ranked))


def train_student(student, pairs, tc, lora_rank=0, margin=0.0):
    """5. The pairwise ranking loss on the teacher's pairs, each formatted for the student's own tokenizer."""
    rows = [(student.ids(p.prompt, p.chosen, p.chosen_finished), student.ids(p.prompt, p.rejected, p.rejected_finished))
            for p in pairs]
    if lora_rank:
        model.add_lora(student.m, lora_rank)
    metrics = train_loop.train_reward(student.m, rows, student.pad, tc, margin)
    if lora_rank:
        model.merge_lora(student.m)
    return metrics


def train_policy(policy, pairs, tc, dpo, lora_rank=0, reference=None):
    """6. DPO on the round's pairs, on the policy's own sampled token ids, against the round-start policy
    (reference None) or the given model (--reference sft: the original). dpo: train_dpo's options."""
    triples = [(policy.encode(p.prompt), p.chosen_ids, p.rejected_ids) for p in pairs]
    if reference is not None:
        reference = train_loop.reference_logprobs(reference, triples, policy.pad, average=dpo["average"])
    if lora_rank:
        model.add_lora(policy.lm, lora_rank)
    metrics = train_loop.train_dpo(policy.lm, triples, policy.pad, tc, reference=reference, **dpo)
    if lora_rank:
        model.merge_lora(policy.lm)  # adapters off is then exactly this round's result; fresh ones next round
    return metrics


def run_round(r, prompts, S, cfg, replay):
    """One round of TS-Align on fresh prompts (S: the models, cfg: a RoundConfig). Trains S.policy and
    S.student in place; returns the samples, the Mined pairs, the training metrics and the seconds spent."""
    clock, block = evaluate.Clock(), cfg.sample_batch
    seeds = [seed_for(cfg.seed, r, "sample", i) for i in range(len(prompts))]
    with train_loop.gathered(S.policy.lm):  # under --fsdp: the policy's full weights, gathered once
        samples = spread(partial(sample, S.policy, k=cfg.k, **cfg.sampling), prompts, seeds, block=block,
                         desc=f"round {r}: sample")                                               # 1.
    pools = [candidates(g, repeats=cfg.selection == "teacher-all") for g in samples]
    clock.lap("sample")
    if cfg.selection == "teacher-all":  # the baseline: the teacher scores every candidate itself
        ranked = spread(partial(teacher_ranks_all, S.teacher, length_penalty=cfg.length_penalty), prompts, pools,
                        block=block)
        clock.lap("teacher_score")
    else:
        with train_loop.gathered(S.student.m):
            ranked = spread(partial(student_ranks, S.student, length_penalty=cfg.student_length_penalty),
                            prompts, pools, block=block)                                          # 2.
        clock.lap("student_score")
        if cfg.selection == "ts-align":  # student-only, the other baseline, keeps the student's order
            ranked = spread(partial(teacher_decides, S.teacher, length_penalty=cfg.length_penalty), prompts, pools,
                            ranked, block=block)                                                  # 3.
            clock.lap("teacher_score")
    mined = keep_pairs(prompts, samples, pools, ranked, cfg.min_margin)                           # 4.
    trained = {}
    if mined.pairs and cfg.selection != "student-only":  # with no teacher the student has nothing new to learn
        tc = replace(cfg.student_train, seed=seed_for(cfg.seed, r, "train"), desc=f"round {r}: student")
        trained["student"] = train_student(S.student, replay + mined.pairs, tc, cfg.student_lora_rank,
                                           cfg.student_margin)                                    # 5.
        clock.lap("student_train")
    if mined.pairs:
        tc = replace(cfg.policy_train, seed=seed_for(cfg.seed, r, "train"), desc=f"round {r}: policy (DPO)")
        reference = load_model(cfg.reference_dir, S.device) if cfg.reference_dir else None
        trained["policy"] = train_policy(S.policy, mined.pairs, tc, cfg.dpo, cfg.lora_rank, reference)  # 6.
        clock.lap("policy_train")
    return samples, mined, trained, clock.seconds


@dataclass
class RoundConfig:
    """What a round depends on besides the models and the prompts (from the command line: round_config)."""
    k: int                  # responses sampled per prompt
    sampling: dict          # max_new_tokens, temperature, top_p of those samples
    selection: str          # ts-align | teacher-all | student-only
    min_margin: float       # pairs whose decider's margin is below this are dropped
    sample_batch: int       # prompts per sampling batch, and per block of work under torchrun
    student_train: TrainConfig
    policy_train: TrainConfig
    dpo: dict               # beta, loss_type, label_smoothing, sft_coef, average, rdpo_alpha (train_loop.train_dpo)
    lora_rank: int = 0
    student_lora_rank: int = 0
    student_margin: float = 0.0
    reference_dir: str | None = None  # --reference sft: the original policy, the DPO reference every round
    length_penalty: float = 0.0          # subtracted per response token from the teacher's scores
    student_length_penalty: float = 0.0  # the same for the student's (its scores are in other units)
    seed: int = 0


def seed_for(seed, r, purpose, i=None):
    """Every random choice derives from --seed, the round, its purpose (and a prompt's index i, for its own
    sampling stream), so a resumed run, or a run on any number of processes, repeats it."""
    base = (seed * 1_000_003 + r * 7_919 + {"prompts": 1, "sample": 2, "eval": 3, "warmup": 4, "train": 5}[purpose]) % 2**62
    return base if i is None else (base * 1_000_003 + i) % 2**62


# ---- The baselines the paper compares with, and the pairs the teacher orders outside the rounds ----

def teacher_ranks_all(teacher, prompts, pools, length_penalty=0.0):
    """Teacher-all, instead of steps 2-3: the teacher scores every candidate (a reward model K calls, less
    length_penalty per token; a judge every ordering, K(K-1) calls, each win counting), and its best and
    worst form the pair."""
    out = []
    for prompt, pool in zip(prompts, pools):
        if pool is None:
            out.append(None)
        elif not teacher.judge:
            s = teacher.score([prompt] * len(pool), [c.text for c in pool], [c.finished for c in pool])
            out.append(best_and_worst(length_penalised(s, pool, length_penalty), len(pool)))
        else:
            out.append(best_and_worst(*teacher.tournament(prompt, [c.text for c in pool])))
    return out


def teacher_orders(teacher, prompts, twos, min_margin=0.0):
    """The teacher orders two responses of each prompt into a pair (step 3 on a given best and worst),
    as in step 4 leaving out ties, invalid judge answers and margins below min_margin."""
    ranked = spread(partial(teacher_decides, teacher), prompts, twos, [Ranked(0, 1, 0.0)] * len(twos))
    pairs = keep_pairs(prompts, twos, twos, ranked, min_margin).pairs
    return [replace(p, chosen_ids=None, rejected_ids=None) for p in pairs]  # these train and test the student only


def answer(policy, prompts, seeds, max_new_tokens, temperature, top_p):
    """The policy's answers to held-out prompts: (its greedy response, 4 samples) per prompt."""
    greedy = sample(policy, prompts, None, 1, max_new_tokens, 0.0, None)
    return list(zip([g[0] for g in greedy], sample(policy, prompts, seeds, 4, max_new_tokens, temperature, top_p)))


def held_out(S, cfg, r, base=None):
    """The round's held-out answers, and a function of the agreement pairs giving their metrics against the
    base's (base None: this is the base)."""
    seeds = [seed_for(cfg.seed, r, "eval", i) for i in range(len(S.eval_prompts))]
    with train_loop.gathered(S.policy.lm):
        answers = spread(partial(answer, S.policy, **cfg.sampling), S.eval_prompts, seeds, block=cfg.sample_batch,
                         desc=f"round {r}: evaluation")
    return answers, partial(evaluate.held_out_metrics, S.evaluator, S.student, S.eval_prompts, answers,
                            base or answers, oracle=S.oracle, block=cfg.sample_batch)


def round_zero(S, cfg, warmup, out):
    """The base policy's held-out answers, the agreement pairs (the teacher orders two distinct base samples
    of each held-out prompt), and with warmup = N > 0, N teacher-ordered pairs the student learns first."""
    clock = evaluate.Clock()
    answers, metrics_of = held_out(S, cfg, 0)
    twos = [candidates(s) for _, s in answers]
    agree = teacher_orders(S.teacher, [p for p, c in zip(S.eval_prompts, twos) if c], [c[:2] for c in twos if c])
    warm, calls = [], 0
    if warmup > 0:
        rng = random.Random(seed_for(cfg.seed, 0, "warmup"))
        pool = S.train_prompts or [S.world.random_prompt(rng) for _ in range(4 * warmup)]
        prompts = rng.sample(pool, min(len(pool), 2 * warmup))
        seeds = [seed_for(cfg.seed, 0, "warmup", i) for i in range(len(prompts))]
        with train_loop.gathered(S.policy.lm):
            groups = spread(partial(sample, S.policy, k=2, **cfg.sampling), prompts, seeds, block=cfg.sample_batch,
                            desc="warm-up samples")
        twos = [(p, c[:2]) for p, c in zip(prompts, map(candidates, groups)) if c][:warmup]
        warm, calls = teacher_orders(S.teacher, [p for p, _ in twos], [c for _, c in twos], cfg.min_margin), 2 * len(twos)
        if warm:
            train_student(S.student, warm, replace(cfg.student_train, seed=seed_for(cfg.seed, 0, "train"),
                                                   desc="round 0: student"), cfg.student_lora_rank, cfg.student_margin)
        run.say(f"student warm-up: {len(warm)} teacher-labelled pairs ({calls} teacher calls)")
    m = {"round": 0, "teacher_calls_warmup": calls, "agreement_pairs": len(agree), **metrics_of(agree)}
    m["seconds"] = {"eval": clock.lap("eval")}
    run.commit_round(out, 0, partial(run.save_round0, S, answers, agree, warm, warmup > 0, m))
    return answers, agree, warm


# ---- The run -------------------------------------------------------------------------------------

def main(argv=None):
    args = None
    with train_loop.stop_on_signals():  # Ctrl-C and SIGTERM stop the run at its next safe point
        try:
            args = parse_args(argv)
            if args.report:  # no training: draw the given run folders on the same axes
                return run.draw_report(args.report, args.output)
            train(args)
        except train_loop.Stopped as e:  # one line, what is saved, how to continue; 130 or 143
            run.stopped(args and args.out, 128 + e.signum)
        except KeyboardInterrupt:
            run.stopped(args and args.out, 130)
        except run.SaveFailed as e:  # a full disk: one line, what is saved, how to continue; status 1
            run.save_failed(e)
        finally:
            runlock.unlock()


def train(args):
    torch.manual_seed(args.seed)  # a student from a causal LM gets a fresh head: drawn from this seed
    try:
        S = run.setup(args, eval_seed=seed_for(args.seed, 0, "eval"))
    except (ValueError, FileNotFoundError) as e:
        run.fail(str(e))
    cfg = round_config(args, S.base_dir)
    train_loop.safe_point()  # a Ctrl-C while the models loaded
    done = train_loop.broadcast(run.finished_rounds(args.out) if train_loop.is_main() else None)
    run.write_config(args)
    last = max(done) if done else 0
    run.say(f"run folder: {args.out}" + (f" (resuming after round {last})" if done else "")
            + (f", {train_loop.world_size()} processes" if train_loop.world_size() > 1 else ""))
    base, agree, warm = run.load_base(args.out) if 0 in done else round_zero(S, cfg, args.student_warmup, args.out)
    replay = warm + [Pair(**p) for i in range(1, last + 1)  # every teacher pair so far, for the student
                     for p in run.read_json(os.path.join(args.out, f"round_{i}", "pairs.jsonl"), lines=True)]
    if last >= 1:  # resuming: the last finished round's policy, and the newest student saved
        S.policy.lm = run.place(load_model(os.path.join(args.out, f"round_{last}", "policy"), S.device), args.fsdp)
    if done and (student_dir := run.latest(args.out, last, "student")):
        S.student.m = run.place(load_model(student_dir, S.device), args.fsdp)
    for r in range(last + 1, args.rounds + 1):
        prompts = run.round_prompts(S, args.prompts_per_round, seed_for(args.seed, r, "prompts"))
        samples, mined, trained, seconds = run_round(r, prompts, S, cfg, replay)
        replay += mined.pairs
        if not mined.pairs:
            run.say(f"round {r}: no pairs survived the filters; the policy and student are unchanged", file=sys.stderr)
        clock = evaluate.Clock()
        answers, metrics_of = held_out(S, cfg, r, base)
        m = {"round": r, **evaluate.pair_metrics(prompts, samples, mined, cfg.k, cfg.selection, S.teacher.judge, S.oracle),
             "length_penalty": cfg.length_penalty, "student_length_penalty": cfg.student_length_penalty,
             **evaluate.train_metrics(trained), **metrics_of(agree), "seconds": {**seconds, "eval": clock.lap("eval")}}
        run.commit_round(args.out, r, partial(run.save_round, S, mined.pairs, answers, base, m))
        run.say(f"round {r}: {m['pairs']} pairs, teacher calls {m['teacher_calls']}, win rate vs base "
                f"{m['win_rate_vs_base']:.3f} (sampled {m['win_rate_vs_base_sampled']:.3f}), "
                f"student-teacher agreement {m['student_teacher_agreement'] or 0:.3f}")
    if train_loop.is_main():
        run.print_table(args.out)
        run.print_examples(args.out, base)
        print(f"\nreport: {os.path.join(args.out, 'report.html')}")
    train_loop.safe_point()  # a Ctrl-C during the last save or the table: the run still ends as stopped
    train_loop.finish()


# ---- Command line: the run config ----------------------------------------------------------------

SELECTIONS = ("ts-align", "teacher-all", "student-only")


def build_parser():
    p = argparse.ArgumentParser(description="TS-Align: iterative DPO with a student that searches and a teacher that decides.")
    a = p.add_argument
    a("--rounds", type=int, default=3, help="number of TS-Align rounds (a larger value with --resume extends a run)")
    a("--k", type=int, default=8, help="responses sampled per prompt (at least 2)")
    a("--prompts-per-round", type=int, default=None, help="prompts per round (default: 1024 in the world, 256 otherwise)")
    a("--max-new-tokens", type=int, default=None, help="longest response; longer ones are truncated and not ranked")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the K responses")
    a("--top-p", type=float, default=None, help="nucleus sampling threshold of the K responses (default: off)")
    a("--selection", choices=SELECTIONS, default="ts-align", help="how pairs are mined: ts-align, teacher-all or student-only")
    a("--min-margin", type=float, default=None, help="drop pairs whose teacher margin is below this (ties included)")
    a("--beta", type=float, default=None, help="DPO beta (default: the world's own, 0.1 for real checkpoints)")
    a("--loss-type", choices=("sigmoid", "ipo"), default="sigmoid", help="DPO loss: sigmoid (Rafailov 2023) or ipo (Azar 2023)")
    a("--label-smoothing", type=float, default=0.0, help="conservative DPO label smoothing in [0, 0.5)")
    a("--average-logprobs", action="store_true", help="average response log-probs per token (as IPO's authors do) instead of summing")
    a("--sft-coef", type=float, default=0.0, help="weight of an extra SFT term on the chosen responses")
    a("--rdpo-alpha", type=float, default=0.0, help="R-DPO (Park et al. 2024): alpha of the length term alpha (|y_w| - |y_l|) inside DPO's sigmoid (0: off)")
    a("--length-penalty", type=float, default=0.0, help="subtract this x the response's token count from the teacher's scores before the pair is ordered (0: off)")
    a("--student-length-penalty", type=float, default=None, help="subtract this x the response's token count from the student's scores before it picks best and worst (default: 0.5 in the world, 0 otherwise)")
    a("--reference", choices=("round-start", "sft"), default="round-start", help="DPO reference: the round-start policy or the original SFT policy")
    a("--lr", type=float, default=None, help="policy learning rate")
    a("--epochs", type=int, default=None, help="DPO epochs over each round's pairs")
    a("--batch-size", type=int, default=None, help="pairs per training batch (policy and student)")
    a("--student-lr", type=float, default=None, help="student learning rate")
    a("--student-epochs", type=int, default=None, help="student epochs over all teacher pairs so far")
    a("--student-margin", type=float, default=0.0, help="margin m of the student's ranking loss -log sigmoid(r_c - r_r - m)")
    a("--lora-rank", type=int, default=0, help="LoRA rank for the policy (0 = full fine-tuning)")
    a("--student-lora-rank", type=int, default=0, help="LoRA rank for the student (0 = full fine-tuning)")
    a("--student-warmup", type=int, default=0, help="before round 1, the teacher labels this many base-policy pairs to train the student")
    a("--eval-count", type=int, default=None, help="held-out prompts to evaluate on (default: 2000 in the world, 64 otherwise)")
    a("--sample-batch", type=int, default=64, help="prompts sampled in one batch (also the unit of work split between torchrun processes)")
    a("--fsdp", action="store_true", help="under torchrun: shard the policy and the student across the processes (FSDP2)")
    a("--max-shard-size", type=float, default=5.0, help="saved checkpoints: GB per weight file before it is split into shards")
    a("--seed", type=int, default=0, help="seed of every random choice (prompts, samples, shuffles), per round")
    a("--out", default=None, help="run folder (default: a new dated folder under runs/)")
    a("--resume", action="store_true", help="continue the run in --out (default: the newest under runs/) after its last finished round")
    a("--rebuild-world", action="store_true", help="build the default world anew (into ~/.cache/tsalign/world) instead of using the shipped one")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--policy", default=None, help="policy checkpoint folder (Hugging Face format); none: the embedded default world")
    a("--student", default=None, help="student checkpoint: a reward model, or a causal LM that gets a fresh scalar head")
    a("--teacher", default=None, help="teacher checkpoint: a reward model (or a causal LM with --teacher-judge)")
    a("--teacher-judge", action="store_true", help="use the teacher as an LLM judge that compares two responses")
    a("--judge", default=None, help="independent evaluator checkpoint for the win rate (reward model or LLM judge)")
    a("--judge-min-mass", type=float, default=0.1, help="an LLM judge whose two labels get less probability than this gave an invalid answer")
    a("--prompts", default=None, help="training prompts, .jsonl ({\"prompt\": ...} per line) or .txt (one per line)")
    a("--eval-prompts", default=None, help="held-out prompts (default: a fixed, seeded share of --prompts)")
    a("--prompt-format", default=None, help=f"policy prompt format: {', '.join(data.FORMATS)}")
    a("--student-format", default=None, help="student prompt format (default: --prompt-format)")
    a("--teacher-format", default=None, help="teacher prompt format (default: --prompt-format)")
    a("--report", nargs="+", metavar="RUN", help="no training: draw these run folders on the same axes into --output")
    a("-o", "--output", default="compare.html", help="with --report: the page to write, or a .svg of the main charts")
    return p


CHECKPOINT_DEFAULTS = dict(beta=0.1, prompts_per_round=256, eval_count=64, min_margin=0.0, max_new_tokens=256,
                           lr=5e-7, epochs=1, batch_size=8, student_lr=1e-5, student_epochs=1, student_length_penalty=0.0)


def parse_args(argv):
    """The options, with the defaults of the setting (world or checkpoints) filled in and checked, the run
    folder opened (or the run to resume read), and under torchrun the process group joined."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    if args.report:
        return args
    import world
    defaults = world.RUN_DEFAULTS if args.policy is None else CHECKPOINT_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    run.check(args)
    device = train_loop.init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.fsdp)
    if train_loop.is_main():  # rank 0 opens (and locks) the run folder; every process then takes its options
        try:
            args = run.open_run(args, explicit)
        except SystemExit as e:  # refused, in one line: every process leaves with its status
            args = e
    args = train_loop.broadcast(args)
    if isinstance(args, SystemExit):
        sys.exit(args.code)
    args.device = device  # each process its own
    return args


def round_config(args, base_dir):
    train = dict(epochs=args.epochs, batch_size=args.batch_size)
    return RoundConfig(
        k=args.k, sampling=dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p),
        selection=args.selection, min_margin=args.min_margin, sample_batch=args.sample_batch,
        student_train=TrainConfig(lr=args.student_lr, **{**train, "epochs": args.student_epochs}),
        policy_train=TrainConfig(lr=args.lr, **train),
        dpo=dict(beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                 sft_coef=args.sft_coef, average=args.average_logprobs, rdpo_alpha=args.rdpo_alpha),
        lora_rank=args.lora_rank, student_lora_rank=args.student_lora_rank, student_margin=args.student_margin,
        reference_dir=base_dir if args.reference == "sft" else None, length_penalty=args.length_penalty,
        student_length_penalty=args.student_length_penalty, seed=args.seed)


if __name__ == "__main__":
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: a failing process reports its traceback
        from torch.distributed.elastic.multiprocessing.errors import record
        record(main)()
    else:
        main()
