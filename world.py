"""
The embedded default world: a task small enough to measure everything, built by code.

Task: sort 4-7 digits. A prompt is "3 1 4 1 5", the right answer "1 1 3 4 5".
Oracle: the share of positions that match the sorted answer, over the longer of the two (partial
credit; a wrong length costs). It plays the paper's GPT-4 judge: it builds the world and grades
evaluations, and never gives a training signal inside the rounds.

Why this world shows what the paper claims:
- The base policy is SFT on demonstrations whose *mode is wrong*: most of them drop the largest
  digit. Greedy decoding copies the flaw, while samples still hold right answers: there is room to
  improve, and the K samples contain the fix. (With random corruption only, the right token stays
  the most likely at every step: greedy decoding is almost always right, and nothing beats it.)
- The teacher (the largest reward model, initialised from the base policy) is trained on many
  oracle pairs: good, not perfect. The student (much smaller) is trained on few: weak. Student-only
  selection lets the policy game the weak student; the teacher's verdict keeps it honest.

The three models are ordinary Hugging Face checkpoints with a word-level tokenizer, shipped in
default_world/ (under 1 MB): every machine runs on the same weights, nothing is built on first use.
`build` makes them again (`python world.py DIR`, or `--rebuild-world`: into the user's cache, never
over the shipped files), close to the shipped world but not equal: the build trains, and matrix
kernels differ between CPU kinds in their last bits.
"""
import json
import os
import random
import shutil
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import data
import model
import train_loop
from checkpoint import config_from_hf, save_model
from data import Pair
from generate import generate

# ---- Settings (world.json records those the shipped world was built with) ----------------------

SETTINGS = dict(
    min_len=4, max_len=7,
    flawed=0.65, noisy=0.10,  # demonstrations: largest digit dropped / randomly corrupted / right
    policy=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=192),
    student=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64),
    sft_examples=64_000, sft_lr=3e-3,    # base policy
    student_sft_examples=16_000,         # the student's language model, before its reward head
    teacher_pairs=6_000, teacher_synthetic_pairs=6_000, teacher_lr=2e-3, teacher_epochs=3,
    student_pairs=400, student_lr=1e-3, student_epochs=3,
    seed=1234,
)
FORMAT = "digits"
MAX_NEW_TOKENS = 10  # the longest answer is 7 digits + EOS

# The run settings this world picks for itself (config.WORLD, used unless told otherwise), as
# measured on it over five rounds and three seeds (docs/results.md has the experiments):
# - beta 4: answers are ~6 tokens, so beta 0.1 needs huge per-token log-ratio changes before the
#   DPO loss saturates, and collapsed the policy. beta bounds how far a round moves the policy: at
#   1-2 the next round's samples left what the student and teacher judge well, and the win rate
#   fell after round 2 or 3; at 4 it kept rising or held; at 8 round 1 gained little (0.65).
# - student_length_penalty 0.5 (student score units per token): without it the student, having
#   learned "longer is better" from round 1's pairs (87% of chosen answers longer), scored an extra
#   copy of the largest digit above the right answer, so its best and worst were two wrong answers;
#   the penalty keeps its picks near the right length (mined pairs 0.93-0.97 right, not 0.88-0.93).
# - lr 1e-4: at 2e-4 the win rate fell after round 3; 5e-5 gained nothing that beta 4 did not.
# - min_margin 2.5 (teacher score units): the margin predicts whether the teacher is right; mined
#   pairs with a margin below 1 were right about 60% of the time, above 2 over 90%.
# - ~1,000 prompts per round: 256 gave too few pairs for DPO to move the greedy answer, 2,048
#   gained nothing; K = 8 (--k): at 16 the student's extremes were worse pairs (0.83-0.87 right).

SPECIALS = ["<pad>", "<bos>", "<sep>", "<eos>"]


# ---- The task and its oracle ---------------------------------------------------------------------

def random_prompt(rng):
    n = rng.randint(SETTINGS["min_len"], SETTINGS["max_len"])
    return " ".join(str(rng.randint(0, 9)) for _ in range(n))


def oracle(prompt, response):
    """Score in [0, 1]: matching positions against the sorted answer, over the longer length."""
    answer = sorted(prompt.split())
    got = response.split()
    right = sum(a == b for a, b in zip(answer, got))
    return right / max(len(answer), len(got))


def with_mistake(digits, kinds, rng):
    """Sorted digits, one mistake of a kind from kinds (swapping equal digits changes nothing)."""
    digits = list(digits)
    kind = rng.choice(kinds)
    i = rng.randrange(len(digits) - 1 if kind == "swap" else len(digits))  # swap i and i + 1
    if kind == "drop_largest":
        digits = digits[:-1]
    elif kind == "swap":
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
    elif kind == "replace":
        digits[i] = str(rng.randint(0, 9))
    elif kind == "drop":
        digits.pop(i)
    elif kind == "duplicate":
        digits.insert(i, digits[i])
    elif kind == "insert":
        digits.insert(i, str(rng.randint(0, 9)))
    return digits


def demonstration(prompt, rng):
    """An imperfect demonstration; the dominant flaw (the largest digit dropped) is the SFT mode."""
    digits = sorted(prompt.split())
    u = rng.random()
    if u < SETTINGS["flawed"]:
        digits = digits[:-1]
    elif u < SETTINGS["flawed"] + SETTINGS["noisy"]:
        digits = with_mistake(digits, ["swap", "replace", "drop", "duplicate"], rng)
    return " ".join(digits)


def corrupted_pair(rng):
    """Two answers to one prompt, each right or with one mistake of any kind, that the oracle tells
    apart: base-policy samples mostly show the dropped digit, and these keep the teacher from
    learning "longer is better", so it stays reliable when the policy's answers are nearly right."""
    kinds = ["drop_largest", "swap", "replace", "drop", "duplicate", "insert"]
    while True:
        p = random_prompt(rng)
        right = sorted(p.split())
        a, b = (" ".join(right if rng.random() < 0.3 else with_mistake(right, kinds, rng))
                for _ in range(2))
        if a != b and oracle(p, a) != oracle(p, b):
            return Pair(p, a, b) if oracle(p, a) > oracle(p, b) else Pair(p, b, a)


def make_tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + [str(d) for d in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


def hf_config(arch, sizes, tok):
    return dict(architectures=[arch], model_type="llama", vocab_size=tok.get_vocab_size(),
                hidden_act="silu", max_position_embeddings=32, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=True,
                bos_token_id=tok.token_to_id("<bos>"), eos_token_id=tok.token_to_id("<eos>"),
                pad_token_id=tok.token_to_id("<pad>"), initializer_range=0.02,
                torch_dtype="float32", **sizes)


def fresh_lm(sizes, tok, seed):
    torch.manual_seed(seed)
    lm = model.CausalLM(config_from_hf(hf_config("LlamaForCausalLM", sizes, tok)))
    for name, p in lm.named_parameters():  # GPT-2-style small init; norms start at one
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    return lm


# ---- Builders ------------------------------------------------------------------------------------

def build_policy(tok, rng, examples, seed, lr, sizes, desc):
    """A causal LM trained with SFT on imperfect demonstrations."""
    lm = fresh_lm(sizes, tok, seed)
    ex = []
    for _ in range(examples):
        p = random_prompt(rng)
        ex.append((data.encode_prompt(tok, FORMAT, p),
                   tok.encode(demonstration(p, rng), add_special_tokens=False).ids
                   + [tok.token_to_id("<eos>")]))
    tc = train_loop.TrainConfig(lr=lr, batch_size=256, warmup=0.05, weight_decay=0.01, seed=seed,
                                desc=desc)
    train_loop.train_sft(lm, ex, tok.token_to_id("<pad>"), tc)
    return lm


def oracle_pairs(lm, tok, rng, n, seed):
    """n Pairs of distinct base-policy samples whose oracle scores differ, ordered by the oracle."""
    eos = tok.token_to_id("<eos>")
    pairs, gen = [], torch.Generator().manual_seed(seed)
    while len(pairs) < n:
        prompts = [random_prompt(rng) for _ in range(512)]
        outs = generate(lm, [data.encode_prompt(tok, FORMAT, p) for p in prompts], MAX_NEW_TOKENS,
                        temperature=1.0, eos_token_id=eos, generator=gen, num_samples=2)
        for i, p in enumerate(prompts):
            (a, fa), (b, fb) = (data.response_text(tok, o, [eos]) for o in outs[2 * i:2 * i + 2])
            sa, sb = oracle(p, a) + fa, oracle(p, b) + fb  # a finished answer beats a truncated one
            if a != b and sa != sb:
                pairs.append(Pair(p, a, b, fa, fb) if sa > sb else Pair(p, b, a, fb, fa))
    return pairs[:n]


def reward_rows(tok, pairs):
    eos = tok.token_to_id("<eos>")
    return [(data.reward_ids(tok, FORMAT, p.prompt, p.chosen, p.chosen_finished, eos),
             data.reward_ids(tok, FORMAT, p.prompt, p.rejected, p.rejected_finished, eos))
            for p in pairs]


def build_reward(lm, tok, pairs, lr, epochs, seed, desc):
    rm = model.add_reward_head(lm)
    tc = train_loop.TrainConfig(lr=lr, epochs=epochs, batch_size=64, seed=seed, desc=desc)
    train_loop.train_reward(rm, reward_rows(tok, pairs), tok.token_to_id("<pad>"), tc)
    return rm


def pair_accuracy(rm, tok, pairs):
    rows, pad = reward_rows(tok, pairs), tok.token_to_id("<pad>")
    rc, rr = (train_loop.reward_scores(rm, [row[j] for row in rows], pad) for j in (0, 1))
    return (rc > rr).float().mean().item()


def build(folder):
    """Build the tokenizer and the three models into folder (policy/, teacher/, student/)."""
    S = SETTINGS
    rng = random.Random(S["seed"])
    torch.manual_seed(S["seed"])
    tok = make_tokenizer()
    policy = build_policy(tok, rng, S["sft_examples"], S["seed"], S["sft_lr"], S["policy"],
                          "world: base policy (SFT)")
    teacher_pairs = oracle_pairs(policy, tok, rng, S["teacher_pairs"] + 1000, S["seed"] + 1)
    held_out = teacher_pairs[S["teacher_pairs"]:]
    synthetic = [corrupted_pair(rng) for _ in range(S["teacher_synthetic_pairs"])]
    teacher = build_reward(policy, tok, teacher_pairs[:S["teacher_pairs"]] + synthetic,
                           S["teacher_lr"], S["teacher_epochs"], S["seed"] + 2, "world: teacher")
    student_lm = build_policy(tok, rng, S["student_sft_examples"], S["seed"] + 3, S["sft_lr"],
                              S["student"], "world: student LM (SFT)")
    student = build_reward(student_lm, tok, teacher_pairs[:S["student_pairs"]], S["student_lr"],
                           S["student_epochs"], S["seed"] + 4, "world: student")
    info = {"teacher_accuracy": pair_accuracy(teacher, tok, held_out),
            "student_accuracy": pair_accuracy(student, tok, held_out),
            "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in
                           [("policy", policy), ("teacher", teacher), ("student", student)]}}
    for name, m in [("policy", policy), ("teacher", teacher), ("student", student)]:
        save_model(m, os.path.join(folder, name))
        tok.save(os.path.join(folder, name, "tokenizer.json"))
    with open(os.path.join(folder, "world.json"), "w") as f:
        json.dump({"settings": S, **info}, f, indent=2)
    return info


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_world")


def cache_folder():
    """Where --rebuild-world builds: ~/.cache/tsalign/world (or under $XDG_CACHE_HOME)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "tsalign", "world")


def rebuild():
    """Build a world now into cache_folder(), replacing the one there whole (an interrupted build
    leaves the previous one in place). The shipped world is never touched."""
    target = cache_folder()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".building-")
    info = build(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(f"built the default world in {target}: teacher accuracy {info['teacher_accuracy']:.3f}, "
          f"student accuracy {info['student_accuracy']:.3f} on held-out oracle pairs")
    return target


if __name__ == "__main__":  # python world.py DIR: build a world into DIR (not over the shipped one)
    import sys
    if len(sys.argv) != 2 or os.path.abspath(sys.argv[1]) == SHIPPED:
        sys.exit("usage: python world.py DIR  "
                 "(a new folder for the built world; not default_world/)")
    if os.path.exists(sys.argv[1]):
        sys.exit(f"world.py: {sys.argv[1]} exists; give a new folder")
    os.makedirs(sys.argv[1])
    print(json.dumps(build(sys.argv[1]), indent=1))
