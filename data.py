"""
Text in, token ids out; token ids in, padded batches out.

This is the only file that turns text into token ids and lists of ids into tensors. Three models meet here:
the policy, the student reward model and the teacher reward model, and each may have its own tokenizer and
prompt format. So the policy trains on the exact token ids it sampled (policy_batch), while every reward
model gets the *text* of a response and tokenises it with its own tokenizer and format (reward_batch).

Masks are always built from sequence lengths, never from `ids != pad_id`: many models use their EOS id as the
pad id, and a mask built from ids would hide the final EOS from the loss and the reward head.

Shape vocabulary: B batch (rows), T time (tokens per row, after padding).
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

# -----------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a checkpoint folder (reads its tokenizer.json) or a tokenizer.json file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception with a multi-line message
        first_line = (str(e).splitlines() or ["unknown error"])[0]
        raise ValueError(f"could not parse tokenizer file {file}: {first_line}") from None


# -----------------------------------------------------------------------------
# Prompt formats

# name -> (template with {prompt}, special tokens the template writes out, end-of-turn token or None).
# The end-of-turn token is what ends an assistant answer in this format; formats without one (None) end an
# answer with the model's EOS. Callers add it to the model's stop ids when sampling.
FORMATS = {
    "chatml": (
        "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
    # Stanford Alpaca's template for an instruction without an input field.
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n",
        [],
        None,
    ),
    # For base models. The newline keeps the answer from running on in the prompt's last line.
    "plain": ("{prompt}\n", [], None),
    # The embedded default world (world.py): digits to sort between its own BOS and separator tokens.
    "digits": ("<bos> {prompt} <sep>", ["<bos>", "<sep>"], "<eos>"),
}


def _format(name):
    if name not in FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_prompt(name, prompt):
    """The prompt text as the model should see it, ending where the assistant's answer begins."""
    template, _, _ = _format(name)
    # TODO: a prompt that itself contains special-token text (e.g. "<|im_end|>") is encoded as that special
    # token. We do not escape it; prompt sets with such text are rare and would need per-tokenizer handling.
    return template.replace("{prompt}", prompt)


def check_format(tokenizer, name):
    """Raise if any special token of the format is not exactly one token in this tokenizer."""
    _, specials, _ = _format(name)
    missing = []
    for tok in specials:
        # In the vocab is not enough: unless it is registered as an added token, the pre-tokenizer may still
        # split its text into pieces. So we also check that encoding its text gives back that one id.
        tok_id = tokenizer.token_to_id(tok)
        if tok_id is None or tokenizer.encode(tok, add_special_tokens=False).ids != [tok_id]:
            missing.append(tok)
    if missing:
        raise ValueError(f"prompt format {name!r} needs special tokens this tokenizer lacks as single tokens: "
                         f"{', '.join(missing)}")


def encode_prompt(tokenizer, name, prompt):
    """Token ids of the formatted prompt, as a list of ints."""
    check_format(tokenizer, name)
    # add_special_tokens=False: the format writes out its own special tokens, and a tokenizer whose
    # post-processor also prepends BOS (Llama 3 does) would otherwise give two BOS tokens.
    return tokenizer.encode(format_prompt(name, prompt), add_special_tokens=False).ids


# -----------------------------------------------------------------------------
# Padding


def pad(seqs, pad_id, side="right"):
    """Pad a list of int lists to one (B, T) long tensor of ids and a (B, T) long mask (1 on real tokens).

    The mask comes from each row's length, so a real token equal to pad_id (an EOS when pad == eos) keeps
    mask 1. Left padding is what generation wants (all prompts end at the same column); right padding is
    the usual choice for training and scoring.
    """
    if side not in ("left", "right"):
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("pad: no sequences to pad")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        # An empty row has no last real token, which breaks reward reading and left-padded positions.
        raise ValueError(f"pad: sequence {lengths.index(0)} is empty")
    B, T = len(seqs), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, cols] = torch.tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


# -----------------------------------------------------------------------------
# Policy batches: the policy's own token ids


def policy_batch(prompts, responses, pad_id, side="right"):
    """Batch prompt + response ids (lists of int lists) for the policy's log-probs.

    Returns a dict of (B, T) long tensors: input_ids, attention_mask, and response_mask, which is 1 exactly
    on the response tokens and 0 on the prompt and the padding. No re-tokenisation happens here: the policy
    is trained on the very ids it sampled.
    """
    assert len(prompts) == len(responses), f"{len(prompts)} prompts but {len(responses)} responses"
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    flags = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    input_ids, attention_mask = pad(rows, pad_id, side)  # (B, T), (B, T)
    response_mask, _ = pad(flags, 0, side)  # (B, T); same lengths, so it lines up with input_ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


# -----------------------------------------------------------------------------
# Reward batches: each reward model formats and tokenises the text itself


def response_text(tokenizer, ids, stop_ids):
    """Decode a sampled response to (text, finished).

    The response is cut at its first stop id, which is dropped; finished says whether there was one. For a
    sampler that stops each row at its stop token this is the same as stripping a trailing stop id, and it
    also copes with rows padded after the stop (pad == eos). Only the response ids are searched, never the
    prompt, whose template may contain the same token. Special tokens are kept in the text
    (skip_special_tokens=False) so that nothing the policy wrote silently disappears before scoring.
    """
    ids = list(ids)
    stop_ids = set(stop_ids)
    stop_at = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    finished = stop_at is not None
    if finished:
        ids = ids[:stop_at]
    return tokenizer.decode(ids, skip_special_tokens=False), finished


def reward_ids(tokenizer, fmt, prompt, response, finished, eos_id):
    """One reward-model row: formatted prompt ids + response ids (+ this model's EOS if it finished)."""
    row = encode_prompt(tokenizer, fmt, prompt) + tokenizer.encode(response, add_special_tokens=False).ids
    return row + [eos_id] if finished else row


def reward_batch(tokenizer, fmt, prompts, responses, finished, eos_id, pad_id, side="right"):
    """Batch (prompt text, response text) pairs for one reward model: (input_ids, attention_mask), (B, T).

    Each row is the formatted prompt, then the response tokenised on its own, then this reward model's EOS
    if the response finished. The prompt and the response are tokenised separately so the prompt part is
    the same ids for every response to it (as when the policy generated it). A truncated response gets no
    EOS, so a reward model can tell it from a finished one.
    """
    assert len(prompts) == len(responses) == len(finished), "prompts, responses and finished differ in length"
    rows = [reward_ids(tokenizer, fmt, p, r, done, eos_id) for p, r, done in zip(prompts, responses, finished)]
    return pad(rows, pad_id, side)  # (B, T), (B, T)


# -----------------------------------------------------------------------------
# Prompt files


def read_prompts(path):
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a .txt file (one per line). Blank lines skip."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"prompt file {path}: unknown extension {path.suffix!r}, expected .jsonl or .txt")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop the byte-order mark some editors write
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = []
    # read_text has already turned \r\n into \n. We split on "\n" rather than use splitlines(), which
    # also breaks on characters such as U+2028 that JSON allows unescaped inside a string.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        prompt = _jsonl_prompt(path, lineno, line) if path.suffix == ".jsonl" else line
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


def _jsonl_prompt(path, lineno, line):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError(f"{path} line {lineno}: expected an object with a \"prompt\" key")
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{path} line {lineno}: \"prompt\" must be a non-empty string, got {prompt!r:.40}")
    return prompt
