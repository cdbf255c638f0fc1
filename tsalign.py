"""
TS-Align (Zhang et al., 2024): align a policy with a cheap student reward model and an expensive teacher.

Each round, on fresh prompts and with the newest policy (on-policy):
  1. the policy samples K responses per prompt (KV-cache sampler, one prefill per prompt);
  2. the small student scores all K finished responses;
  3. the large teacher scores only the student's best and worst, and its verdict orders them into a
     preference pair (prompt, chosen, rejected): 2 teacher calls per prompt instead of K;
  4. the student learns the teacher's pairs with the pairwise ranking loss, replaying earlier rounds' pairs
     so it keeps what it knew (our reading of the paper's multi-task adapter training);
  5. the policy learns the pairs with DPO, the policy at the start of the round as reference;
  6. held-out evaluation, then the round's policy, student, pairs and metrics are saved atomically.

    python tsalign.py --rounds 3          # the embedded default world (world.py), offline
    python tsalign.py --rounds 3 --policy DIR --student DIR --teacher DIR --prompts FILE --prompt-format chatml
    torchrun --standalone --nproc_per_node 8 tsalign.py ...   # the same run, data-parallel over 8 processes

Under torchrun, each process samples, scores and mines its blocks of the prompts, every process gets
every pair, and training is data-parallel (train_loop.py): the result is the single process's.

Shapes: P prompts, K samples per prompt.
"""
import argparse
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch

import data
import model
import train_loop

# -----------------------------------------------------------------------------
# Command line: the run config

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
    a("--beta", type=float, default=None, help="DPO beta (default: the world's own, 0.1 for real checkpoints)")
    a("--loss-type", choices=("sigmoid", "ipo"), default="sigmoid", help="DPO loss: sigmoid (Rafailov 2023) or ipo (Azar 2023)")
    a("--label-smoothing", type=float, default=0.0, help="conservative DPO label smoothing in [0, 0.5)")
    a("--sft-coef", type=float, default=0.0, help="weight of an extra SFT term on the chosen responses")
    a("--reference", choices=("round-start", "sft"), default="round-start", help="DPO reference: the round-start policy or the original SFT policy")
    a("--min-margin", type=float, default=None, help="drop pairs whose teacher margin is below this (ties included)")
    a("--selection", choices=SELECTIONS, default="ts-align", help="how pairs are mined: ts-align, teacher-all or student-only")
    a("--lr", type=float, default=None, help="policy learning rate")
    a("--epochs", type=int, default=None, help="DPO epochs over each round's pairs")
    a("--batch-size", type=int, default=None, help="pairs per training batch (policy and student)")
    a("--student-lr", type=float, default=None, help="student learning rate")
    a("--student-epochs", type=int, default=None, help="student epochs over all teacher pairs so far")
    a("--lora-rank", type=int, default=0, help="LoRA rank for the policy (0 = full fine-tuning)")
    a("--student-lora-rank", type=int, default=0, help="LoRA rank for the student (0 = full fine-tuning)")
    a("--student-warmup", type=int, default=0, help="before round 1, the teacher labels this many base-policy pairs to train the student")
    a("--eval-count", type=int, default=None, help="held-out prompts to evaluate on (default: 2000 in the world, 64 otherwise)")
    a("--sample-batch", type=int, default=64, help="prompts sampled in one batch (also the unit of work split between torchrun processes)")
    a("--seed", type=int, default=0, help="seed of every random choice (prompts, samples, shuffles), per round")
    a("--out", default=None, help="run folder (default: a new dated folder under runs/)")
    a("--resume", action="store_true", help="continue the run in --out (default: the newest under runs/) after its last finished round")
    a("--rebuild-world", action="store_true", help="rebuild the default world even if it is cached")
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
    return p


# Options that may differ on --resume without changing what the run computes.
RESUME_FREE = ("rounds", "resume", "out", "rebuild_world", "device")


def fail(msg):
    print(f"tsalign: error: {msg}", file=sys.stderr)
    sys.exit(2)


def say(*a, **kw):
    """print, on rank 0 only (under torchrun every process runs this file)."""
    if train_loop.is_main():
        print(*a, **kw)


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def resolve(args):
    """Fill the defaults that depend on the setting (world or real checkpoints), and check ranges."""
    world_mode = args.policy is None
    import world
    d = world.RUN_DEFAULTS if world_mode else dict(beta=0.1, prompts_per_round=256, eval_prompts=64, k=8, min_margin=0.0,
                                                   max_new_tokens=256, lr=5e-7, epochs=1, batch_size=8,
                                                   student_lr=1e-5, student_epochs=1)
    fill = dict(beta=d["beta"], prompts_per_round=d["prompts_per_round"], eval_count=d["eval_prompts"],
                min_margin=d["min_margin"], max_new_tokens=d["max_new_tokens"], lr=d["lr"], epochs=d["epochs"],
                batch_size=d["batch_size"], student_lr=d["student_lr"], student_epochs=d["student_epochs"])
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if world_mode:
        args.prompt_format = args.prompt_format or world.FORMAT
    if args.rounds < 1:
        fail(f"--rounds must be at least 1, got {args.rounds}")
    if args.k < 2:
        fail(f"--k must be at least 2 (a pair needs two responses), got {args.k}")
    for name in ("prompts_per_round", "max_new_tokens", "epochs", "batch_size", "student_epochs", "eval_count",
                 "sample_batch"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("beta", "lr", "student_lr"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 0.5 or args.min_margin < 0 or args.temperature <= 0:
        fail("need 0 <= --label-smoothing < 0.5, --min-margin >= 0 and --temperature > 0")
    if not world_mode:
        missing = [n for n in ("student", "teacher", "prompts", "prompt_format") if getattr(args, n) is None]
        if missing:
            fail(f"with --policy, also give {', '.join('--' + m.replace('_', '-') for m in missing)}")
    for name in ("prompt_format", "student_format", "teacher_format"):
        fmt = getattr(args, name)
        if fmt is not None and fmt not in data.FORMATS:
            fail(f"unknown prompt format {fmt!r} for --{name.replace('_', '-')}; known: {', '.join(data.FORMATS)}")
    args.student_format = args.student_format or args.prompt_format
    args.teacher_format = args.teacher_format or args.prompt_format
    return args


# -----------------------------------------------------------------------------
# The models, as TS-Align sees them

@dataclass
class Policy:
    lm: model.CausalLM
    tok: object
    fmt: str
    stops: list        # every id that ends a response: the config's stop ids and the format's end of turn
    pad: int

    def encode(self, prompt):
        return data.encode_prompt(self.tok, self.fmt, prompt)


@dataclass
class Scorer:
    """A reward model with its own tokenizer and format; or, with judge=True, a causal LM asked to compare."""
    m: torch.nn.Module
    tok: object
    fmt: str
    eos: int
    pad: int
    judge: bool = False
    min_mass: float = 0.1

    def score(self, prompts, responses, finished):
        """Reward of each (prompt, response): (N,) on the CPU."""
        rows = [data.reward_ids(self.tok, self.fmt, p, r, f, self.eos) for p, r, f in zip(prompts, responses, finished)]
        return train_loop.reward_scores(self.m, rows, self.pad)

    def compare(self, prompts, first, second):
        """LLM judge: P(first is better) from the next-token probabilities of the labels "A" and "B",
        (N,) on the CPU, NaN where the two labels get less than min_mass (an invalid answer)."""
        label_ids = [self.tok.encode(x, add_special_tokens=False).ids for x in ("A", "B")]
        rows = [data.encode_prompt(self.tok, self.fmt, JUDGE_TEMPLATE.format(prompt=p, a=a, b=b))
                for p, a, b in zip(prompts, first, second)]
        out = []
        with torch.no_grad():
            for s in range(0, len(rows), 16):
                ids, mask = data.pad(rows[s:s + 16], self.pad, side="left")
                dev = next(self.m.parameters()).device
                probs = self.m(ids.to(dev), mask.to(dev))[:, -1].float().softmax(-1).cpu()  # (N, V)
                pa, pb = probs[:, label_ids[0][0]], probs[:, label_ids[1][0]]
                p = pa / (pa + pb)
                out.append(torch.where(pa + pb < self.min_mass, torch.full_like(p, float("nan")), p))
        return torch.cat(out)


JUDGE_TEMPLATE = ("Which response to the instruction is better?\n\nInstruction: {prompt}\n\nResponse A: {a}\n\n"
                  "Response B: {b}\n\nAnswer with the letter of the better response, A or B.")


def pad_id(cfg):
    return cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.stop_token_ids or [0])[0]


def end_id(tok, fmt, cfg):
    """The token a finished response ends with, for this model: its format's end of turn, else its EOS."""
    end = data.FORMATS[fmt][2]
    if end is not None:
        return tok.token_to_id(end)
    if not cfg.stop_token_ids:
        raise ValueError(f"{cfg.source}: config.json has no eos_token_id, and format {fmt!r} has no end token")
    return cfg.stop_token_ids[0]


def is_reward_checkpoint(path):
    """Whether a checkpoint folder holds a reward model, from its config.json alone."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False  # load_model then says what is wrong with the folder
    return any(model.ARCHITECTURES.get(a, ("", False))[1] for a in cfg.get("architectures") or [])


def load_policy(path, fmt, device):
    lm = model.load_model(path, device)
    if lm.config.reward:
        raise ValueError(f"policy {path} is a reward model ({lm.config.arch}); it must be a causal LM")
    tok = data.load_tokenizer(path)
    data.check_format(tok, fmt)
    stops = list(lm.config.stop_token_ids)
    end = end_id(tok, fmt, lm.config)
    return Policy(lm, tok, fmt, stops + [end] if end not in stops else stops, pad_id(lm.config))


def load_scorer(path, fmt, device, judge=False, min_mass=0.1, reward_head=False):
    m = model.load_model(path, device)
    if judge and m.config.reward:
        raise ValueError(f"{path} is a reward model; an LLM judge must be a causal LM")
    if not judge and not m.config.reward:
        if not reward_head:
            raise ValueError(f"{path} is a causal LM, not a reward model (use --teacher-judge for an LLM judge)")
        m = model.add_reward_head(m)  # a student from a causal LM: a fresh scalar head
    tok = data.load_tokenizer(path)
    data.check_format(tok, fmt)
    return Scorer(m, tok, fmt, end_id(tok, fmt, m.config), pad_id(m.config), judge, min_mass)


# -----------------------------------------------------------------------------
# Sampling and pair mining: the heart of TS-Align

@dataclass
class Sample:
    ids: list          # the policy's own token ids, stop token included if it stopped
    text: str          # decoded, stop token removed
    finished: bool     # ended with a stop token (False: truncated at --max-new-tokens)


def sample(policy, prompts, k, args, gens):
    """K samples of each prompt, in one batch: a list (P) of lists (K) of Sample. gens: one generator
    per prompt (see prompt_generators), or None for greedy decoding."""
    toks = model.generate(policy.lm, [policy.encode(p) for p in prompts], args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, eos_token_id=policy.stops,
                          generator=gens, num_samples=k)
    return [[Sample(t, *data.response_text(policy.tok, t, policy.stops)) for t in toks[i * k:(i + 1) * k]]
            for i in range(len(prompts))]


def distinct_finished(samples):
    """The finished samples with distinct texts, in order (truncated ones are never ranked)."""
    seen, keep = set(), []
    for s in samples:
        if s.finished and s.text not in seen:
            seen.add(s.text)
            keep.append(s)
    return keep


def teacher_margins(teacher, prompts, firsts, seconds):
    """How much the teacher prefers each first response over its second, (N,) on the CPU, and the
    teacher calls made. A reward model scores both (2 calls a pair); a judge is asked in both orders
    (2 calls a pair), so position bias cancels, and the two orders disagreeing is a tie (0).
    NaN: an invalid judge answer."""
    n = len(prompts)
    if not teacher.judge:
        s = teacher.score(prompts * 2, [a.text for a in firsts] + [b.text for b in seconds],
                          [a.finished for a in firsts] + [b.finished for b in seconds])
        return s[:n] - s[n:], 2 * n
    a, b = [x.text for x in firsts], [x.text for x in seconds]
    p1 = teacher.compare(prompts, a, b)      # P(first better), asked with it first
    p2 = 1 - teacher.compare(prompts, b, a)  # the same, asked with it second
    margin = (p1 + p2) / 2 - 0.5
    return torch.where((p1 > 0.5) != (p2 > 0.5), torch.zeros_like(margin), margin), 2 * n  # NaN stays NaN


def teacher_rank_all(teacher, prompt, cands):
    """Teacher-all: a score for every candidate (reward model: K calls; judge: round-robin over K(K-1) orderings)."""
    if not teacher.judge:
        return teacher.score([prompt] * len(cands), [c.text for c in cands], [c.finished for c in cands]), len(cands)
    n = len(cands)
    order = [(i, j) for i in range(n) for j in range(n) if i != j]
    p = teacher.compare([prompt] * len(order), [cands[i].text for i, _ in order], [cands[j].text for _, j in order])
    wins = torch.zeros(n)
    for (i, j), pi in zip(order, p.tolist()):
        if not math.isnan(pi):
            wins[i] += pi
            wins[j] += 1 - pi
    return wins / (2 * (n - 1)), len(order)


def teacher_orders(teacher, two):
    """The teacher's margin (first over second) of each (prompt, (first, second)) item, by blocks across
    processes: a list of floats."""
    def block(idx):
        m, _ = teacher_margins(teacher, [two[i][0] for i in idx], [two[i][1][0] for i in idx],
                               [two[i][1][1] for i in idx])
        return m.tolist()
    return train_loop.per_item(len(two), 64, block)


def split(flat, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(flat[i:i + n])
        i += n
    return out


def mine_pairs(prompts, samples, student, teacher, args):
    """One preference pair per prompt where possible, and the counts of what was dropped and why.

    Steps 2 and 3 of the round on a block of prompts, each one batched pass: the ranker (the student; the
    teacher itself for teacher-all) scores every candidate, then the teacher decides each best-vs-worst."""
    dropped = {"too_few_finished": 0, "identical": 0, "low_margin": 0, "invalid_judge": 0}
    groups = []  # (prompt, candidates) of the prompts that can give a pair
    for prompt, group in zip(prompts, samples):
        cands = distinct_finished(group)
        if sum(s.finished for s in group) < 2:
            dropped["too_few_finished"] += 1
        elif len(cands) < 2:
            dropped["identical"] += 1
        else:
            # teacher-all scores every finished sample, repeats included, as RLHFlow-style iterative DPO does
            groups.append((prompt, [s for s in group if s.finished] if args.selection == "teacher-all" else cands))
    secs, calls = {"student_score": 0.0, "teacher_score": 0.0}, 0
    t0 = time.time()
    if args.selection == "teacher-all":
        scored = [teacher_rank_all(teacher, p, c) for p, c in groups]
        calls += sum(c for _, c in scored)
        scores = [s for s, _ in scored]
        secs["teacher_score"] += time.time() - t0
    else:  # 2. the student ranks every distinct finished response
        flat = [(p, c) for p, cands in groups for c in cands]
        s = student.score([p for p, _ in flat], [c.text for _, c in flat], [c.finished for _, c in flat]) if flat else []
        scores = split(s, [len(c) for _, c in groups])
        secs["student_score"] += time.time() - t0
    best = [int(s.argmax()) for s in scores]
    worst = [int(s.argmin()) for s in scores]
    margins = [(s[b] - s[w]).item() for s, b, w in zip(scores, best, worst)]
    overturned = 0
    if args.selection == "ts-align":  # 3. the teacher scores only the student's best and worst, and decides
        t0 = time.time()
        live = [i for i, (b, w) in enumerate(zip(best, worst)) if b != w]
        m, c = teacher_margins(teacher, [groups[i][0] for i in live], [groups[i][1][best[i]] for i in live],
                               [groups[i][1][worst[i]] for i in live]) if live else ([], 0)
        calls += c
        for i, mi in zip(live, list(m.tolist()) if live else []):
            margins[i] = mi
            if mi < 0:  # the teacher overturns the student
                best[i], worst[i], margins[i] = worst[i], best[i], -mi
                overturned += 1
        secs["teacher_score"] += time.time() - t0
    pairs = []
    for (prompt, cands), b, w, margin in zip(groups, best, worst, margins):
        if b == w:  # every candidate scored the same
            dropped["identical"] += 1
        elif math.isnan(margin):
            dropped["invalid_judge"] += 1
        elif margin < args.min_margin or margin == 0:
            dropped["low_margin"] += 1
        else:
            pairs.append({"prompt": prompt, "chosen": cands[b].text, "rejected": cands[w].text,
                          "chosen_finished": cands[b].finished, "rejected_finished": cands[w].finished,
                          "margin": margin, "chosen_ids": cands[b].ids, "rejected_ids": cands[w].ids})
    return pairs, dropped, calls, overturned, secs


# -----------------------------------------------------------------------------
# Evaluation on held-out prompts

class Evaluator:
    """Win rate against the base policy, judged by the oracle (world), an independent --judge, or the
    teacher; and student-teacher agreement on a fixed held-out pair set built at round 0."""

    def __init__(self, name, oracle=None, judge=None):
        self.name, self.oracle, self.judge = name, oracle, judge

    def outcomes(self, prompts, ours, base):
        """Per pair: 1 win, 0.5 tie, 0 loss (an invalid judge answer counts as a tie)."""
        if self.oracle is not None:
            a = [self.oracle(p, s.text) if s.finished else 0.0 for p, s in zip(prompts, ours)]
            b = [self.oracle(p, s.text) if s.finished else 0.0 for p, s in zip(prompts, base)]
            return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
        out = [0.5] * len(prompts)  # the same response twice is a tie, without asking
        ask = [i for i, (x, y) in enumerate(zip(ours, base)) if (x.text, x.finished) != (y.text, y.finished)]
        if ask:
            margins, _ = teacher_margins(self.judge, [prompts[i] for i in ask], [ours[i] for i in ask],
                                         [base[i] for i in ask])
            for i, m in zip(ask, margins.tolist()):
                out[i] = 0.5 if math.isnan(m) or m == 0 else 1.0 if m > 0 else 0.0
        return out


def win_stats(outcomes, prefix):
    n = len(outcomes)
    mean = sum(outcomes) / n
    sd = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / max(1, n - 1))
    return {prefix: mean, prefix.replace("win_rate", "win_rate_stderr"): sd / math.sqrt(n),
            prefix.replace("win_rate", "wins"): sum(o == 1.0 for o in outcomes),
            prefix.replace("win_rate", "ties"): sum(o == 0.5 for o in outcomes),
            prefix.replace("win_rate", "losses"): sum(o == 0.0 for o in outcomes)}


def student_agrees(student, pairs):
    """For each held-out pair (the teacher's choice first): does the student order it the same way?"""
    def block(idx):
        ps = [pairs[i] for i in idx]
        s = student.score([p["prompt"] for p in ps] * 2, [p["chosen"] for p in ps] + [p["rejected"] for p in ps],
                          [p["chosen_finished"] for p in ps] + [p["rejected_finished"] for p in ps])
        return (s[:len(ps)] > s[len(ps):]).tolist()
    return train_loop.per_item(len(pairs), 64, block)


# -----------------------------------------------------------------------------
# The run folder: atomic rounds, resume

def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished_rounds(out):
    """Rounds whose folder was completed (a round folder appears only once everything in it is written)."""
    return sorted(int(n.split("_")[1]) for n in os.listdir(out)
                  if n.startswith("round_") and os.path.exists(os.path.join(out, n, "metrics.json")))


def commit_round(out, r, write):
    """Write round r into a temporary folder, then rename it into place: a crash leaves no half round."""
    tmp = os.path.join(out, f".round_{r}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    final = os.path.join(out, f"round_{r}")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_jsonl(os.path.join(out, "metrics.jsonl"),
                [json.load(open(os.path.join(out, f"round_{i}", "metrics.json"))) for i in finished_rounds(out)])


def open_run(args, explicit):
    """The run folder: a new one, or the one to resume (whose saved options win, unless given and different)."""
    if args.resume and args.out is None:
        runs = sorted(d for d in os.listdir("runs") if os.path.exists(os.path.join("runs", d, "config.json"))) \
            if os.path.isdir("runs") else []
        if not runs:
            fail("--resume: no run under runs/ to resume; give --out")
        args.out = os.path.join("runs", runs[-1])
    if args.out is None:
        args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        while os.path.exists(args.out):
            args.out += "x"
    cfg_path = os.path.join(args.out, "config.json")
    if not args.resume:
        if os.path.exists(cfg_path):
            fail(f"{args.out} holds another run; use --resume to continue it or choose another --out")
        os.makedirs(args.out, exist_ok=True)
        return args
    if not os.path.exists(cfg_path):
        fail(f"--resume: {args.out} has no run to resume (no config.json)")
    saved = json.load(open(cfg_path))
    diff = [k for k in saved if k not in RESUME_FREE and k in explicit and getattr(args, k) != saved[k]]
    if diff:
        fail("--resume: options differ from the run being resumed: "
             + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (run has {saved[k]})" for k in diff))
    for k, v in saved.items():
        if k not in RESUME_FREE:
            setattr(args, k, v)
    return args


# -----------------------------------------------------------------------------
# Setup: the three models, the prompts, the evaluator

def seed_for(args, r, purpose):
    """Every random choice is derived from --seed, the round and its purpose: a resumed run repeats it."""
    return (args.seed * 1_000_003 + r * 7_919 + {"prompts": 1, "sample": 2, "eval": 3, "warmup": 4, "train": 5}[purpose]) % 2**62


def prompt_generators(args, r, purpose, indices):
    """One CPU generator per prompt, seeded from the round's seed and the prompt's index in its list: a
    prompt's samples do not depend on which batch or which torchrun process draws them."""
    base = seed_for(args, r, purpose)
    return [torch.Generator().manual_seed((base * 1_000_003 + i) % 2**62) for i in indices]


@dataclass
class Setup:
    policy: Policy
    student: Scorer
    teacher: Scorer
    base_dir: str
    train_prompts: list | None   # None: the world draws fresh prompts every round
    eval_prompts: list
    evaluator: Evaluator
    world: object = None


def setup(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = None
    if args.policy is None:
        import world
        # The world's models are tiny: one thread is several times faster than two here, where
        # OpenMP threads spin against each other on small matrices.
        torch.set_num_threads(1)
        if train_loop.is_main():  # rank 0 builds the world (if not cached), the others wait and read it
            world.ensure_world(args.rebuild_world)
        train_loop.barrier()
        folder = world.ensure_world()
        policy_dir, student_dir, teacher_dir = (os.path.join(folder, n) for n in ("policy", "student", "teacher"))
        rng = random.Random(seed_for(args, 0, "eval"))
        eval_prompts = list(dict.fromkeys(world.random_prompt(rng) for _ in range(2 * args.eval_count)))[:args.eval_count]
        train_prompts = None
    else:
        policy_dir, student_dir, teacher_dir = args.policy, args.student, args.teacher
        train_prompts = data.read_prompts(args.prompts)
        if args.eval_prompts:
            eval_prompts = data.read_prompts(args.eval_prompts)
        else:  # a fixed, seeded share of --prompts, never trained on
            shuffled = random.Random(args.seed).sample(train_prompts, len(train_prompts))
            n_eval = min(args.eval_count, len(shuffled) // 5)
            if n_eval < 1:
                fail(f"{args.prompts} has too few prompts ({len(train_prompts)}) to hold some out; give --eval-prompts")
            eval_prompts, train_prompts = shuffled[:n_eval], shuffled[n_eval:]
        held = set(eval_prompts)
        train_prompts = [p for p in train_prompts if p not in held]
        if not train_prompts:
            fail("no training prompts are left once the held-out prompts are removed")
    policy = load_policy(policy_dir, args.prompt_format, device)
    student = load_scorer(student_dir, args.student_format, device, reward_head=True)
    teacher = load_scorer(teacher_dir, args.teacher_format, device, judge=args.teacher_judge, min_mass=args.judge_min_mass)
    if world is not None:
        evaluator = Evaluator("oracle", oracle=world.oracle)
    elif args.judge:  # a reward model scores; a causal LM is asked to compare
        is_lm = not is_reward_checkpoint(args.judge)
        evaluator = Evaluator("judge", judge=load_scorer(args.judge, args.teacher_format, device,
                                                         judge=is_lm, min_mass=args.judge_min_mass))
    else:
        evaluator = Evaluator("teacher", judge=teacher)
    check_lengths(args, policy, [student, teacher], (train_prompts or []) + eval_prompts)
    return Setup(policy, student, teacher, policy_dir, train_prompts, eval_prompts, evaluator, world)


def check_lengths(args, policy, scorers, prompts):
    """A prompt that cannot fit with its response is an error now, not after an hour of work."""
    for i, p in enumerate(prompts):
        n = len(policy.encode(p))
        if n + args.max_new_tokens > policy.lm.config.max_positions:
            fail(f"prompt {i} ({p[:40]!r}...) has {n} tokens: with --max-new-tokens {args.max_new_tokens} it exceeds "
                 f"the policy's context of {policy.lm.config.max_positions}")
        for s in scorers:
            if not s.judge and len(data.encode_prompt(s.tok, s.fmt, p)) + args.max_new_tokens + 1 > s.m.config.max_positions:
                fail(f"prompt {i} ({p[:40]!r}...) with --max-new-tokens {args.max_new_tokens} exceeds the context of "
                     f"{s.m.config.source}")


def round_prompts(args, S, r):
    rng = random.Random(seed_for(args, r, "prompts"))
    if S.train_prompts is not None:
        return rng.sample(S.train_prompts, min(args.prompts_per_round, len(S.train_prompts)))
    held = set(S.eval_prompts)
    out = []
    while len(out) < args.prompts_per_round:
        p = S.world.random_prompt(rng)
        if p not in held:  # held-out prompts never enter training
            out.append(p)
    return out


# -----------------------------------------------------------------------------
# Round 0: the base policy's held-out responses, the agreement pairs, the student's warm-up

def round_zero(args, S):
    t0 = time.time()
    ev = held_out(args, S, 0, None)
    # Agreement pairs: two distinct base samples per held-out prompt, ordered by the teacher, ties left out.
    agree = teacher_pairs(S.teacher, first_two_distinct(S.eval_prompts, ev["sampled"]))
    warm_pairs, warm_calls = [], 0
    if args.student_warmup > 0:
        warm_pairs, warm_calls = warmup_pairs(args, S)
        if warm_pairs:
            train_student(args, S, warm_pairs, 0)
        say(f"student warm-up: {len(warm_pairs)} teacher-labelled pairs ({warm_calls} teacher calls)")
    base = {"greedy": [s.__dict__ for s in ev["greedy"]], "sampled": [[s.__dict__ for s in g] for g in ev["sampled"]],
            "agreement_pairs": agree, "warmup_pairs": warm_pairs}
    m = {"round": 0, "teacher_calls_warmup": warm_calls, "agreement_pairs": len(agree)}
    m.update(evaluate(args, S, base, ev))
    m["seconds"] = {"eval": time.time() - t0}

    def write(folder):
        write_json(os.path.join(folder, "base_eval.json"), base)
        if args.student_warmup > 0:
            model.save_model(S.student.m, os.path.join(folder, "student"))
        write_json(os.path.join(folder, "metrics.json"), m)
    if train_loop.is_main():
        commit_round(args.out, 0, write)
    return base


def first_two_distinct(prompts, groups):
    """(prompt, [first, second]) for each prompt whose samples hold two distinct finished responses."""
    two = [(p, distinct_finished(g)[:2]) for p, g in zip(prompts, groups)]
    return [(p, c) for p, c in two if len(c) == 2]


def teacher_pairs(teacher, two, min_margin=0.0):
    """Pair records of (prompt, [a, b]) items, chosen first as the teacher orders them, with the teacher's
    margin; ties, invalid judge answers and margins below min_margin are left out."""
    pairs = []
    for (p, (a, b)), m in zip(two, teacher_orders(teacher, two)):
        if not math.isnan(m) and m != 0 and abs(m) >= min_margin:
            c, r = (a, b) if m > 0 else (b, a)
            pairs.append({"prompt": p, "chosen": c.text, "rejected": r.text, "chosen_finished": c.finished,
                          "rejected_finished": r.finished, "margin": abs(m)})
    return pairs


def greedy_args(args):
    return argparse.Namespace(**{**vars(args), "temperature": 0.0, "top_p": None})


def warmup_pairs(args, S):
    """--student-warmup N: the teacher orders N pairs of distinct base-policy samples (2 calls each)."""
    rng = random.Random(seed_for(args, 0, "warmup"))
    pool = S.train_prompts or [S.world.random_prompt(rng) for _ in range(4 * args.student_warmup)]
    prompts = rng.sample(pool, min(len(pool), 2 * args.student_warmup))

    def block(idx):
        ps = [prompts[i] for i in idx]
        return first_two_distinct(ps, sample(S.policy, ps, 2, args, prompt_generators(args, 0, "warmup", idx)))
    two = train_loop.per_item(len(prompts), args.sample_batch, block, "warm-up samples")[:args.student_warmup]
    return teacher_pairs(S.teacher, two, args.min_margin), 2 * len(two)  # the teacher sees both of each pair


# -----------------------------------------------------------------------------
# The two updates

def train_student(args, S, pairs, r):
    """Pairwise ranking loss on the teacher's pairs (all rounds so far: replay keeps what it knew)."""
    st = S.student
    rows = [(data.reward_ids(st.tok, st.fmt, p["prompt"], p["chosen"], p["chosen_finished"], st.eos),
             data.reward_ids(st.tok, st.fmt, p["prompt"], p["rejected"], p["rejected_finished"], st.eos)) for p in pairs]
    if args.student_lora_rank:
        model.add_lora(st.m, args.student_lora_rank)
    tc = train_loop.TrainConfig(lr=args.student_lr, epochs=args.student_epochs, batch_size=args.batch_size,
                                seed=seed_for(args, r, "train"), desc=f"round {r}: student")
    metrics = train_loop.train_reward(st.m, rows, st.pad, tc)
    if args.student_lora_rank:
        model.merge_lora(st.m)
    return metrics


def train_policy(args, S, pairs, r):
    """DPO on the round's pairs, on the policy's own sampled token ids."""
    pol = S.policy
    triples = [(pol.encode(p["prompt"]), p["chosen_ids"], p["rejected_ids"]) for p in pairs]
    reference = None  # round-start: the policy as it is now, computed once before the first update
    if args.reference == "sft":
        base = model.load_model(S.base_dir, next(pol.lm.parameters()).device)
        reference = train_loop.reference_logprobs(base, triples, pol.pad)
        del base
    if args.lora_rank:
        model.add_lora(pol.lm, args.lora_rank)
    tc = train_loop.TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                seed=seed_for(args, r, "train"), desc=f"round {r}: policy (DPO)")
    metrics = train_loop.train_dpo(pol.lm, triples, pol.pad, tc, beta=args.beta, loss_type=args.loss_type,
                                   label_smoothing=args.label_smoothing, sft_coef=args.sft_coef, reference=reference)
    if args.lora_rank:
        model.merge_lora(pol.lm)  # adapters off is then exactly this round's result; fresh ones next round
    return metrics


# -----------------------------------------------------------------------------
# Held-out evaluation

def as_samples(rows):
    return [Sample(**s) for s in rows]


def held_out(args, S, r, base):
    """The policy's greedy response and 4 samples for each held-out prompt, and how each fares against
    the base policy's (base None: this is the base policy), by blocks of prompts across processes: a
    dict of lists over all held-out prompts."""
    def block(idx):
        prompts = [S.eval_prompts[i] for i in idx]
        greedy = [g[0] for g in sample(S.policy, prompts, 1, greedy_args(args), None)]
        sampled = sample(S.policy, prompts, 4, args, prompt_generators(args, r, "eval", idx))
        base_greedy = greedy if base is None else as_samples([base["greedy"][i] for i in idx])
        base_sampled = sampled if base is None else [as_samples(base["sampled"][i]) for i in idx]
        flat, flat_base = [s for g in sampled for s in g], [s for g in base_sampled for s in g]
        return {"greedy": greedy, "sampled": sampled,
                "greedy_outcomes": S.evaluator.outcomes(prompts, greedy, base_greedy),
                "sampled_outcomes": S.evaluator.outcomes([p for p in prompts for _ in range(4)], flat, flat_base)}
    parts = train_loop.per_block(len(S.eval_prompts), args.sample_batch, block, f"round {r}: evaluation")
    return {k: [x for part in parts for x in part[k]] for k in parts[0]}


def evaluate(args, S, base, ev):
    """Round metrics from held_out's results: win rates, length, student-teacher agreement, oracle."""
    prompts, greedy = S.eval_prompts, ev["greedy"]
    m = {"win_rate_judge": S.evaluator.name}
    m.update(win_stats(ev["greedy_outcomes"], "win_rate_vs_base"))
    m.update(win_stats(ev["sampled_outcomes"], "win_rate_vs_base_sampled"))
    m["policy_len"] = sum(len(s.ids) for s in greedy) / len(greedy)
    pairs = base["agreement_pairs"]
    agrees = student_agrees(S.student, pairs)
    m["student_teacher_agreement"] = mean(agrees)
    if S.world is not None:
        o = S.world.oracle
        m["oracle_reward"] = sum(o(p, s.text) if s.finished else 0.0 for p, s in zip(prompts, greedy)) / len(prompts)
        m["oracle_exact"] = sum(s.finished and o(p, s.text) == 1.0 for p, s in zip(prompts, greedy)) / len(prompts)
        # On the pairs the oracle can tell apart: is the teacher right, and is the student?
        teacher_right = [o(p["prompt"], p["chosen"]) > o(p["prompt"], p["rejected"]) for p in pairs]
        decided = [i for i, p in enumerate(pairs) if o(p["prompt"], p["chosen"]) != o(p["prompt"], p["rejected"])]
        m["teacher_oracle_accuracy"] = mean([teacher_right[i] for i in decided])
        m["student_oracle_accuracy"] = mean([agrees[i] == teacher_right[i] for i in decided])
    return m


# -----------------------------------------------------------------------------
# One round, and the run

def run_round(args, S, base, r, replay):
    """Sample, rank, have the teacher decide, train the student and the policy, evaluate, save."""
    prompts = round_prompts(args, S, r)

    def block(idx):  # steps 1-3 on one block of prompts
        ps = [prompts[i] for i in idx]
        t0 = time.time()
        samples = sample(S.policy, ps, args.k, args, prompt_generators(args, r, "sample", idx))
        t_sample = time.time() - t0
        pairs, dropped, calls, overturned, secs = mine_pairs(ps, samples, S.student, S.teacher, args)
        return {"pairs": pairs, "dropped": dropped, "calls": calls, "overturned": overturned,
                "seconds": {"sample": t_sample, **secs}, "truncated": sum(not s.finished for g in samples for s in g)}
    parts = train_loop.per_block(len(prompts), args.sample_batch, block, f"round {r}: sample, rank, judge")
    pairs = [p for part in parts for p in part["pairs"]]  # in prompt order, whatever the number of processes
    dropped = {k: sum(part["dropped"][k] for part in parts) for k in parts[0]["dropped"]}
    overturned = sum(part["overturned"] for part in parts)
    secs = {k: sum(part["seconds"][k] for part in parts) for k in parts[0]["seconds"]}  # summed over processes
    m = {"round": r, "prompts": len(prompts), "pairs": len(pairs), "pairs_dropped": dropped,
         "teacher_calls": sum(part["calls"] for part in parts), "selection": args.selection,
         "teacher_calls_if_scoring_all": len(prompts) * args.k * (args.k - 1 if S.teacher.judge else 1),
         "teacher_overturn_rate": overturned / max(1, len(pairs)) if args.selection == "ts-align" else None,
         "truncation_rate": sum(part["truncated"] for part in parts) / (len(prompts) * args.k),
         "chosen_len": mean([len(p["chosen_ids"]) for p in pairs]),
         "rejected_len": mean([len(p["rejected_ids"]) for p in pairs]),
         "chosen_longer_share": mean([len(p["chosen_ids"]) > len(p["rejected_ids"]) for p in pairs])}
    if S.world is not None:
        o = S.world.oracle
        decided = [p for p in pairs if o(p["prompt"], p["chosen"]) != o(p["prompt"], p["rejected"])]
        m["pairs_oracle_accuracy"] = mean([o(p["prompt"], p["chosen"]) > o(p["prompt"], p["rejected"]) for p in decided])
    if pairs and args.selection != "student-only":  # with no teacher the student has nothing new to learn
        t0 = time.time()
        m["student_loss"] = train_student(args, S, replay + pairs, r)["loss"]
        secs["student_train"] = time.time() - t0
    if pairs:
        t0 = time.time()
        dpo = train_policy(args, S, pairs, r)
        m.update(dpo_loss=dpo["dpo_loss"], dpo_reward_accuracy=dpo["reward_accuracy"],
                 dpo_reward_margin=dpo["reward_margin"], dpo_first_loss=dpo["dpo_first_loss"])
        secs["policy_train"] = time.time() - t0
    elif train_loop.is_main():
        print(f"round {r}: no pairs survived the filters; the policy and student are unchanged", file=sys.stderr)
    t0 = time.time()
    ev = held_out(args, S, r, base)
    m.update(evaluate(args, S, base, ev))
    secs["eval"] = time.time() - t0
    m["seconds"] = secs

    def write(folder):
        model.save_model(S.policy.lm, os.path.join(folder, "policy"))
        model.save_model(S.student.m, os.path.join(folder, "student"))
        # The format other preference-training tools read, plus our scores and the policy's token ids.
        write_jsonl(os.path.join(folder, "pairs.jsonl"), pairs)
        write_json(os.path.join(folder, "examples.json"),
                   [{"prompt": p, "response": g.text} for p, g in zip(S.eval_prompts[:5], ev["greedy"])])
        write_json(os.path.join(folder, "metrics.json"), m)
    if train_loop.is_main():
        commit_round(args.out, r, write)
    return pairs, m


def restore(args, S, last):
    """Continue after round `last`: its policy and student, and the teacher pairs so far for replay."""
    device = next(S.policy.lm.parameters()).device
    if last >= 1:
        S.policy.lm = model.load_model(os.path.join(args.out, f"round_{last}", "policy"), device)
    stu = next((os.path.join(args.out, f"round_{i}", "student") for i in range(last, -1, -1)
                if os.path.isdir(os.path.join(args.out, f"round_{i}", "student"))), None)
    if stu:
        S.student.m = model.load_model(stu, device)
    replay = []
    for i in range(1, last + 1):
        replay += read_jsonl(os.path.join(args.out, f"round_{i}", "pairs.jsonl"))
    return replay


def print_table(out):
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    print(f"\n{'round':>5} {'pairs':>6} {'teacher':>8} {'win(greedy)':>12} {'win(sampled)':>13} {'agreement':>10} "
          f"{'dpo loss':>9} {'policy len':>10}")
    for m in rows:
        print(f"{m['round']:>5} {m.get('pairs', 0):>6} {m.get('teacher_calls', m.get('teacher_calls_warmup', 0)):>8} "
              f"{m['win_rate_vs_base']:>12.3f} {m['win_rate_vs_base_sampled']:>13.3f} "
              f"{m['student_teacher_agreement']:>10.3f} {m.get('dpo_loss', float('nan')):>9.4f} {m['policy_len']:>10.2f}")
    print(f"(win rates judged by: {rows[-1]['win_rate_judge']}; ties count half)")


def print_examples(out, S, base):
    last = max(finished_rounds(out))
    ex_path = os.path.join(out, f"round_{last}", "examples.json")
    if not os.path.exists(ex_path):
        return
    print("\nheld-out examples (base -> final):")
    for b, e in zip(base["greedy"], json.load(open(ex_path))):
        print(f"  {e['prompt']!r}: {b['text']!r} -> {e['response']!r}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    args = resolve(args)
    device = train_loop.init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if train_loop.is_main():  # rank 0 opens the run folder; every process then takes its options
        args = open_run(args, explicit)
    args = train_loop.broadcast(args)
    args.device = device  # each process its own
    torch.manual_seed(args.seed)  # a student from a causal LM gets a fresh head: drawn from this seed
    try:
        S = setup(args)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    done = train_loop.broadcast(finished_rounds(args.out) if train_loop.is_main() else None)
    if train_loop.is_main():
        write_json(os.path.join(args.out, "config.json"), vars(args))
    say(f"run folder: {args.out}" + (f" (resuming after round {max(done)})" if done else "")
        + (f", {train_loop.world_size()} processes" if train_loop.world_size() > 1 else ""))
    if 0 in done:
        base = json.load(open(os.path.join(args.out, "round_0", "base_eval.json")))
    else:
        base = round_zero(args, S)
    replay = list(base["warmup_pairs"]) + restore(args, S, max(done) if done else 0)
    for r in range((max(done) if done else 0) + 1, args.rounds + 1):
        pairs, m = run_round(args, S, base, r, replay)
        replay += pairs
        say(f"round {r}: {m['pairs']} pairs, teacher calls {m['teacher_calls']}, win rate vs base "
            f"{m['win_rate_vs_base']:.3f} (sampled {m['win_rate_vs_base_sampled']:.3f}), "
            f"student-teacher agreement {m['student_teacher_agreement']:.3f}")
    if train_loop.is_main():
        print_table(args.out)
        print_examples(args.out, S, base)
    train_loop.finish()


if __name__ == "__main__":
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: a failing process reports its traceback
        from torch.distributed.elastic.multiprocessing.errors import record
        record(main)()
    else:
        main()
