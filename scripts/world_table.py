"""
Re-measure the default world's two result tables of docs/results.md (the selection strategies, whose seed-0
rows the README shows, and the distilled student): every strategy and seed, printed as the markdown rows
there.

    python scripts/world_table.py                        # seeds 0, 1, 2: both tables, about 20 minutes on 2 cores
    python scripts/world_table.py --seeds 0 --work runs/table   # one seed; run folders kept (and reused) there

The runs, each `python tsalign.py --rounds R --seed S ...` on the shipped world (default_world/):
  selection table   --selection ts-align | teacher-all | student-only --min-margin 0.1 (without the world's
                    student length penalty: the student's own order, PLAIN) | the same with the penalty
  distilled table   (a) the initial student, student-only (PLAIN, the run above); (b) the round-R student
                    of the ts-align run, student-only, PLAIN; (b') the same with the length countermeasures
                    (COUNTER); (c) the ts-align run itself
A run folder that already holds R rounds is read, not run again (its first R rounds, if it has more: every
round's seeds derive from --seed and the round alone), so an interrupted table continues.
Not a test (pytest collects only test_*.py).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_ONLY = ["--selection", "student-only", "--min-margin", "0.1"]  # its margins are the student's own units
# The distilled student without length countermeasures, and with them (the world's student length penalty,
# and R-DPO's term).
PLAIN = ["--student-length-penalty", "0"]
COUNTER = ["--student-length-penalty", "0.5", "--rdpo-alpha", "0.5"]


def run(work, name, rounds, seed, options):
    """The run folder of `tsalign.py --rounds R --seed S options`, run now unless it is there already."""
    out = os.path.join(work, f"{name}-s{seed}")
    if not os.path.exists(os.path.join(out, f"round_{rounds}", "metrics.json")):
        cmd = [sys.executable, os.path.join(ROOT, "tsalign.py"), "--rounds", str(rounds), "--seed", str(seed),
               *options, "--out", out] + (["--resume"] if os.path.exists(os.path.join(out, "config.json")) else [])
        print(" ".join(["python tsalign.py"] + cmd[2:]), file=sys.stderr, flush=True)
        with open(out + ".log", "w") as log:  # progress bars and printed results, kept beside the run
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(out, "metrics.jsonl")) as f:  # a longer run's first R rounds are this run's rounds
        return out, [json.loads(line) for line in f][:rounds + 1]


def per_round(rows, key, spec=".3f"):
    return " / ".join("-" if m.get(key) is None else format(m[key], spec) for m in rows[1:])


def selection_row(name, seed, rows):
    """A row of the selection table: win rates, agreement, teacher calls, exact answers, pairs, length."""
    base, last = rows[0], rows[-1]
    calls = sum((m.get("teacher_calls") or 0) + (m.get("teacher_calls_warmup") or 0) for m in rows)
    return (f"| {name} | {seed} | {per_round(rows, 'win_rate_vs_base')} ({last['win_rate_stderr_vs_base']:.3f}) | "
            f"{last['win_rate_vs_base_sampled']:.3f} | {base['student_teacher_agreement']:.3f} -> "
            f"{last['student_teacher_agreement']:.3f} | {calls:,} | {last['oracle_exact']:.3f} (base "
            f"{base['oracle_exact']:.3f}) | {per_round(rows, 'pairs_oracle_accuracy', '.2f')} | "
            f"{last['policy_len']:.2f} (base {base['policy_len']:.2f}) |")


def distilled_row(name, seed, rows):
    """A row of the distilled-student table: win rates, the mined pairs' oracle accuracy, calls, length."""
    calls = sum((m.get("teacher_calls") or 0) + (m.get("teacher_calls_warmup") or 0) for m in rows)
    return (f"| {name} | {seed} | {per_round(rows, 'win_rate_vs_base')} ({rows[-1]['win_rate_stderr_vs_base']:.3f}) | "
            f"{per_round(rows, 'pairs_oracle_accuracy', '.2f')} | {calls:,} | {rows[-1]['policy_len']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default=os.path.join("runs", "world-table"), help="folder of the run folders")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.work, exist_ok=True)
    sel, dist = [], []
    for seed in seeds:
        runs = {name: run(args.work, name, args.rounds, seed, opts) for name, opts in
                [("ts-align", []), ("teacher-all", ["--selection", "teacher-all"]),
                 ("student-only", STUDENT_ONLY + PLAIN), ("student-only-penalised", STUDENT_ONLY)]}
        student = os.path.join(runs["ts-align"][0], f"round_{args.rounds}", "student")
        runs["distilled"] = run(args.work, "distilled", args.rounds, seed, STUDENT_ONLY + ["--student", student] + PLAIN)
        runs["distilled-counter"] = run(args.work, "distilled-counter", args.rounds, seed,
                                        STUDENT_ONLY + ["--student", student] + COUNTER)
        sel += [(name, seed, runs[name][1]) for name in
                ("ts-align", "teacher-all", "student-only", "student-only-penalised")]
        dist += [(name, seed, runs[key][1]) for name, key in
                 [("(a) initial student, student-only", "student-only"),
                  (f"(b) distilled student (round {args.rounds} of (c)), student-only, " + " ".join(PLAIN), "distilled"),
                  ("(b') the same, with " + " ".join(COUNTER), "distilled-counter"), ("(c) ts-align", "ts-align")]]
    r = " / ".join(str(i) for i in range(1, args.rounds + 1))
    print(f"\n| strategy | seed | greedy win rate vs base, rounds {r} (stderr) | sampled win rate (round {args.rounds}) "
          f"| student-teacher agreement, round 0 -> {args.rounds} | teacher calls ({args.rounds} rounds) | exact answers "
          f"(round {args.rounds}) | oracle accuracy of mined pairs, rounds {r} | policy length (round {args.rounds}) |")
    print("| --- " * 9 + "|")
    shown = {"student-only-penalised": "student-only, " + " ".join(COUNTER[:2])}  # the world's default penalty
    for name in ("ts-align", "teacher-all", "student-only", "student-only-penalised"):
        print("\n".join(selection_row(shown.get(n, n), s, rows) for n, s, rows in sel if n == name))
    print(f"\n| student, selection | seed | greedy win rate vs base, rounds {r} (stderr) | oracle accuracy of mined "
          f"pairs, rounds {r} | teacher calls | policy length (round {args.rounds}) |")
    print("| --- " * 6 + "|")
    for name in dict.fromkeys(n for n, _, _ in dist):
        print("\n".join(distilled_row(n, s, rows) for n, s, rows in dist if n == name))
    print(f"\nrun folders: {args.work}")


if __name__ == "__main__":
    main()
