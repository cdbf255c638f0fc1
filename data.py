"""
Text in, token ids out; token ids in, padded batches out; and the records a round passes along.

The policy, the student and the teacher may each have their own tokenizer and prompt format: the
policy trains on the exact token ids it sampled (policy_batch), each reward model tokenises the
response's *text* in its own format (reward_ids). Masks come from lengths, never `ids != pad_id`:
many models pad with their EOS id, and such a mask would hide the final EOS from loss and reward.

Shapes: B batch (rows), T time (tokens per row, after padding).
"""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

# ---- The two records of TS-Align: a sampled response, and a preference pair ----------------------

@dataclass
class Sample:
    """One response the policy sampled."""
    ids: list          # the policy's own token ids, its stop token included if it stopped
    text: str          # decoded, stop token removed
    finished: bool     # ended with a stop token (False: truncated at the length limit)


@dataclass
class Pair:
    """For `prompt`, `chosen` beats `rejected`; agreement and warm-up pairs lack token ids, the
    world's oracle pairs a margin too. As JSON the fields keep this order; None ones are omitted."""
    prompt: str
    chosen: str
    rejected: str
    chosen_finished: bool = True
    rejected_finished: bool = True
    margin: float | None = None      # how much the decider (teacher, or student) prefers chosen
    chosen_ids: list | None = None   # the policy's own ids of each response (what DPO trains on)
    rejected_ids: list | None = None

    def to_json(self):
        return {k: v for k, v in asdict(self).items() if v is not None}


# ---- Tokenizer -----------------------------------------------------------------------------------

def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a checkpoint folder's tokenizer.json, or from that file."""
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


# ---- Prompt formats ------------------------------------------------------------------------------

# name -> (template with {prompt}, special tokens it writes out, the token that ends an answer in
# this format, or None: the model's EOS). Sampling adds that token to the model's stop ids.
FORMATS = {
    "chatml": ("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
               ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|eot_id|>"),
    # Stanford Alpaca's template for an instruction without an input field.
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n", [], None),
    # UltraRM (the paper's teacher): the template of its model card's usage code.
    "ultrarm": ("Human: {prompt}\n\nAssistant: ", [], None),
    # For base models. The newline keeps the answer from running on in the prompt's last line.
    "plain": ("{prompt}\n", [], None),
    # The embedded default world (world.py): digits to sort between its own BOS and separator.
    "digits": ("<bos> {prompt} <sep>", ["<bos>", "<sep>"], "<eos>"),
}


def _format(name):
    if name not in FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_prompt(name, prompt):
    """The prompt text as the model should see it, ending where the assistant's answer begins."""
    template, _, _ = _format(name)
    # TODO: special-token text in a prompt (e.g. "<|im_end|>") is encoded as that token, unescaped.
    return template.replace("{prompt}", prompt)


def check_format(tokenizer, name):
    """Raise if any special token of the format is not exactly one token in this tokenizer."""
    _, specials, _ = _format(name)
    missing = []
    for tok in specials:
        # In the vocab is not enough: unless it is registered as an added token, the pre-tokenizer
        # may still split its text into pieces. So encoding its text must give back that one id.
        tok_id = tokenizer.token_to_id(tok)
        if tok_id is None or tokenizer.encode(tok, add_special_tokens=False).ids != [tok_id]:
            missing.append(tok)
    if missing:
        raise ValueError(f"prompt format {name!r} needs special tokens this tokenizer lacks as "
                         f"single tokens: {', '.join(missing)}")


def encode_prompt(tokenizer, name, prompt):
    """Token ids of the formatted prompt, as a list of ints."""
    check_format(tokenizer, name)
    # add_special_tokens=False: the format writes out its own special tokens, and a tokenizer whose
    # post-processor also prepends BOS (Llama 3 does) would otherwise give two BOS tokens.
    return tokenizer.encode(format_prompt(name, prompt), add_special_tokens=False).ids


def end_id(tokenizer, fmt, model_config):
    """The token a finished response ends with: the format's end of turn, else the model's EOS."""
    end = FORMATS[fmt][2]
    if end is not None:
        return tokenizer.token_to_id(end)
    if not model_config.stop_token_ids:
        raise ValueError(f"{model_config.source}: config.json has no eos_token_id, and format "
                         f"{fmt!r} has no end token")
    return model_config.stop_token_ids[0]


def pad_id(model_config):
    """The model's pad id: its own, else its first stop id (padding is masked: any id would do)."""
    if model_config.pad_token_id is not None:
        return model_config.pad_token_id
    return (model_config.stop_token_ids or [0])[0]


# ---- Padding -------------------------------------------------------------------------------------

def pad(seqs, pad_id, side="right"):
    """Pad int lists to (B, T) long ids and mask (1 on real tokens); the mask comes from each row's
    length, so a real token equal to pad_id (an EOS when pad == eos) keeps mask 1."""
    if side not in ("left", "right"):
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("pad: no sequences to pad")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        # An empty row has no last real token: that breaks reward reading and left-padded positions.
        raise ValueError(f"pad: sequence {lengths.index(0)} is empty")
    B, T = len(seqs), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, cols] = torch.tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


# ---- Packed batches: rows that share a prefix compute it once ------------------------------------

def common_prefix(rows):
    """How many leading tokens all rows (int lists) share."""
    n = min(len(r) for r in rows)
    return next((j for j in range(n) if any(r[j] != rows[0][j] for r in rows)), n)


def pack(rows, pad_id, groups=None, side="right"):
    """Rows (int lists) in a (B, T) batch: rows with equal keys in `groups` (e.g. one prompt's K
    responses; None: each alone) fill one batch row, their common prefix (branch 0), then each one's
    remaining tokens as its branch (1, 2, ...), which a causal model given the branches
    (model.visible) computes exactly as alone. -> a dict of (B, T) long input_ids, attention_mask,
    branch, and index (N, T_max): each row's flat token indices (into B*T), -1 past its end."""
    keys = range(len(rows)) if groups is None else groups
    members = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    packed, branches, cols = [], [], [None] * len(rows)
    for unit in members.values():
        n = common_prefix([rows[i] for i in unit])
        seq, br = list(rows[unit[0]][:n]), [0] * n
        for g, i in enumerate(unit, start=1):
            rest = list(rows[i][n:])
            cols[i] = (len(packed), list(range(n)) + list(range(len(seq), len(seq) + len(rest))))
            seq, br = seq + rest, br + [g] * len(rest)
        packed.append(seq)
        branches.append(br)
    input_ids, attention_mask = pad(packed, pad_id, side)  # (B, T)
    branch, _ = pad(branches, 0, side)                     # (B, T): same lengths, so it lines up
    B, T = input_ids.shape
    index = torch.full((len(rows), max(len(r) for r in rows)), -1, dtype=torch.long)  # (N, T_max)
    for i, (b, c) in enumerate(cols):
        shift = 0 if side == "right" else T - len(packed[b])
        index[i, :len(c)] = b * T + shift + torch.tensor(c, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "branch": branch,
            "index": index}


def last_index(batch, rows):
    """The flat index of each row's last token in a packed batch, (N,)."""
    return batch["index"][torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]


# ---- Policy batches: the policy's own token ids --------------------------------------------------

def policy_batch(prompts, responses, pad_id, side="right", groups=None):
    """Prompt + response ids (int lists, never re-tokenised) batched for the policy's log-probs: a
    dict of (B, T) long input_ids, attention_mask, and for the N response tokens predict (N,), the
    flat index (into B*T) of the position predicting each, target (N,) the token, row (N,) its row,
    and n_tokens (R,) their number per row (a row's first token, predicted by nothing, not counted).
    groups: None, a row each, with response_mask (B, T), 1 exactly on the response; or a key per
    row, and rows with equal keys share their common prefix (pack; the batch has a branch)."""
    assert len(prompts) == len(responses), f"{len(prompts)} prompts but {len(responses)} responses"
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    batch = pack(rows, pad_id, groups, side)
    at = [(i, j) for i, (p, row) in enumerate(zip(prompts, rows))
          for j in range(max(1, len(p)), len(row))]  # (row, position) of each response token
    i, j = (torch.tensor([i for i, _ in at], dtype=torch.long),
            torch.tensor([j for _, j in at], dtype=torch.long))  # (N,) each
    batch.update(predict=batch["index"][i, j - 1],
                 target=batch["input_ids"].flatten()[batch["index"][i, j]], row=i,
                 n_tokens=torch.bincount(i, minlength=len(rows)))
    del batch["index"]
    if groups is None:
        del batch["branch"]  # every row alone: a plain batch
        flags = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
        batch["response_mask"], _ = pad(flags, 0, side)  # (B, T), lined up with input_ids
    return batch


# ---- Reward batches: each reward model formats and tokenises the text itself ---------------------

def response_text(tokenizer, ids, stop_ids):
    """A sampled response's (text, finished): cut at its first stop id (dropped), if any, searched
    in the response only (a prompt template may hold one). Special tokens stay: all is scored."""
    stops = set(stop_ids)
    stop_at = next((i for i, t in enumerate(ids) if t in stops), None)
    return tokenizer.decode(list(ids)[:stop_at], skip_special_tokens=False), stop_at is not None


def reward_ids(tokenizer, fmt, prompt, response, finished, eos_id):
    """One reward-model row: formatted prompt ids + response ids (+ the model's EOS if finished)."""
    row = (encode_prompt(tokenizer, fmt, prompt)
           + tokenizer.encode(response, add_special_tokens=False).ids)
    return row + [eos_id] if finished else row


def pair_ids(tokenizer, prompt, response, max_len):
    """An encoder reward model's row: its tokenizer's pair encoding of (prompt, response) ([CLS]
    prompt [SEP] response [SEP] for DeBERTa-v3), no prompt format or stop token: it was trained on
    the bare pair. Past max_len tokens the response (being judged) stays whole and the prompt is cut
    from its left, keeping its end; a response too long alone keeps its beginning, and no prompt."""
    prompt_enc = tokenizer.encode(prompt, add_special_tokens=False)
    response_enc = tokenizer.encode(response, add_special_tokens=False)
    room = max_len - tokenizer.post_processor.num_special_tokens_to_add(True)
    if len(prompt_enc.ids) + len(response_enc.ids) > room:
        response_enc.truncate(room)  # keeps the beginning
        prompt_enc.truncate(room - len(response_enc.ids), direction="left")  # keeps the end
    return tokenizer.post_process(prompt_enc, response_enc).ids


# ---- Prompt files --------------------------------------------------------------------------------

def read_prompts(path):
    """Prompts from .jsonl ({"prompt": ...} a line) or .txt (one a line); blank lines skipped."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"prompt file {path}: unknown extension {path.suffix!r}, "
                         "expected .jsonl or .txt")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark (some editors)
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path}: not UTF-8 text "
                         f"({e.reason} at byte {e.start})") from None
    prompts = []
    # read_text has already turned \r\n into \n. Split on "\n", not with splitlines(), which also
    # breaks on characters such as U+2028 that JSON allows unescaped inside a string.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        prompts.append(_jsonl_prompt(path, lineno, line) if path.suffix == ".jsonl" else line)
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
        raise ValueError(f"{path} line {lineno}: \"prompt\" must be a non-empty string, "
                         f"got {prompt!r:.40}")
    return prompt


def split_prompts(prompts, n_eval, seed, eval_prompts=None):
    """(training prompts, held-out prompts): the given held-out ones, or a fixed, seeded share of
    prompts (at most n_eval, at most a fifth). A held-out prompt never enters training."""
    if eval_prompts is None:
        shuffled = random.Random(seed).sample(prompts, len(prompts))
        n = min(n_eval, len(shuffled) // 5)
        if n < 1:
            raise ValueError(f"{len(prompts)} prompts are too few to hold some out; "
                             "give --eval-prompts")
        eval_prompts, prompts = shuffled[:n], shuffled[n:]
    held = set(eval_prompts)
    train = [p for p in prompts if p not in held]
    if not train:
        raise ValueError("no training prompts are left once the held-out prompts are removed")
    return train, eval_prompts


def check_lengths(policy, scorers, prompts, max_new_tokens):
    """A prompt that cannot fit with its response is an error now, not after an hour of work. policy
    and scorers: objects with .tok, .fmt and a .model with .config.max_positions (roles.py)."""
    for i, p in enumerate(prompts):
        n = len(encode_prompt(policy.tok, policy.fmt, p))
        if n + max_new_tokens > policy.model.config.max_positions:
            raise ValueError(f"prompt {i} ({p[:40]!r}...) has {n} tokens: with --max-new-tokens "
                             f"{max_new_tokens} it exceeds the policy's context of "
                             f"{policy.model.config.max_positions}")
        for s in scorers:  # an encoder ("pair") is exempt: pair_ids cuts its prompt to fit
            if s.judge or s.fmt == "pair":
                continue
            if (len(encode_prompt(s.tok, s.fmt, p)) + max_new_tokens + 1
                    > s.model.config.max_positions):
                raise ValueError(f"prompt {i} ({p[:40]!r}...) with --max-new-tokens "
                                 f"{max_new_tokens} exceeds the context of {s.model.config.source}")
