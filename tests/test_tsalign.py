"""End to end: one TS-Align run on tiny random Hugging Face checkpoints, resume, and the command-line errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import roles
import run
import tsalign
from checkpoint import load_model, save_model
from conftest import argv, greedy_answers, hf_load, metrics, pairs_of, rescore
from data import Pair, Sample
from model import add_reward_head

def without_seconds(rows):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in rows]


def rejudge(teacher_dir, prompts, ours, base):
    """Outcomes (1 win, 0.5 tie, 0 loss) of (text, finished) answers against the base's, by the teacher loaded
    on its own: the same answer is a tie, otherwise the higher reward wins."""
    s = roles.load_scorer(teacher_dir, "chatml", "cpu")
    score = lambda p, a: s.score([p], [a[0]], [a[1]])[0].item()  # noqa: E731
    out = []
    for p, a, b in zip(prompts, ours, base):
        d = 0.0 if a == b else score(p, a) - score(p, b)
        out.append(1.0 if d > 0 else 0.0 if d < 0 else 0.5)
    return out


def check_decided(scorer_dir, ps, who):
    """Every pair's chosen response is the one the reward model in scorer_dir, loaded on its own, prefers,
    by the margin stored."""
    c, rej = rescore(scorer_dir, ps)
    wrong = (c <= rej).nonzero().flatten().tolist()
    assert not wrong, f"{who} prefers the rejected response of pairs {wrong}"
    assert torch.allclose(c - rej, torch.tensor([p["margin"] for p in ps]), atol=1e-5), (c - rej, ps)


def reached_teacher(m):
    """The prompts of a round whose two responses the teacher saw: those kept, and those it dropped."""
    return m["pairs"] + m["pairs_dropped"]["low_margin"] + m["pairs_dropped"]["invalid_judge"]


def test_two_rounds_end_to_end(world, tmp_path):
    out = tmp_path / "run"
    tsalign.main(argv(world, out, "--rounds", "2"))
    rows = metrics(out)
    assert [m["round"] for m in rows] == [0, 1, 2]
    assert rows[0]["win_rate_vs_base"] == 0.5  # the base policy against itself: all ties
    assert rows[0]["teacher_calls_warmup"] >= 2
    _, held = data.split_prompts(data.read_prompts(world["prompts"]), 6, 0)  # the run's held-out prompts (seed 0)
    base = [(g["text"], g["finished"]) for g in run.read_json(str(out / "round_0" / "base_eval.json"))["greedy"]]
    overturned = decided = 0
    for m in rows[1:]:
        r, ps = m["round"], pairs_of(out, m["round"])
        assert m["prompts"] == 12
        assert m["pairs"] + sum(m["pairs_dropped"].values()) == 12  # every prompt accounted for
        assert m["pairs"] == len(ps) > 0, "no pairs mined: the test world is too weak to test anything"
        # The teacher's verdict: re-scored by the teacher loaded on its own, every pair's chosen response
        # is the one it prefers, by the margin stored.
        check_decided(world["teacher"], ps, f"round {r}: the teacher")
        # It overturned the student that ranked the samples (the newest saved before the round) where that
        # student prefers the rejected one; and it saw two responses of each prompt that reached it.
        sc, srej = rescore(str(out / f"round_{r - 1}" / "student"), ps)
        assert round(m["teacher_overturn_rate"] * m["pairs"]) == (sc < srej).sum().item()
        overturned += (sc < srej).sum().item()
        assert m["teacher_calls"] == 2 * reached_teacher(m)
        assert m["teacher_calls"] < m["teacher_calls_if_scoring_all"] == 12 * 4
        # The win rate: the round's greedy answers (regenerated from its saved policy) against the base's,
        # re-judged by the teacher outside the Evaluator.
        assert m["win_rate_judge"] == "teacher"
        ours = greedy_answers(str(out / f"round_{r}" / "policy"), held, 16)
        examples = run.read_json(str(out / f"round_{r}" / "examples.json"))
        assert [t for t, _ in ours[:5]] == [e["response"] for e in examples]
        want = rejudge(world["teacher"], held, ours, base)
        got = (m["wins_vs_base"], m["ties_vs_base"], m["losses_vs_base"])
        assert got == (want.count(1.0), want.count(0.5), want.count(0.0)), want
        assert abs(m["win_rate_vs_base"] - sum(want) / len(want)) < 1e-9
        decided += want.count(1.0) + want.count(0.0)
    assert overturned > 0, "the teacher overturned no pair: its verdict is not tested"
    assert decided > 0, "every held-out answer tied with the base's: the win rate is not tested"
    r = rows[1]
    assert abs(r["dpo_first_loss"] - 0.6931) < 1e-3  # the policy equals its reference at the first step
    for p in pairs_of(out, 1):
        assert p["chosen"] != p["rejected"]
        assert p["chosen_finished"] and p["rejected_finished"]
    # The saved policy loads in transformers and agrees with ours.
    import transformers
    ours = load_model(str(out / "round_2" / "policy"), device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "round_2" / "policy", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
    assert os.path.exists(out / "round_2" / "policy" / "tokenizer.json")
    assert os.path.exists(out / "round_2" / "student" / "config.json")
    cfg = json.load(open(out / "config.json"))
    assert cfg["k"] == 4 and cfg["selection"] == "ts-align"


def test_resume_equals_uninterrupted(world, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    tsalign.main(argv(world, full, "--rounds", "2"))
    tsalign.main(argv(world, part, "--rounds", "1"))
    tsalign.main(["--resume", "--out", str(part), "--rounds", "2"])  # saved options are reused
    assert without_seconds(metrics(full)) == without_seconds(metrics(part))
    a = load_model(str(full / "round_2" / "policy"), device="cpu")
    b = load_model(str(part / "round_2" / "policy"), device="cpu")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("extra, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--k", "1"], "--k must be at least 2"),
    (["--prompt-format", "nope"], "unknown prompt format 'nope'"),
    (["--policy", "/nonexistent/policy"], "does not exist"),
    (["--rebuild-world"], "--rebuild-world is for the default world"),
    (["--fsdp"], "--fsdp shards the models across torchrun's processes"),
    (["--max-shard-size", "0"], "--max-shard-size must be positive"),
])
def test_bad_options_fail_with_one_line(world, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        tsalign.main(argv(world, tmp_path / "run") + extra)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_bad_prompts_file_names_the_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a b"}\n{"prompt": 3}\n')
    with pytest.raises(SystemExit):
        tsalign.main(argv(world, tmp_path / "run") + ["--prompts", str(bad)])
    assert "line 2" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(world, tmp_path, capsys):
    out = tmp_path / "run"
    tsalign.main(argv(world, out, "--rounds", "1"))
    before = open(out / "metrics.jsonl").read()
    with pytest.raises(SystemExit):
        tsalign.main(argv(world, out, "--rounds", "1"))
    assert "holds another run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tsalign.main(["--resume", "--out", str(out), "--k", "6"])
    assert "options differ" in capsys.readouterr().err
    assert open(out / "metrics.jsonl").read() == before


def response_logprob(hf, prompt_ids, response_ids, average):
    """log p(response | prompt) under a transformers causal LM, from its full logits over the one sequence."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + response_ids])).logits[0, len(prompt_ids) - 1:-1]  # (R, V)
    lp = logits.log_softmax(-1).gather(1, torch.tensor(response_ids)[:, None]).sum().item()
    return lp / len(response_ids) if average else lp


SFT_TWO_ROUNDS = ["--rounds", "2", "--batch-size", "12", "--epochs", "4", "--lora-rank", "2",
                  "--student-lora-rank", "2", "--reference", "sft", "--loss-type", "ipo", "--average-logprobs"]


@pytest.mark.parametrize("extra", [
    ["--selection", "teacher-all"],
    ["--selection", "student-only"],
    ["--teacher-judge", "--judge-min-mass", "0"],
    ["--teacher-judge", "--judge-min-mass", "0", "--selection", "teacher-all"],
    SFT_TWO_ROUNDS,
    ["--judge", "JUDGE", "--judge-min-mass", "0"],
])
def test_one_round_variants(world, tmp_path, extra):
    if "--teacher-judge" in extra:
        extra = extra + ["--teacher", world["judge"]]
    extra = [world["judge"] if x == "JUDGE" else x for x in extra]
    out = tmp_path / "run"
    tsalign.main(argv(world, out, "--rounds", "1", *extra))
    m = metrics(out)[1]
    K = 4
    assert m["win_rate_judge"] == ("judge" if "--judge" in extra else "teacher")
    n_teacher = m["teacher_calls"]
    if "student-only" in extra:
        assert n_teacher == 0 and m["student_teacher_agreement"] == metrics(out)[0]["student_teacher_agreement"]
    elif "teacher-all" in extra:
        # every distinct finished response of a ranked prompt is scored (judge: every ordering of them)
        assert n_teacher > 0
        assert m["teacher_calls_if_scoring_all"] == 12 * (K * (K - 1) if "--teacher-judge" in extra else K)
    else:
        assert n_teacher == 2 * reached_teacher(m)
    assert m["pairs"] > 0, "no pairs mined: nothing below is tested"
    assert abs(m["dpo_first_loss"] - (0.6931 if "ipo" not in extra else 1 / (4 * 0.1 ** 2))) < 1e-2
    # Whoever decided the pairs (a reward-model teacher, or the student alone: the one saved after its warm-up),
    # loaded on its own, prefers every chosen response by the margin stored.
    ps = pairs_of(out, 1)
    if "--teacher-judge" in extra:
        if "teacher-all" not in extra:  # the judge asked in both orders (a tournament's margin is not one comparison)
            judge = roles.load_scorer(world["judge"], "chatml", "cpu", judge=True, min_mass=0)
            got = judge.margins([p["prompt"] for p in ps],
                                [Sample(None, p["chosen"], p["chosen_finished"]) for p in ps],
                                [Sample(None, p["rejected"], p["rejected_finished"]) for p in ps])
            assert (got > 0).all() and torch.allclose(got, torch.tensor([p["margin"] for p in ps]), atol=1e-5)
    else:
        if "student-only" in extra:
            check_decided(str(out / "round_0" / "student"), ps, "the student")
        else:
            check_decided(world["teacher"], ps, "the teacher")
    # The policy learned, and what it learned was saved: with LoRA (base weights frozen) this holds only
    # if the adapters were merged into the weights before saving.
    saved = load_model(str(out / "round_1" / "policy"), device="cpu").state_dict()
    start = load_model(world["policy"], device="cpu").state_dict()
    assert saved.keys() == start.keys()
    assert max((saved[k] - start[k]).abs().max() for k in saved) > 1e-4
    if "--reference" not in extra:
        return
    # --reference sft: round 2's first DPO step (one batch holds all its pairs) compares the round-start
    # policy (round 1's) with the original one, not with itself, in IPO's loss on per-token mean
    # log-probs: computed here with transformers from the two saved checkpoints.
    sft, start = hf_load(world["policy"]), hf_load(str(out / "round_1" / "policy"))
    tok = data.load_tokenizer(world["policy"])
    h = []
    for p in pairs_of(out, 2):
        prompt = data.encode_prompt(tok, "chatml", p["prompt"])
        lp = {(name, side): response_logprob(lm, prompt, p[f"{side}_ids"], average=True)
              for name, lm in (("pi", start), ("ref", sft)) for side in ("chosen", "rejected")}
        h.append((lp["pi", "chosen"] - lp["ref", "chosen"]) - (lp["pi", "rejected"] - lp["ref", "rejected"]))
    want = sum((x - 1 / (2 * 0.1)) ** 2 for x in h) / len(h)
    got = metrics(out)[2]["dpo_first_loss"]
    assert len(h) <= 12 and abs(got - want) < 1e-4, (got, want)
    assert abs(want - 1 / (4 * 0.1 ** 2)) > 1e-2  # far from the value a reference equal to the policy gives


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run-5540fa7")


def test_a_run_folder_written_before_the_redesign_still_resumes(world, tmp_path):
    """tests/fixtures/run-5540fa7 holds the JSON files of a run that commit 5540fa7 (before the code was
    reshaped into its present modules) wrote with `argv(world, out, "--rounds", "1")` on this tiny world,
    its paths replaced by @WORLD and @OUT. Its checkpoints are not committed: stand-ins of the right kind
    take their place. This code must resume it, read its pairs and base answers, and write records with
    the same keys in the same order."""
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    cfg = (out / "config.json").read_text().replace("@WORLD", str(world["root"])).replace("@OUT", str(out))
    (out / "config.json").write_text(cfg)
    shutil.copytree(world["policy"], out / "round_1" / "policy")
    student = add_reward_head(load_model(world["student"], device="cpu"))
    for r in (0, 1):
        save_model(student, str(out / f"round_{r}" / "student"))
    before = metrics(out)
    tsalign.main(["--resume", "--out", str(out), "--rounds", "2"])
    rows = metrics(out)
    assert [m["round"] for m in rows] == [0, 1, 2] and rows[:2] == before  # the old rounds are untouched
    assert rows[2]["pairs"] > 0
    # Old records read back and written again are the same JSON, key for key, in the same order.
    old_pairs = (out / "round_1" / "pairs.jsonl").read_text().splitlines()
    assert [json.dumps(Pair(**p).to_json()) for p in run.read_json(str(out / "round_1" / "pairs.jsonl"), lines=True)] == old_pairs
    base = json.loads((out / "round_0" / "base_eval.json").read_text())
    answers, agree, warm = run.load_base(str(out))
    assert [p.to_json() for p in agree] == base["agreement_pairs"] and [p.to_json() for p in warm] == base["warmup_pairs"]
    assert [list(p.to_json()) for p in agree] == [list(p) for p in base["agreement_pairs"]]
    assert [g.__dict__ for g, _ in answers] == base["greedy"]
    new_pairs = [json.loads(line) for line in (out / "round_2" / "pairs.jsonl").read_text().splitlines()]
    assert {tuple(p) for p in new_pairs} == {tuple(json.loads(old_pairs[0]))}  # today's keys, today's order


@pytest.mark.parametrize("extra, named", [(["--prompts", "missing.jsonl"], "--prompts"), (["--eval-prompts", "x.txt"], "--eval-prompts"),
                                          (["--judge", "somewhere"], "--judge"), (["--teacher-judge"], "--teacher-judge"),
                                          (["--student-format", "chatml"], "--student-format")])
def test_the_world_refuses_options_meant_for_checkpoints(tmp_path, capsys, extra, named):
    with pytest.raises(SystemExit) as e:
        tsalign.main(["--rounds", "1", "--out", str(tmp_path / "run"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tsalign: error: {named}: for real checkpoints") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before any work


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
@pytest.mark.parametrize("sig, status, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_stopping_a_run_by_hand(world, tmp_path, sig, status, name):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tsalign.py"), *argv(world, out, "--rounds", "100")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not os.path.exists(out / "round_1" / "metrics.json"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err[-2000:]
    done = run.finished_rounds(str(out))
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"tsalign: stopped by {name}; rounds 0-{max(done)} are saved in {out}; "
                                           f"continue with: python tsalign.py --resume --out {out}")
    tsalign.main(["--resume", "--out", str(out), "--rounds", str(max(done) + 1)])
    assert [m["round"] for m in metrics(out)] == list(range(max(done) + 2))


def test_scorers_compute_a_prompt_once_and_score_as_alone(world):
    """The student scores K responses of a prompt, and a judge its questions about one prompt, with the
    prompt's common ids computed once: the same as each row alone by transformers."""
    import data
    import evaluate
    from conftest import hf_load
    prompts = ["1 2 3", "a b", "1 2 3", "c d e f"]
    texts = ["4 5", "6", "a b c d", "7 8 9 0"]
    student = roles.load_scorer(world["teacher"], "chatml")  # a reward model
    hf = hf_load(world["teacher"], reward=True)
    hf.config.pad_token_id = None  # one row at a time: its last token, whatever it is
    rows = []
    student.model.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        got = student.score(prompts, texts, [True, False, True, True])
        assert rows == [3]  # a batch row per prompt
        for i, (p, t, f) in enumerate(zip(prompts, texts, [True, False, True, True])):
            assert (got[i] - hf(torch.tensor([student.ids(p, t, f)])).logits[0, 0]).abs() <= 1e-4, i
        judge = roles.load_scorer(world["judge"], "chatml", judge=True, min_mass=0.0)  # every answer valid
        hf = hf_load(world["judge"])
        ask = (["1 2 3"] * 3 + ["a b"], ["4 5", "6 7", "4 5", "c"], ["6 7", "4 5", "8", "d e"])
        rows = []
        judge.model.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
        got = judge.compare(*ask)
        assert rows == [2]
        rows = [data.encode_prompt(judge.tok, "chatml", roles.JUDGE_TEMPLATE.format(prompt=p, a=a, b=b)) for p, a, b in zip(*ask)]
        assert data.common_prefix(rows[:3]) > 10  # the questions about one prompt do share ids
        labels = [judge.tok.encode(x, add_special_tokens=False).ids[0] for x in ("A", "B")]
        for i, row in enumerate(rows):
            probs = hf(torch.tensor([row])).logits[0, -1].softmax(-1)
            pa, pb = probs[labels[0]], probs[labels[1]]
            assert abs(got[i] - pa / (pa + pb)) <= 1e-5, i


def test_overturned_counts_only_the_kept_pairs():
    """teacher_overturn_rate is overturned / pairs: a pair the teacher reversed and then dropped for its
    low margin must not count, or the rate passes 1 when --min-margin drops many."""
    group = [Sample([5, 1], "a", True), Sample([6, 1], "b", True)]
    ranked = [tsalign.Ranked(1, 0, 0.2, 2, overturned=True),   # reversed, kept
              tsalign.Ranked(1, 0, 0.05, 2, overturned=True),  # reversed, under the margin: dropped
              tsalign.Ranked(0, 1, 0.3, 2)]                    # kept as the student had it
    mined = tsalign.keep_pairs(["p", "q", "r"], [group] * 3, [group] * 3, ranked, min_margin=0.1)
    assert (len(mined.pairs), mined.overturned, mined.teacher_calls) == (2, 1, 6)
    assert mined.dropped["low_margin"] == 1
