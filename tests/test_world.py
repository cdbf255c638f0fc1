"""The default world ships with the repository: a rebuild comes close to it and never writes over it."""
import json
import os
import subprocess
import sys

import random

import torch

import data
import evaluate
import world
from checkpoint import load_model
from generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "default_world")


def shipped_info():
    with open(os.path.join(SHIPPED, "world.json")) as f:
        return json.load(f)


def snapshot(folder):
    """Every file under folder with its bytes."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), folder)] = f.read()
    return out


def test_the_shipped_world_is_the_one_the_code_describes():
    assert world.SHIPPED == SHIPPED
    assert shipped_info()["settings"] == json.loads(json.dumps(world.SETTINGS))
    for name in ("policy", "teacher", "student"):
        assert os.path.getsize(os.path.join(SHIPPED, name, "model.safetensors")) < 500_000


def test_the_oracle_on_hand_made_answers():
    """The share of positions matching the sorted digits, over the longer of answer and response."""
    p = "3 1 4 1 5"
    assert world.oracle(p, "1 1 3 4 5") == 1.0
    assert world.oracle(p, "1 1 3 4") == 4 / 5        # the base policy's flaw: the largest digit dropped
    assert world.oracle(p, "1 1 3 4 5 5") == 5 / 6    # a longer answer costs
    assert world.oracle(p, "1 3 4 5") == 1 / 5        # a smaller digit dropped: the rest is out of place
    assert world.oracle(p, "5 4 3 1 1") == 1 / 5      # reversed: only the middle matches
    assert world.oracle(p, "1 1 3 5 4") == 3 / 5
    assert world.oracle(p, "") == 0.0
    assert world.oracle("0 0 9 9", "0 0 9 9") == 1.0 and world.oracle("9 9 0 0", "0 0 9") == 3 / 4
    # A response cut off at the length limit never answered: it scores 0, however right its text.
    assert evaluate.oracle_score(world.oracle, p, data.Sample([], "1 1 3 4 5", False)) == 0.0
    assert evaluate.oracle_score(world.oracle, p, data.Sample([], "1 1 3 4", True)) == 4 / 5


def test_the_win_rate_against_the_base_follows_the_oracle():
    """The Evaluator of the default world, on hand-made answers whose outcome the oracle gives: a greedy
    answer nearer the sorted digits wins, one further loses, as good a one ties."""
    S = lambda text, finished=True: data.Sample([], text, finished)  # noqa: E731
    prompts = ["3 1 4 1 5", "2 7 1 8", "9 0 0 4", "6 5 4 3", "1 2 3 4"]
    ours = [S("1 1 3 4 5"), S("1 2 7"), S("0 0 4 9"), S("3 4 5 6", False), S("1 2 4 3")]
    base = [S("1 1 3 4"), S("1 2 7 8"), S("0 0 4 9"), S("3 4 5"), S("2 1 3 4")]
    want = [1.0, 0.0, 0.5, 0.0, 0.5]  # right vs flawed; flawed vs right; the same; truncated vs flawed; 2/4 each
    ev = evaluate.Evaluator("oracle", oracle=world.oracle)
    outcomes = ev.against_base(prompts, [(a, [a, b]) for a, b in zip(ours, base)], [(b, [b, b]) for b in base])
    assert [g for g, _ in outcomes] == want
    assert [s for _, s in outcomes] == [[w, 0.5] for w in want]
    stats = evaluate.win_stats(want, "win_rate_vs_base")
    assert (stats["wins_vs_base"], stats["ties_vs_base"], stats["losses_vs_base"]) == (1, 2, 2)
    assert stats["win_rate_vs_base"] == 2 / 5


def test_the_shipped_base_policy_has_the_flaw_the_readme_describes():
    """Its greedy answer drops the largest digit almost always and is rarely exactly right, while its
    samples hold right answers (docs/world.md: about 6% greedy answers right; a quarter of the samples, at least
    one of 8 for most prompts), judged here with the sorted digits themselves."""
    folder = os.path.join(SHIPPED, "policy")
    lm, tok = load_model(folder, "cpu"), data.load_tokenizer(folder)
    stops = list(lm.config.stop_token_ids)
    rng = random.Random(0)
    prompts = [world.random_prompt(rng) for _ in range(300)]
    encoded = [data.encode_prompt(tok, world.FORMAT, p) for p in prompts]
    right = [" ".join(sorted(p.split())) for p in prompts]
    dropped = [" ".join(sorted(p.split())[:-1]) for p in prompts]
    greedy = generate(lm, encoded, world.MAX_NEW_TOKENS, eos_token_id=stops)
    greedy = [data.response_text(tok, o, stops) for o in greedy]
    assert sum(g == (d, True) for g, d in zip(greedy, dropped)) / 300 > 0.8
    assert sum(g == (r, True) for g, r in zip(greedy, right)) / 300 < 0.15
    k, gen = 8, torch.Generator().manual_seed(0)
    samples = generate(lm, encoded[:100], world.MAX_NEW_TOKENS, temperature=1.0, eos_token_id=stops,
                       generator=gen, num_samples=k)
    ok = [data.response_text(tok, o, stops) == (right[i // k], True) for i, o in enumerate(samples)]
    assert 0.1 < sum(ok) / len(ok) < 0.4
    assert sum(any(ok[i * k:(i + 1) * k]) for i in range(100)) > 60


def test_a_rebuild_comes_within_four_points_of_the_shipped_world(tmp_path):
    """The build is code, so anyone can check the shipped weights: a build here (its own CPU's kernels)
    gives a teacher and a student as accurate as the shipped ones, within 0.04, on held-out oracle pairs.
    Not closer: a few thousand training steps carry a change in the last bits of the arithmetic a long way.
    Packing a pair's two rows into one batch row (the same sums in another order) moved the teacher from
    0.892 to 0.923 and the student from 0.694 to 0.696."""
    with torch.random.fork_rng(devices=[]):
        info = world.build(str(tmp_path))
    want = shipped_info()
    for key in ("teacher_accuracy", "student_accuracy"):
        assert abs(info[key] - want[key]) <= 0.04, (key, info[key], want[key])
    assert info["parameters"] == want["parameters"]


def test_rebuild_writes_to_the_cache_never_over_the_shipped_files(tmp_path, monkeypatch):
    before = snapshot(SHIPPED)
    built = []

    def fake_build(folder):  # the real build takes a minute; where it writes is what is tested here
        built.append(folder)
        open(os.path.join(folder, "world.json"), "w").write("{}")
        return {"teacher_accuracy": 0.0, "student_accuracy": 0.0}

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(world, "build", fake_build)
    folder = world.rebuild()
    assert folder == str(tmp_path / "tsalign" / "world") and os.path.exists(os.path.join(folder, "world.json"))
    assert not os.path.abspath(built[0]).startswith(SHIPPED)
    assert snapshot(SHIPPED) == before
    # The script refuses the shipped folder, and any folder that already exists.
    for target in (SHIPPED, str(tmp_path)):
        r = subprocess.run([sys.executable, "world.py", target], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "world.py" in r.stderr
    assert snapshot(SHIPPED) == before
