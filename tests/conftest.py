"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers (the independent reference).

`make_checkpoint(folder, family, reward=False, **overrides)` builds a tiny transformers model from a config
(the family's defaults below, then `overrides` as config keys), gives it random weights, `save_pretrained`s
it into `folder` and returns the folder (a str). It writes nothing else (no tokenizer) and leaves the
global torch RNG untouched (it draws from its own seeded generator).

"Random weights" means every tensor, not just what transformers initialises at random: norm weights
(initialised to ones) and biases (initialised to zeros) are redrawn too, so a loader that swapped q_norm
and k_norm, dropped a bias or read the wrong LayerNorm would change the outputs.
"""
import json
import os
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

# Tiny models: one thread is ~100x faster than two here (OpenMP threads spin against each other on a
# busy 2-core machine: a 2-layer forward took 0.4 s with 2 threads, 2 ms with 1).
torch.set_num_threads(1)

try:
    import transformers

    transformers.utils.logging.disable_progress_bar()
except ImportError:  # tests that need no transformers still run
    pass

FAMILIES = ["llama", "llama3_rope", "llama_tied", "qwen2", "qwen3", "mistral", "gpt2"]

VOCAB = 128
BOS, EOS, PAD = 1, 2, 0

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def family_config(family, reward=False, **overrides):
    """A transformers config object for a tiny model of this family."""
    import transformers as tf

    if family == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        cls = tf.GPT2Config
    elif family in ("llama", "llama3_rope", "llama_tied"):
        kw = dict(_COMMON)
        if family == "llama3_rope":
            kw["rope_parameters"] = dict(LLAMA3_ROPE)
        if family == "llama_tied":
            kw["tie_word_embeddings"] = True
        cls = tf.LlamaConfig
    elif family == "qwen2":
        kw = dict(_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        cls = tf.Qwen2Config
    elif family == "qwen3":
        kw = dict(_COMMON, head_dim=24)  # 4 heads x 24 = 96 != hidden 64
        cls = tf.Qwen3Config
    elif family == "mistral":
        # rope_theta 1e6, as Mistral-7B-v0.2 has, not MistralConfig's default 10000: a loader that missed the
        # checkpoint's own value would go unseen otherwise.
        kw = dict(_COMMON, num_key_value_heads=1, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        cls = tf.MistralConfig
    else:
        raise ValueError(f"unknown family {family!r}")
    # Weights ~N(0, 0.1) rather than 0.02: logits of order 1, so errors show above the tolerances.
    kw.setdefault("initializer_range", 0.1)
    kw.update(overrides)
    if reward:
        kw["num_labels"] = 1
    return cls(**kw)


def build_model(family, reward=False, seed=0, **overrides):
    """A tiny random transformers model (float32, eval mode), every tensor drawn from a seeded generator."""
    import transformers as tf

    config = family_config(family, reward, **overrides)
    auto = tf.AutoModelForSequenceClassification if reward else tf.AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:  # norm weights (ones) and biases (zeros): make them matter
                    base = 0.0 if name.endswith("bias") else 1.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_checkpoint(tmp_path_or_dir, family, reward=False, seed=0, max_shard_size=None, **overrides):
    """Build a tiny random transformers model and save_pretrained it into tmp_path_or_dir; return the folder."""
    folder = str(tmp_path_or_dir)
    os.makedirs(folder, exist_ok=True)
    model = build_model(family, reward, seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return folder


def hf_load(folder, reward=False):
    """Load a checkpoint with transformers, float32, eval mode."""
    import transformers as tf

    auto = tf.AutoModelForSequenceClassification if reward else tf.AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture
def checkpoint(tmp_path):
    """The make_checkpoint function, bound to a fresh temporary folder per call."""
    counter = iter(range(10**6))

    def make(family, reward=False, **overrides):
        return make_checkpoint(tmp_path / f"ckpt{next(counter)}", family, reward, **overrides)

    return make


def uncached_greedy(lm, prompt, n):
    """Step-by-step argmax of our model with a full forward each step (no cache); also each step's top-two gap."""
    seq, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = lm(torch.tensor([seq], device=next(lm.parameters()).device))[0, -1]
            top2 = logits.topk(2).values
            gaps.append((top2[0] - top2[1]).item())
            seq.append(int(logits.argmax()))
    return seq[len(prompt):], gaps


# -----------------------------------------------------------------------------
# A tiny TS-Align setting for the end-to-end tests (tsalign.py in one process and under torchrun)

WORDS = [str(i) for i in range(10)] + ["user", "assistant", "\n"] + list("abcdefghij") + ["A", "B"]
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
DEVICE = os.environ.get("TSALIGN_TEST_DEVICE", "cpu")  # scripts/gpu_check.py sets cuda


def word_tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A policy (Llama), a student (a Qwen2 causal LM that gets a fresh head), a teacher (a GPT-2
    reward model) and an LLM judge (Qwen3), all sharing a 30-token word-level tokenizer, and a prompts file."""
    root = tmp_path_factory.mktemp("tiny")
    tok = word_tokenizer()
    V = tok.get_vocab_size()
    ids = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dirs = {"policy": make_checkpoint(root / "policy", "llama", seed=1, **ids),
            "student": make_checkpoint(root / "student", "qwen2", seed=2, **ids),
            "teacher": make_checkpoint(root / "teacher", "gpt2", reward=True, seed=3, **ids),
            "judge": make_checkpoint(root / "judge", "qwen3", seed=4, **ids)}
    for d in dirs.values():
        tok.save(os.path.join(d, "tokenizer.json"))
    # A random policy rarely says EOS; a few more stop ids (read from generation_config.json, as for
    # Llama-3) make most responses finish within --max-new-tokens, so that pairs get mined.
    with open(os.path.join(dirs["policy"], "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 4] + [tok.token_to_id(c) for c in "abcde"]}, f)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % 23] for j in range(3 + i % 4)) for i in range(40)) + "\n")
    return {**dirs, "prompts": str(prompts), "root": root}


def argv(w, out, *extra):
    return ["--policy", w["policy"], "--student", w["student"], "--teacher", w["teacher"], "--prompts", w["prompts"],
            "--prompt-format", "chatml", "--k", "4", "--prompts-per-round", "12", "--max-new-tokens", "16",
            "--eval-count", "6", "--batch-size", "4", "--lr", "1e-3", "--student-lr", "1e-3", "--out", str(out),
            "--student-warmup", "4", "--device", DEVICE, *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def pairs_of(out, r):
    """Round r's mined pairs, as pairs.jsonl holds them (dicts)."""
    with open(os.path.join(out, f"round_{r}", "pairs.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- Independent judges of a run's output: each model loaded on its own, outside the round's code ----

def rescore(scorer_dir, pairs, fmt="chatml"):
    """(chosen scores, rejected scores), (P,) each, of pairs.jsonl records by the reward model in scorer_dir,
    loaded on its own (not the run's copy), each response scored alone."""
    import roles

    s = roles.load_scorer(scorer_dir, fmt, "cpu")
    one = lambda p, side: s.score([p["prompt"]], [p[side]], [p.get(f"{side}_finished", True)])[0].item()  # noqa: E731
    return (torch.tensor([one(p, "chosen") for p in pairs]), torch.tensor([one(p, "rejected") for p in pairs]))


def greedy_answers(policy_dir, prompts, max_new_tokens, fmt="chatml"):
    """(text, finished) of the greedy answer to each prompt by the policy checkpoint in policy_dir, loaded on
    its own."""
    import data
    from checkpoint import load_model
    from generate import generate

    lm, tok = load_model(policy_dir, "cpu"), data.load_tokenizer(policy_dir)
    stops = list(lm.config.stop_token_ids) + [data.end_id(tok, fmt, lm.config)]
    out = generate(lm, [data.encode_prompt(tok, fmt, p) for p in prompts], max_new_tokens, eos_token_id=stops)
    return [data.response_text(tok, o, stops) for o in out]
