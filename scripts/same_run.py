"""
Does a change leave what a run computes unchanged? Run an earlier commit and the working tree back to back
on the default world and compare what they wrote.

    python scripts/same_run.py 5540fa7                    # the three --selection values, 3 rounds, seed 0
    python scripts/same_run.py 5540fa7 --selection ts-align --rounds 1
    python scripts/same_run.py 5540fa7 --selection "student-only --min-margin 0.1"   # a case: selection, options

For each case, both sides run `python tsalign.py --rounds R --seed S --selection X [options]` (the earlier
commit from a `git worktree`) on the world that ships with the repository (default_world/), so both sides
start from the same weights; the earlier commit must ship it too. Then every round's pairs.jsonl must be
byte-identical, and metrics.jsonl equal but for the timing field `seconds`. A reshaping of the code must pass this; a change of the arithmetic (a fused
matrix product, another optimizer) is expected to fail it, and should then be re-measured instead.

Not a test (pytest collects only test_*.py): it takes about 1 minute per side and selection on 2 cores.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTIONS = ("ts-align", "teacher-all", "student-only")


def run(code_dir, out, case, rounds, seed):
    selection, *options = case.split()
    cmd = [sys.executable, os.path.join(code_dir, "tsalign.py"), "--rounds", str(rounds), "--seed", str(seed),
           "--selection", selection, *options, "--out", out]
    with open(out + ".log", "w") as log:  # progress bars and printed results, kept beside the run
        subprocess.run(cmd, cwd=code_dir, check=True, stdout=log, stderr=subprocess.STDOUT)


def same(u, v):
    """Equal, NaN equal to NaN (an empty round's means)."""
    return u == v or (isinstance(u, float) and isinstance(v, float) and u != u and v != v)


def compare(a, b, rounds):
    """A list of differences between run folders a and b (empty: the same run)."""
    diffs = []
    for r in range(1, rounds + 1):
        pa, pb = (open(os.path.join(x, f"round_{r}", "pairs.jsonl"), "rb").read() for x in (a, b))
        if pa != pb:
            diffs.append(f"round {r}: pairs.jsonl differs ({len(pa)} vs {len(pb)} bytes)")
    ma, mb = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in open(os.path.join(x, "metrics.jsonl"))] for x in (a, b))
    for x, y in zip(ma, mb):
        keys = [k for k in sorted(set(x) | set(y)) if not same(x.get(k), y.get(k))]
        if keys:
            diffs.append(f"round {x['round']}: metrics differ in {', '.join(keys)}")
    if len(ma) != len(mb):
        diffs.append(f"{len(ma)} vs {len(mb)} rounds in metrics.jsonl")
    return diffs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("commit", help="the earlier commit to compare the working tree with")
    p.add_argument("--selection", default=",".join(SELECTIONS),
                   help="comma-separated cases, each a --selection value and perhaps more options")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for the two sides' runs (default: a temporary one)")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="tsalign-same-")
    old = os.path.join(work, "code-" + args.commit)
    if not os.path.isdir(old):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old, args.commit], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failed = False
    try:
        if not os.path.isdir(os.path.join(old, "default_world")):
            sys.exit(f"{args.commit} does not ship default_world/: its runs would build their own world")
        for sel in args.selection.split(","):
            outs = {}
            for side, code in (("old", old), ("new", ROOT)):
                outs[side] = os.path.join(work, f"{side}-{sel.replace(' ', '_')}")
                if not os.path.exists(os.path.join(outs[side], "metrics.jsonl")):
                    run(code, outs[side], sel, args.rounds, args.seed)
            diffs = compare(outs["old"], outs["new"], args.rounds)
            n_pairs = [sum(1 for _ in open(os.path.join(outs["new"], f"round_{r}", "pairs.jsonl")))
                       for r in range(1, args.rounds + 1)]
            print(f"{sel:>30}: {'SAME' if not diffs else 'DIFFERENT'} (pairs per round {n_pairs})", flush=True)
            for d in diffs:
                print("              " + d)
            failed |= bool(diffs)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"runs kept in {work}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
