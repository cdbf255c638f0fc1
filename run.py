"""
Everything around the rounds: the process group joined, the roles and the prompts set up, and the
run folder, written so that an interrupted run loses at most its round in progress (`--resume`).

    runs/<date>-<time>/   (--out)
      .lock               held by the run while it runs (runlock.py), naming its process id and host
      config.json         the resolved options (a resumed run must not change them)
      metrics.jsonl       one JSON object per finished round, rebuilt after each one
      round_0/            base_eval.json: the base policy's held-out answers, the agreement pairs
                          and the warm-up pairs; student/ after a warm-up
      round_N/            policy/ and student/ (Hugging Face checkpoints), pairs.jsonl,
                          examples.json, metrics.json

A round folder is written under a temporary name and renamed when complete (round_N is always
whole), by rank 0 only; one run at a time holds the folder. A failed write (a full disk) or a Ctrl-C
stops every process with one line (what is saved, how to continue); --resume checks all it reads.
"""
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

import torch

import data
import evaluate
import parallel
import report
import runlock
from checkpoint import check_folder, load_model, read_config, save_model
from config import fail
from data import Pair, Sample
from roles import Policy, Scorer, load_policy, load_scorer

# ---- Starting: the process group and the run folder ---------------------------------------------

def say(*a, **kw):  # print, on rank 0 only (under torchrun every process runs the loop)
    if parallel.is_main():
        print(*a, **kw)


def start(args, explicit):
    """Join torchrun's process group; rank 0 opens the run folder; all take the args it settled."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = parallel.init_distributed(device, args.fsdp)
    if parallel.is_main():
        try:
            args = open_run(args, explicit)
        except SystemExit as e:  # refused, in one line: every process leaves with its status
            args = e
    args = parallel.broadcast(args)
    if isinstance(args, SystemExit):
        sys.exit(args.code)
    args.device = device  # each process its own
    return args


# ---- Setup: the three models, the prompts, the evaluator -----------------------------------------

@dataclass
class Setup:
    """The roles of the run, the prompts, and the judge of the win rate."""
    policy: Policy
    student: Scorer
    teacher: Scorer
    evaluator: evaluate.Evaluator
    base_dir: str               # the original policy's checkpoint
    train_prompts: list | None  # None: the world draws fresh prompts every round
    eval_prompts: list
    device: str
    world: object = None        # the world module, in the default world
    oracle: object = None       # its oracle (the paper's GPT-4 judge; never a training signal)
    max_shard_size: float = 5e9  # bytes per weight file of a saved checkpoint


def set_up(args, eval_seed):
    """The roles, the prompts and the win rate's judge; raises ValueError or FileNotFoundError."""
    for d in (args.policy, args.student, args.teacher, args.judge):  # all, before loading one
        if d:
            check_folder(d)
    if args.policy is None:
        import world
        torch.set_num_threads(1)  # tiny models: two OpenMP threads would spin against each other
        if args.rebuild_world:  # rank 0 builds; the others wait, then read it
            parallel.alone(world.rebuild)
        built = world.cache_folder() if args.rebuild_world else world.SHIPPED
        # --student, --teacher: another student or teacher in the world (a distilled one)
        dirs = [os.path.join(built, "policy"), args.student or os.path.join(built, "student"),
                args.teacher or os.path.join(built, "teacher")]
        rng, n = random.Random(eval_seed), args.eval_count
        train_prompts = None
        held = list(dict.fromkeys(world.random_prompt(rng) for _ in range(2 * n)))[:n]
    else:
        world, dirs = None, [args.policy, args.student, args.teacher]
        given = data.read_prompts(args.eval_prompts) if args.eval_prompts else None
        train_prompts, held = data.split_prompts(data.read_prompts(args.prompts), args.eval_count,
                                                 args.seed, given)
    policy = load_policy(dirs[0], args.prompt_format, args.device)
    student = load_scorer(dirs[1], args.student_format, args.device, reward_head=True)
    teacher = load_scorer(dirs[2], args.teacher_format, args.device, args.teacher_judge,
                          args.judge_min_mass)
    if world is not None:
        evaluator = evaluate.Evaluator("oracle", oracle=world.oracle)
    elif args.judge:  # a reward model scores; a causal LM is asked to compare
        judge = load_scorer(args.judge, args.teacher_format, args.device,
                            not read_config(args.judge).reward, args.judge_min_mass)
        evaluator = evaluate.Evaluator("judge", judge=judge)
    else:
        evaluator = evaluate.Evaluator("teacher", judge=teacher)
    data.check_lengths(policy, [student, teacher], (train_prompts or []) + held,
                       args.max_new_tokens)
    policy.model = parallel.place(policy.model, args.fsdp)
    student.model = parallel.place(student.model, args.fsdp)
    return Setup(policy, student, teacher, evaluator, dirs[0], train_prompts, held, args.device,
                 world, world.oracle if world else None, args.max_shard_size * 1e9)


def round_prompts(setup, n, seed):
    """A round's prompts: drawn from --prompts, or new ones from the world; none held out."""
    rng = random.Random(seed)
    if setup.world is None:
        return rng.sample(setup.train_prompts, min(n, len(setup.train_prompts)))
    held, out = set(setup.eval_prompts), []
    while len(out) < n:
        p = setup.world.random_prompt(rng)
        if p not in held:
            out.append(p)
    return out


# ---- Files, written atomically -------------------------------------------------------------------

def write_json(path, obj, lines=False):
    """obj as JSON (lines: a list, one object per line; non-finite floats null), written aside."""
    obj = finite(obj)
    with open(path + ".tmp", "w") as f:
        f.write("".join(json.dumps(x, allow_nan=False) + "\n" for x in obj) if lines
                else json.dumps(obj, indent=1, allow_nan=False))
    os.replace(path + ".tmp", path)


def finite(x):
    """x with None for each non-finite float: a round's metrics.json written before commit b81f131
    holds NaN for a mean over nothing (we write None), and --resume reads it back."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def read_json(path, lines=False):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)


# ---- Rounds --------------------------------------------------------------------------------------

def round_folders(out):
    """The numbers N of the round_N folders in out (one renamed aside, round_3.old, is not one)."""
    return sorted(int(n[6:]) for n in os.listdir(out) if re.fullmatch(r"round_\d+", n))


def finished_rounds(out):
    """Rounds whose folder was completed (it appears only once everything in it is written)."""
    return [r for r in round_folders(out)
            if os.path.exists(os.path.join(out, f"round_{r}", "metrics.json"))]


class SaveFailed(Exception):
    """A write to the run folder failed (a full disk, a lost mount): one line, on every process."""


def commit_round(out, r, write, *args):
    """write(folder, *args) on a temporary folder renamed to round_r (no half round), then the
    summaries rebuilt. Every process calls this (all gather a sharded checkpoint); rank 0 writes. An
    OSError: the partial folder goes, and every process raises SaveFailed with the same line."""
    tmp, main, error = os.path.join(out, f".round_{r}.tmp"), parallel.is_main(), None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    except OSError as e:
        error = e
    try:
        # even after a failed makedirs: under --fsdp the others gather each weight with rank 0
        write(tmp, *args)
        if main and not error:  # round_r is absent: --resume checked the folder
            os.replace(tmp, os.path.join(out, f"round_{r}"))
    except OSError as e:
        error = error or e
    if main and error:
        shutil.rmtree(tmp, ignore_errors=True)
        agree(f"round {r} was not saved ({why(error)}); {saved(out)}; free space, then continue "
              f"with: {resume_command(out)}")
    agree(rebuild_summaries(out) if main else None)


def agree(message):
    """Rank 0's line about a failed write, on every process (a collective): each raises it."""
    message = parallel.broadcast(message)
    if message:
        raise SaveFailed(message)


def rebuild_summaries(out):
    """metrics.jsonl and report.html from every finished round (rank 0); a line if not written."""
    try:
        rows = [read_json(os.path.join(out, f"round_{i}", "metrics.json"))
                for i in finished_rounds(out)]
        write_json(os.path.join(out, "metrics.jsonl"), rows, lines=True)
        report.write_run_report(out)
    except OSError as e:
        for name in ("metrics.jsonl.tmp", "report.html.tmp"):  # what was written; old files stay
            with suppress(OSError):
                os.remove(os.path.join(out, name))
        return (f"round {max(finished_rounds(out))} is saved in {out}, but metrics.jsonl or "
                f"report.html could not be rewritten ({why(e)}); free space, then --resume "
                f"rebuilds them: {resume_command(out)}")


def why(e):  # an OSError in a few words, with the file it was about
    if getattr(e, "filename", None):
        return f"{e.strerror or e}: {e.filename}"
    return str(e.strerror or e)


def saved(out, size=True):
    """Which rounds are saved in out, and (size) how much space the last one took."""
    done = finished_rounds(out)
    if not done:
        return f"no round is finished yet in {out}"
    last, folder = max(done), os.path.join(out, f"round_{max(done)}")
    line = f"{f'rounds 0-{last} are' if last else 'round 0 is'} saved in {out}"
    if not size:
        return line
    took = sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(folder) for f in files)
    return line + f" (round {last} took {took / 1e6:.1f} MB)"


def resume_command(out):
    how = "torchrun ..." if "LOCAL_RANK" in os.environ else "python"
    return f"{how} tsalign.py --resume --out {out}"


def write_config(args):
    """config.json (rank 0); on --resume metrics.jsonl and report.html too. SaveFailed if not."""
    message, path = None, os.path.join(args.out, "config.json")
    if parallel.is_main():
        try:
            write_json(path, {k: v for k, v in vars(args).items() if k not in ("report", "output")})
        except OSError as e:
            with suppress(OSError):
                os.remove(path + ".tmp")
            message = (f"{path} could not be written ({e.strerror or e}); free space, then run the "
                       f"same command again")
        if message is None and finished_rounds(args.out):  # --resume: as after the last round
            message = rebuild_summaries(args.out)
    agree(message)


def load_base(out):
    """save_round0's answers [(greedy Sample, [Sample])], agreement pairs and warm-up pairs."""
    base = read_json(os.path.join(out, "round_0", "base_eval.json"))
    answers = [(Sample(**g), [Sample(**s) for s in group])
               for g, group in zip(base["greedy"], base["sampled"])]
    pairs = [[Pair(**p) for p in base[key]] for key in ("agreement_pairs", "warmup_pairs")]
    return answers, *pairs


def resume(setup, out, done, fsdp):
    """The base answers, the agreement pairs and every teacher pair so far (the student's replay) of
    the finished rounds `done`; the last policy and the newest student saved replace setup's."""
    last = max(done)
    base, agreement, replay = load_base(out)
    for r in range(1, last + 1):
        replay += [Pair(**p) for p in read_json(os.path.join(out, f"round_{r}", "pairs.jsonl"),
                                                lines=True)]
    if last >= 1:
        policy_dir = os.path.join(out, f"round_{last}", "policy")
        setup.policy.model = parallel.place(load_model(policy_dir, setup.device), fsdp)
    if student_dir := latest(out, last, "student"):
        setup.student.model = parallel.place(load_model(student_dir, setup.device), fsdp)
    return base, agreement, replay


def save_models(folder, max_shard_size, **models):
    """save_model each into folder/name; an OSError raised after all (under --fsdp all gather)."""
    error = None
    for name, m in models.items():
        try:
            save_model(m, os.path.join(folder, name), max_shard_size)
        except OSError as e:
            error = error or e
    if error:
        raise error


def save_round(folder, setup, pairs, answers, base, metrics):
    """round_N: the policy and the student, pairs.jsonl (the format preference-training tools read,
    with our margins and token ids), a few held-out answers (with the oracle's scores), metrics."""
    save_models(folder, setup.max_shard_size, policy=setup.policy.model,
                student=setup.student.model)
    if not parallel.is_main():
        return
    write_json(os.path.join(folder, "pairs.jsonl"), [p.to_json() for p in pairs], lines=True)
    oracle = setup.oracle
    score = partial(evaluate.oracle_score, oracle) if oracle else lambda p, s: None
    write_json(os.path.join(folder, "examples.json"),
               [{"prompt": p, "response": g.text, "oracle": score(p, g), "base_oracle": score(p, b)}
                for p, (g, _), (b, _) in zip(setup.eval_prompts[:5], answers, base)])
    write_json(os.path.join(folder, "metrics.json"), metrics)


def save_round0(folder, setup, answers, agreement_pairs, warmup_pairs, warmed, metrics):
    """round_0: base_eval.json (the base policy's held-out answers, the agreement and warm-up
    pairs), the metrics, and (warmed) the student after its warm-up."""
    if warmed:
        save_models(folder, setup.max_shard_size, student=setup.student.model)
    if not parallel.is_main():
        return
    base = {"greedy": [g.__dict__ for g, _ in answers],
            "sampled": [[s.__dict__ for s in g] for _, g in answers],
            "agreement_pairs": [p.to_json() for p in agreement_pairs],
            "warmup_pairs": [p.to_json() for p in warmup_pairs]}
    write_json(os.path.join(folder, "base_eval.json"), base)
    write_json(os.path.join(folder, "metrics.json"), metrics)


def latest(out, last, name):
    """The newest round folder up to `last` that holds name/ (a policy or a student), or None."""
    return next((os.path.join(out, f"round_{i}", name) for i in range(last, -1, -1)
                 if os.path.isdir(os.path.join(out, f"round_{i}", name))), None)


# ---- Opening a run: a new folder, or the one to resume -------------------------------------------

# Options that may differ on --resume without changing what the run computes.
RESUME_FREE = ("rounds", "resume", "out", "rebuild_world", "device", "report", "output")


def open_run(args, explicit):
    """args.out: a new run folder, or the one to resume, locked first and checked whole; its saved
    options win (one given explicitly with another value is an error)."""
    if args.resume and args.out is None:
        runs = sorted(glob.glob(os.path.join("runs", "*", "config.json")))
        if not runs:
            fail("--resume: no run under runs/ to resume; give --out")
        args.out = os.path.dirname(runs[-1])
    if not args.resume:
        try:
            args.out = runlock.new_folder(args.out)
            runlock.lock(args.out)
        except runlock.Refused as e:
            fail(str(e))
        if os.path.exists(os.path.join(args.out, "config.json")):
            fail(f"{args.out} holds another run; use --resume to continue it or choose another "
                 f"--out")
        return args
    cfg_path = os.path.join(args.out, "config.json")
    if not os.path.exists(cfg_path):
        fail(f"--resume: {args.out} has no run to resume (no config.json)")
    try:
        runlock.lock(args.out)
    except runlock.Refused as e:
        fail(str(e))
    try:
        saved = read_json(cfg_path)
    except ValueError as e:
        fail(f"--resume: {cfg_path} is damaged ({e}); the run's options are in it: repair it, or "
             f"start a new run")
    check_rounds(args.out)
    diff = [k for k in saved
            if k not in RESUME_FREE and k in explicit and getattr(args, k) != saved[k]]
    if diff:
        fail("--resume: options differ from the run being resumed: "
             + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (run has {saved[k]})"
                         for k in diff))
    for k, v in saved.items():
        if k not in RESUME_FREE:
            setattr(args, k, v)
    return args


def check_rounds(out):
    """Every file --resume reads must parse, each checkpoint it loads pass check_folder; else fail()
    naming it and how to redo its round (nothing is moved or deleted here)."""
    last = max(round_folders(out), default=-1)
    pairs = lambda p: [Pair(**x) for x in read_json(p, lines=True)]  # noqa: E731
    for r in range(last + 1):
        d = os.path.join(out, f"round_{r}")
        reads = [("metrics.json", read_json)]
        if r == 0:
            reads.append(("base_eval.json", lambda p: load_base(out)))
        else:
            reads.append(("pairs.jsonl", pairs))
        if r == last:  # what the run loads, and what it prints at the end
            reads += [("examples.json", read_json)] * (r > 0)
            reads += [(n, check_folder) for n in ("policy", "student")
                      if r > 0 or os.path.isdir(os.path.join(d, n))]
        for name, read in reads:
            try:
                read(os.path.join(d, name))
            except (OSError, ValueError, TypeError, KeyError) as e:
                missing = isinstance(e, FileNotFoundError) and read is not check_folder
                how = "is missing" if missing else f"is damaged ({e})"
                later = f" and every later round folder (to round_{last})" if r < last else ""
                fail(f"--resume: {os.path.join(d, name)} {how}; to redo round {r}, move "
                     f"round_{r}{later} out of {out}, then resume: "
                     f"{'they are' if later else 'it is'} recomputed from "
                     f"{f'round {r - 1}' if r else 'the start'}")


# ---- What a finished run prints ------------------------------------------------------------------

def draw_report(folders, output):
    """--report: several run folders on the same axes (report.py), no training."""
    try:
        say(f"wrote {report.compare(folders, output)}")
    except (OSError, ValueError) as e:
        fail(str(e))


def stopped(out, status):
    """One line instead of a traceback (process 0's): what is saved, and how to continue the run."""
    for s in (signal.SIGINT, signal.SIGTERM):  # a further Ctrl-C cannot break the line
        signal.signal(s, signal.SIG_IGN)
    if parallel.is_main():
        how = "Ctrl-C" if status == 130 else "SIGTERM"
        if out and os.path.exists(os.path.join(out, "config.json")):
            # a round cut short by a second Ctrl-C
            for tmp in glob.glob(os.path.join(out, ".round_*.tmp")):
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"\ntsalign: stopped by {how}; {saved(out, size=False)}; continue with: "
                  f"{resume_command(out)}", file=sys.stderr)
        else:
            print(f"\ntsalign: stopped by {how} before the run started; nothing is saved",
                  file=sys.stderr)
    sys.exit(status)


def save_failed(e):
    """SaveFailed's one line (process 0), exit status 1 on every process."""
    if parallel.is_main():
        print(f"tsalign: error: {e}", file=sys.stderr)
    sys.exit(1)


def print_table(out):
    rows = read_json(os.path.join(out, "metrics.jsonl"), lines=True)
    print(f"\n{'round':>5} {'pairs':>6} {'teacher':>8} {'win(greedy)':>12} {'win(sampled)':>13} "
          f"{'agreement':>10} {'dpo loss':>9} {'policy len':>10}")
    num = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731  (None: not measured)
    for m in rows:
        calls = m.get("teacher_calls", m.get("teacher_calls_warmup", 0))
        print(f"{m['round']:>5} {m.get('pairs', 0):>6} {calls:>8} "
              f"{num(m['win_rate_vs_base'], '.3f'):>12} "
              f"{num(m['win_rate_vs_base_sampled'], '.3f'):>13} "
              f"{num(m.get('student_teacher_agreement'), '.3f'):>10} "
              f"{num(m.get('dpo_loss'), '.4f'):>9} {num(m['policy_len'], '.2f'):>10}")
    print(f"(win rates judged by: {rows[-1]['win_rate_judge']}; ties count half)")


def print_examples(out, base):
    path = os.path.join(out, f"round_{max(finished_rounds(out))}", "examples.json")
    if os.path.exists(path):
        print("\nheld-out examples (base -> final):")
        for (b, _), e in zip(base, read_json(path)):
            print(f"  {e['prompt']!r}: {b.text!r} -> {e['response']!r}")
