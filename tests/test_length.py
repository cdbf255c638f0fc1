"""The length countermeasures against closed-form values: R-DPO's term in the DPO loss (and its plumbing
through train_dpo), the length penalty on the student's and the teacher's scores before a pair is picked and
ordered, and their options."""
import json
import math

import numpy as np
import pytest
import torch

import roles
import train_loop
import tsalign
from conftest import argv, metrics
from data import Sample
from losses import dpo_loss
from test_losses import dpo_inputs
from test_train_loop import PAIRS, quiet, tiny_lm

# ---- R-DPO: -log sigmoid(beta h + alpha (|y_c| - |y_r|)) -------------------------------------------


def test_rdpo_matches_the_closed_form():
    rng = np.random.default_rng(6)
    pi_c, pi_r, ref_c, ref_r = (rng.normal(size=32) * 10 - 50 for _ in range(4))
    len_c, len_r = (rng.integers(1, 12, size=32).astype(np.float64) for _ in range(2))
    beta, alpha = 0.7, 0.2
    t = [torch.tensor(x) for x in (pi_c, pi_r, ref_c, ref_r)]
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r)) + alpha * (len_c - len_r)
    losses, _ = dpo_loss(*t, beta=beta, rdpo_alpha=alpha, len_chosen=torch.tensor(len_c),
                         len_rejected=torch.tensor(len_r))
    nls = lambda x: np.logaddexp(0.0, -x)  # noqa: E731  -log sigmoid(x), numpy's stable form (z reaches 30 here)
    np.testing.assert_allclose(losses.numpy(), nls(z), rtol=1e-10)
    eps = 0.1  # with conservative DPO's smoothing, the same argument on both sides
    losses, _ = dpo_loss(*t, beta=beta, label_smoothing=eps, rdpo_alpha=alpha, len_chosen=torch.tensor(len_c),
                         len_rejected=torch.tensor(len_r))
    np.testing.assert_allclose(losses.numpy(), (1 - eps) * nls(z) + eps * nls(-z), rtol=1e-10)


def test_rdpo_hand_values_and_gradient():
    # At the reference (h = 0) the loss is no longer log 2: the chosen is 2 tokens longer, alpha 0.5.
    pi_c, pi_r, ref_c, ref_r = dpo_inputs([0.0, 1.0], [0.0, 0.0])
    pi_c.requires_grad_(True)
    n_c, n_r = torch.tensor([7.0, 3.0]), torch.tensor([5.0, 3.0])
    losses, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=2.0, rdpo_alpha=0.5, len_chosen=n_c, len_rejected=n_r)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(-2.0)))  # equal lengths: plain DPO
    assert metrics["reward_margin"].item() == pytest.approx(1.0)  # implicit rewards are beta h, as before
    losses.sum().backward()
    # d/d pi_c of -log sigmoid(z) is -beta sigmoid(-z): a preference the length explains pulls less
    torch.testing.assert_close(pi_c.grad, -2.0 * torch.sigmoid(-torch.tensor([1.0, 2.0])))


def test_rdpo_off_is_dpo_exactly():
    t = dpo_inputs([0.3, -1.2, 4.0], [1.0, 0.5, -2.0])
    plain, _ = dpo_loss(*t, beta=2.0)
    off, _ = dpo_loss(*t, beta=2.0, rdpo_alpha=0.0, len_chosen=torch.tensor([9.0, 1, 1]), len_rejected=torch.ones(3))
    assert torch.equal(plain, off)


@pytest.mark.parametrize("kwargs", [dict(rdpo_alpha=-0.1), dict(rdpo_alpha=0.1, loss_type="ipo"), dict(rdpo_alpha=0.1)])
def test_rdpo_rejects_bad_options(kwargs):
    lengths = {} if kwargs == dict(rdpo_alpha=0.1) else dict(len_chosen=torch.ones(1), len_rejected=torch.ones(1))
    with pytest.raises(ValueError, match="rdpo_alpha"):
        dpo_loss(*dpo_inputs([0.0], [0.0]), **kwargs, **lengths)


def test_train_dpo_gives_rdpo_the_token_counts():
    """At the first step the policy is its own reference (h = 0), so the loss over one batch of all pairs is
    the mean of -log sigmoid(alpha (|y_c| - |y_r|)), with |y| the response's token count, EOS included."""
    alpha = 0.3
    m = train_loop.train_dpo(tiny_lm(), PAIRS, 2, quiet(lr=1e-3, batch_size=len(PAIRS)), beta=2.0, rdpo_alpha=alpha)
    want = sum(math.log(1 + math.exp(-alpha * (len(c) - len(r)))) for _, c, r in PAIRS) / len(PAIRS)
    assert m["dpo_first_loss"] == pytest.approx(want, rel=1e-6)
    assert abs(m["first_margin"]) < 1e-6


# ---- The length penalty on the rankers ---------------------------------------------------------------


class Ranker(roles.Scorer):
    """A stand-in reward model: a fixed score per response text (its `margins` and the blocks of
    `scores_each` and `margins_each` are roles.Scorer's own)."""

    def __init__(self, scores):
        super().__init__(torch.nn.Linear(1, 1), None, "chatml", None, 0)
        self.scores = scores

    def score(self, prompts, texts, finished):
        return torch.tensor([self.scores[t] for t in texts])


def pool(*lengths):
    """Finished samples whose texts name them and whose policy ids have these token counts."""
    return [Sample(list(range(n)), f"r{i}", True) for i, n in enumerate(lengths)]


def test_student_length_penalty_changes_best_and_worst():
    student = Ranker({"r0": 1.0, "r1": 1.5, "r2": 0.2})
    pools = [pool(3, 6, 2)]
    plain = tsalign.student_ranks(student, ["p"], pools)[0]
    assert (plain.best, plain.worst, plain.margin) == (1, 2, pytest.approx(1.3))
    # scores less 0.2 per token: 0.4, 0.3, -0.2
    r = tsalign.student_ranks(student, ["p"], pools, length_penalty=0.2)[0]
    assert (r.best, r.worst, r.margin) == (0, 2, pytest.approx(0.6))


def test_teacher_length_penalty_orders_and_sets_the_margin():
    teacher = Ranker({"r0": 2.0, "r1": 1.0})
    pools = [pool(8, 5)] * 2
    picks = [tsalign.Ranked(0, 1, 9.0), tsalign.Ranked(1, 0, 9.0)]  # the student's best first, either way
    plain = tsalign.teacher_decides(teacher, ["p", "q"], pools, picks)
    assert [(r.best, r.worst, r.margin, r.overturned) for r in plain] == [(0, 1, 1.0, False), (0, 1, 1.0, True)]
    # teacher margin of r0 over r1: 1.0 - 0.25 (8 - 5) = 0.25, still r0; with 0.5: 1.0 - 1.5 = -0.5, r1 wins
    r = tsalign.teacher_decides(teacher, ["p", "q"], pools, picks, length_penalty=0.25)
    assert [(x.best, x.worst, x.margin) for x in r] == [(0, 1, pytest.approx(0.25))] * 2
    r = tsalign.teacher_decides(teacher, ["p", "q"], pools, picks, length_penalty=0.5)
    assert [(x.best, x.worst, x.margin, x.overturned) for x in r] == [(1, 0, pytest.approx(0.5), True),
                                                                       (1, 0, pytest.approx(0.5), False)]
    assert all(x.calls == 2 for x in r)


def test_teacher_all_length_penalty():
    teacher = Ranker({"r0": 3.0, "r1": 2.4, "r2": 0.0})
    r = tsalign.teacher_ranks_all(teacher, ["p"], [pool(9, 4, 3)], length_penalty=0.1)[0]
    assert (r.best, r.worst, r.margin, r.calls) == (0, 2, pytest.approx(2.4), 3)  # 2.1, 2.0, -0.3
    r = tsalign.teacher_ranks_all(teacher, ["p"], [pool(9, 4, 3)], length_penalty=0.2)[0]
    assert (r.best, r.worst, r.margin) == (1, 2, pytest.approx(2.2))  # 1.2, 1.6, -0.6


def test_a_run_logs_both_penalties_and_its_margins_carry_the_teachers(world, tmp_path):
    out = tmp_path / "run"
    lam = 0.05
    tsalign.main(argv(world, out, "--rounds", "1", "--length-penalty", str(lam), "--student-length-penalty", "0.02",
                      "--rdpo-alpha", "0.1"))
    m = metrics(out)[1]
    assert (m["length_penalty"], m["student_length_penalty"]) == (lam, 0.02)
    assert json.load(open(out / "config.json"))["rdpo_alpha"] == 0.1
    pairs = [json.loads(line) for line in open(out / "round_1" / "pairs.jsonl")]
    assert pairs, "no pairs mined: nothing below is tested"
    teacher = roles.load_scorer(world["teacher"], "chatml")
    s = teacher.score([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                      [p["chosen_finished"] for p in pairs] + [p["rejected_finished"] for p in pairs])
    for i, p in enumerate(pairs):  # each stored margin: the teacher's, less lambda x the difference in token counts
        want = (s[i] - s[len(pairs) + i]).item() - lam * (len(p["chosen_ids"]) - len(p["rejected_ids"]))
        assert p["margin"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--length-penalty", "0.1", "--teacher-judge"], "--length-penalty subtracts from the teacher's scores"),
    (["--student-length-penalty", "-1"], "--student-length-penalty must be >= 0"),
    (["--rdpo-alpha", "0.1", "--loss-type", "ipo"], "--rdpo-alpha is a term of the sigmoid DPO loss"),
])
def test_length_options_fail_with_one_line(world, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        tsalign.main(argv(world, tmp_path / "run") + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tsalign: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
