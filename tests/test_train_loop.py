"""The training loop: DPO and the ranking loss learn, the reference is really used, bad steps change nothing."""
import math

import pytest
import torch

import data
import losses
import model
from checkpoint import config_from_hf, load_model
from generate import generate
import train_loop as TL
from conftest import hf_load, make_checkpoint, uncached_greedy

EOS = 2  # also the pad id below: the pitfall where a mask built from ids would hide the final EOS


def tiny_lm(seed=0):
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
          "max_position_embeddings": 64, "eos_token_id": EOS, "pad_token_id": EOS}
    torch.manual_seed(seed)
    return model.CausalLM(config_from_hf(hf))


PAIRS = [([1, 5, 6, 7], [8, 9, EOS], [10, 11, 12, EOS]),
         ([1, 6, 7], [9, 9, 4, EOS], [3, EOS]),
         ([1, 7, 7, 7, 7], [4, EOS], [5, 5, EOS]),
         ([1, 3], [13, 14, 15, 16, EOS], [17, 18, EOS])]


def quiet(**kw):
    return TL.TrainConfig(progress=False, **kw)


def naive_logprob(lm, prompt, response):
    """log p(response | prompt) by a plain loop over one unpadded sequence."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = lm(ids)[0].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(response))


def test_response_logprobs_match_a_plain_loop_inside_a_padded_batch():
    lm = tiny_lm()
    prompts = [p for p, _, _ in PAIRS]
    responses = [c for _, c, _ in PAIRS]
    for side in ("left", "right"):
        batch = data.policy_batch(prompts, responses, pad_id=EOS, side=side)
        with torch.no_grad():
            logp, n = TL.response_logprobs(lm, batch)
        assert n.tolist() == [len(r) for r in responses]  # the final EOS counts, though it equals the pad id
        for i, (p, r) in enumerate(zip(prompts, responses)):
            assert abs(logp[i].item() - naive_logprob(lm, p, r)) < 1e-4, (side, i)


def test_output_layer_on_response_positions_only_equals_the_full_forward():
    lm = tiny_lm()
    batch = data.policy_batch([p for p, _, _ in PAIRS], [r for _, _, r in PAIRS], pad_id=EOS)
    ids, resp = batch["input_ids"], batch["response_mask"]
    with torch.no_grad():
        fast, n = TL.response_logprobs(lm, batch)  # output layer on response positions only
        every = lm(ids, batch["attention_mask"])[:, :-1][resp[:, 1:].bool()]  # (N, V) out of the full (B, T, V)
        full = losses.sequence_logprobs(every, ids, resp)
        averaged, _ = TL.response_logprobs(lm, batch, average=True)
    assert torch.allclose(fast, full, atol=1e-5)
    assert torch.allclose(averaged, full / n, atol=1e-6)


def test_dpo_learns_the_pairs_and_starts_at_log_2():
    lm = tiny_lm()
    ref_c, ref_r = TL.reference_logprobs(lm, PAIRS, EOS)
    m = TL.train_dpo(lm, PAIRS, EOS, quiet(lr=3e-3, epochs=40, batch_size=2), beta=0.5)
    assert abs(m["dpo_first_loss"] - math.log(2)) < 1e-5 and abs(m["first_margin"]) < 1e-5
    new_c, new_r = TL.reference_logprobs(lm, PAIRS, EOS)
    assert ((new_c - ref_c) - (new_r - ref_r) > 0).all()  # every chosen gained on its rejected
    assert m["reward_accuracy"] == 1.0


def test_ipo_starts_at_one_over_four_beta_squared():
    lm = tiny_lm()
    m = TL.train_dpo(lm, PAIRS, EOS, quiet(lr=1e-4, epochs=1, batch_size=4), beta=0.5, loss_type="ipo")
    assert abs(m["dpo_first_loss"] - 1 / (4 * 0.5 ** 2)) < 1e-4


@pytest.mark.parametrize("loss_type, average, sft_coef", [("sigmoid", False, 0.5), ("sigmoid", True, 0.0),
                                                     ("sigmoid", True, 0.5), ("ipo", True, 0.0)])
def test_dpo_options_give_the_losses_computed_by_hand(loss_type, average, sft_coef):
    """--average-logprobs and --sft-coef: one step over all the pairs, its loss and metrics against the
    same computed here from the model's own logits, one unpadded sequence at a time (naive_logprob)."""
    lm, other, beta = tiny_lm(), tiny_lm(seed=1), 0.5
    n = {side: torch.tensor([float(len(t[side])) for t in PAIRS]) for side in (1, 2)}  # tokens per response

    def logps(m, side):  # summed (B,)
        return torch.tensor([naive_logprob(m, t[0], t[side]) for t in PAIRS])

    pi = {s: logps(lm, s) for s in (1, 2)}
    ref = {s: logps(other, s) / (n[s] if average else 1) for s in (1, 2)}  # a reference unlike the policy
    h = (pi[1] / (n[1] if average else 1) - ref[1]) - (pi[2] / (n[2] if average else 1) - ref[2])  # (B,)
    dpo = (-torch.nn.functional.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2).mean()
    sft = -pi[1].sum() / n[1].sum()  # the chosen responses' mean NLL per token, summed or not
    m = TL.train_dpo(lm, PAIRS, EOS, quiet(lr=1e-3, epochs=1, batch_size=len(PAIRS)), beta=beta, loss_type=loss_type,
                     sft_coef=sft_coef, average=average, reference=(ref[1], ref[2]))
    assert abs(m["dpo_first_loss"] - dpo.item()) < 1e-5 and abs(m["dpo_loss"] - dpo.item()) < 1e-5
    assert abs(m["reward_margin"] - beta * h.mean().item()) < 1e-5
    assert abs(m["loss"] - (dpo + sft_coef * sft).item()) < 1e-5
    if sft_coef:
        assert abs(m["sft_loss"] - sft.item()) < 1e-5
    # With its own reference (the policy as it is), that reference is computed the same way: step 0's check holds.
    m = TL.train_dpo(tiny_lm(), PAIRS, EOS, quiet(lr=1e-3, epochs=1, batch_size=2), beta=beta, loss_type=loss_type,
                     sft_coef=sft_coef, average=average)
    assert abs(m["first_margin"]) < 1e-6


def test_a_wrong_reference_is_caught_at_the_first_step(monkeypatch):
    lm = tiny_lm()
    other = tiny_lm(seed=1)
    wrong = TL.reference_logprobs(other, PAIRS, EOS)
    # A given reference is trusted (it may be the SFT policy), and the first-step loss shows the gap.
    m = TL.train_dpo(lm, PAIRS, EOS, quiet(lr=1e-4, epochs=1, batch_size=4), reference=wrong)
    assert abs(m["dpo_first_loss"] - math.log(2)) > 1e-3
    # Our own round-start reference computed from a different state than the policy trains from: caught.
    monkeypatch.setattr(TL, "reference_logprobs", lambda *a, **k: wrong)
    with pytest.raises(RuntimeError, match="reference check failed"):
        TL.train_dpo(tiny_lm(), PAIRS, EOS, quiet(lr=1e-4, epochs=1, batch_size=4))


def test_ranking_loss_learns_the_order():
    rm = model.add_reward_head(tiny_lm())
    rows = [(p + c, p + r) for p, c, r in PAIRS]
    m = TL.train_reward(rm, rows, EOS, quiet(lr=3e-3, epochs=40, batch_size=2))
    assert m["accuracy"] == 1.0
    s = TL.reward_scores(rm, [c for c, _ in rows] + [r for _, r in rows], EOS)
    assert (s[:len(rows)] > s[len(rows):]).all()


def test_reward_alone_equals_reward_in_a_padded_batch_with_pad_equal_to_eos():
    rm = model.add_reward_head(tiny_lm())
    rows = [p + c for p, c, _ in PAIRS]  # each ends in EOS, which is also the pad id
    together = TL.reward_scores(rm, rows, EOS)
    alone = torch.cat([TL.reward_scores(rm, [r], EOS) for r in rows])
    assert torch.allclose(together, alone, atol=1e-5)


def test_a_non_finite_loss_changes_no_weight():
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.state_dict().items()}

    def nan_loss(net, idx):
        return lm(torch.tensor([[1, 2, 3]])).sum() * float("nan"), {}

    with pytest.raises(TL.NonFiniteError, match="not applied"):
        TL.train(lm, 4, nan_loss, quiet(lr=1e-2, batch_size=2))
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())


def test_a_non_finite_gradient_changes_no_weight():
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.state_dict().items()}

    def inf_grad(net, idx):  # a finite loss (0) whose gradient is infinite: d sqrt(x) / dx at x = 0
        w = lm.lm_head.weight[0, 0]
        return torch.sqrt(w - w.detach()), {}

    with pytest.raises(TL.NonFiniteError, match="gradient"):
        TL.train(lm, 2, inf_grad, quiet(lr=1e-2, batch_size=2))
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())


def test_generate_uses_the_weights_after_a_training_step():
    lm = tiny_lm()
    prompts = [[1, 5, 6], [1, 7]]
    before = generate(lm, prompts, 8)
    TL.train_sft(lm, [(p, [9, 9, 9, 9, 9, 9, 9, 9]) for p in prompts], EOS, quiet(lr=1e-2, epochs=30, batch_size=2))
    after = generate(lm, prompts, 8)
    assert after != before
    # and it is the new weights' own greedy answer, step by step without a cache
    for p, a in zip(prompts, after):
        assert uncached_greedy(lm, p, 8)[0] == a


def test_warmup_then_cosine_schedule():
    total, warm = 10, 2
    f = [TL.lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] < 0.1
    assert [TL.lr_factor(s, total, warm, "constant") for s in range(2, total)] == [1.0] * 8


def test_gradient_accumulation_equals_one_big_batch(monkeypatch):
    # Plain SGD, so the update is the gradient itself (Adam's first step is about sign(g) and would hide it).
    monkeypatch.setattr(TL, "make_optimizer", lambda params, tc: torch.optim.SGD(params, lr=tc.lr))
    a, b = model.add_reward_head(tiny_lm()), model.add_reward_head(tiny_lm())
    b.load_state_dict(a.state_dict())
    rows = [(p + c, p + r) for p, c, r in PAIRS]
    TL.train_reward(a, rows, EOS, quiet(lr=1e-2, batch_size=4, grad_accum=1, warmup=0.0))
    TL.train_reward(b, rows, EOS, quiet(lr=1e-2, batch_size=1, grad_accum=4, warmup=0.0))
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-7), n


# -----------------------------------------------------------------------------
# A prompt computed once: rows of one prompt packed together (data.pack) score and train as they do alone

WINDOWED = dict(sliding_window=4)  # Mistral with a window shorter than the rows


def shared_rows(seed=0):
    """Rows (prompt + response) of 3 prompts with 1, 3 and 4 responses: of different lengths, one the start
    of another, two identical; and each row's prompt index."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 120, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(6), ids(3), ids(9)]
    a = ids(5)
    responses = [[ids(4)], [ids(2), ids(7) + [EOS], ids(1)], [a, a[:3], a, ids(6)]]
    rows = [p + r for p, rs in zip(prompts, responses) for r in rs]
    keys = [i for i, rs in enumerate(responses) for _ in rs]
    return rows, keys


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_prompt_rewards_equal_each_row_alone(tmp_path, family, side):
    d = make_checkpoint(tmp_path / "rm", family, reward=True, pad_token_id=EOS, **(WINDOWED if family == "mistral" else {}))
    rm, hf = load_model(d), hf_load(d, reward=True)
    hf.config.pad_token_id = None  # one row at a time: transformers then reads its last token, the EOS included
    rows, keys = shared_rows()
    with torch.no_grad():
        b = data.pack(rows, EOS, keys, side)
        assert b["input_ids"].shape[0] == 3 and (b["branch"].max(1).values.tolist() == [0, 3, 4])  # packed per prompt
        packed = rm(b["input_ids"], b["attention_mask"], branch=b["branch"], select=data.last_index(b, rows))
        order = [5, 2, 7, 1, 4, 3, 6, 0]  # the prompts' rows interleaved: grouping and putting back are tested
        scored = torch.empty(len(rows))
        scored[order] = TL.reward_scores(rm, [rows[i] for i in order], EOS, batch_size=4, groups=[keys[i] for i in order])
        for i, row in enumerate(rows):
            alone = rm(torch.tensor([row]))[0]
            assert (packed[i] - alone).abs() <= 1e-5 and (scored[i] - alone).abs() <= 1e-5, i
            assert (alone - hf(torch.tensor([row])).logits[0, 0]).abs() <= 1e-4, i


def pair_losses(lm, pairs, share, sft_coef=0.5):
    """DPO (against a fixed reference) plus an SFT term on the chosen, as train_dpo computes them: the loss
    and the gradient of every trainable parameter."""
    logp, n = TL.response_logprobs(lm, TL._pair_batch(pairs, EOS, "cpu", share))
    P = len(pairs)
    ref = torch.linspace(-40.0, -30.0, 2 * P)
    loss = losses.dpo_loss(logp[:P], logp[P:], ref[:P], ref[P:], beta=0.5)[0].mean() + sft_coef * losses.sft_loss(logp[:P], n[:P])
    params = [p for p in lm.parameters() if p.requires_grad]
    return loss, logp, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "mistral"])
@pytest.mark.parametrize("lora", [False, True])
def test_dpo_with_the_prompt_computed_once_equals_two_sequences(tmp_path, family, lora):
    """A pair's prompt computed once for its chosen and rejected responses: log-probs equal transformers' on
    each sequence alone, and the DPO + SFT loss and every gradient equal the unshared computation."""
    d = make_checkpoint(tmp_path / "lm", family, pad_token_id=EOS, **(WINDOWED if family == "mistral" else {}))
    lm, hf = load_model(d), hf_load(d)
    if lora:
        model.add_lora(lm, 2)
        with torch.no_grad():
            for lin in model.lora_layers(lm):
                for b in lin.lora_b:
                    b.normal_(0, 0.05, generator=torch.Generator().manual_seed(b.numel()))
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 120, (n,), generator=g).tolist()  # noqa: E731
    common = ids(3)
    pairs = [(ids(7), ids(5) + [EOS], ids(2)), (ids(4), common + ids(3), common + ids(6) + [EOS]), (ids(10), ids(1), ids(8))]
    lm.train()
    shared, logp, g_shared = pair_losses(lm, pairs, share=True)
    plain, _, g_plain = pair_losses(lm, pairs, share=False)
    assert (shared - plain).abs() <= 1e-5
    assert max((a - b).abs().max() for a, b in zip(g_shared, g_plain)) <= 1e-5
    assert max(g.abs().max() for g in g_shared) > 1e-3  # gradients that are not all ~0
    if not lora:
        for i, (p, c, r) in enumerate(pairs):
            for j, resp in ((i, c), (i + len(pairs), r)):
                with torch.no_grad():
                    full = hf(torch.tensor([p + resp])).logits[0].log_softmax(-1)
                want = sum(full[len(p) - 1 + t, tok] for t, tok in enumerate(resp))
                assert (logp[j] - want).abs() <= 1e-4, (i, j)


def test_training_steps_with_shared_prompts_equal_unshared_ones(monkeypatch):
    """One SGD step of train_dpo (its own reference pass, an SFT term) and of train_reward, with each pair's
    prompt computed once, lands on the weights the unshared step gives."""
    monkeypatch.setattr(TL, "make_optimizer", lambda params, tc: torch.optim.SGD(params, lr=tc.lr))
    tc = quiet(lr=1e-1, batch_size=4, warmup=0.0)
    trained = {}
    for share in (True, False):
        if not share:
            monkeypatch.setattr(TL, "shares_prefix", lambda m: False)
        lm, rm = tiny_lm(), model.add_reward_head(tiny_lm(seed=2))
        before = {k: v.clone() for k, v in lm.state_dict().items()}
        m = TL.train_dpo(lm, PAIRS, EOS, tc, beta=0.5, sft_coef=0.3)
        TL.train_reward(rm, [(p + c, p + r) for p, c, r in PAIRS], EOS, tc)
        trained[share] = lm.state_dict(), rm.state_dict(), m
    assert max((trained[True][0][k] - before[k]).abs().max() for k in before) > 1e-3  # the step moved the weights
    for j in (0, 1):
        for k, v in trained[True][j].items():
            assert (v - trained[False][j][k]).abs().max() <= 1e-6, k
    assert abs(trained[True][2]["loss"] - trained[False][2]["loss"]) <= 1e-6
