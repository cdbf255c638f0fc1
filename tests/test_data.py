"""Tests for data.py: prompt formats, padding and masks, policy and reward batches, prompt files.

The tokenizer is a tiny byte-level BPE trained here in a few milliseconds, with the chat special tokens added
and a post-processor that prepends BOS (as Llama 3's does), so the double-BOS trap is really there to fall in.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data

EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["hello world, how are you?", "the cat sat on the mat.", "Write a short poem about the sea.",
          "### Instruction:\n### Response:\n", "user assistant"]


def make_tokenizer(specials=SPECIALS):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if "<|begin_of_text|>" in specials:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return tok


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    make_tokenizer().save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def tok(tok_file):
    return data.load_tokenizer(tok_file.parent)


# -----------------------------------------------------------------------------
# load_tokenizer


def test_load_tokenizer_folder_and_file(tok_file):
    a = data.load_tokenizer(tok_file.parent)
    b = data.load_tokenizer(tok_file)
    assert a.get_vocab() == b.get_vocab()
    assert a.token_to_id("<|im_start|>") is not None


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match="tokenizer.json") as err:
        data.load_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


def test_matches_transformers(tok_file, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    for text in CORPUS + [data.format_prompt("chatml", "how are you?"), "unseen wörds 🙂 here"]:
        ours = tok.encode(text, add_special_tokens=False).ids
        assert ours == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ours, skip_special_tokens=False) == hf.decode(ours, skip_special_tokens=False)
    # The chatml prompt as encode_prompt gives it equals transformers' encoding of the same text.
    assert data.encode_prompt(tok, "chatml", "hi") == hf.encode(data.format_prompt("chatml", "hi"),
                                                                add_special_tokens=False)


# -----------------------------------------------------------------------------
# Prompt formats


def test_formats_render():
    assert data.format_prompt("chatml", "Hi {x}") == "<|im_start|>user\nHi {x}<|im_end|>\n<|im_start|>assistant\n"
    assert data.format_prompt("llama3", "Hi") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert data.format_prompt("alpaca", "Hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi\n\n### Response:\n")
    assert data.format_prompt("plain", "Hi") == "Hi\n"
    assert data.FORMATS["chatml"][2] == "<|im_end|>"
    assert data.FORMATS["llama3"][2] == "<|eot_id|>"
    assert data.FORMATS["alpaca"][1:] == ([], None)


def test_unknown_format_lists_known():
    with pytest.raises(ValueError, match="chatml.*llama3.*alpaca.*plain"):
        data.format_prompt("vicuna", "Hi")


def test_encode_prompt_single_bos_and_special_ids(tok):
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.encode("x").ids[0] == bos  # the trap is armed: plain encode prepends BOS
    ids = data.encode_prompt(tok, "llama3", "Hi")
    assert ids.count(bos) == 1 and ids[0] == bos
    for special in data.FORMATS["llama3"][1]:
        assert tok.token_to_id(special) in ids
    ids = data.encode_prompt(tok, "chatml", "Hi")
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert bos not in ids
    assert ids[0] == im_start and ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert tok.decode(ids, skip_special_tokens=False) == data.format_prompt("chatml", "Hi")


def test_check_format_names_missing_token():
    tok = make_tokenizer([EOS, "<|im_start|>"])  # no <|im_end|>, no llama3 tokens
    with pytest.raises(ValueError, match="chatml") as err:
        data.check_format(tok, "chatml")
    assert "<|im_end|>" in str(err.value) and "<|im_start|>" not in str(err.value)
    with pytest.raises(ValueError, match="<|eot_id|>"):
        data.encode_prompt(tok, "llama3", "Hi")
    data.check_format(tok, "alpaca")  # no specials needed


def test_check_format_in_vocab_but_split():
    # "<|im_start|>" is a vocab entry but not an added token, so the pre-tokenizer splits its text.
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_end|>"])
    with pytest.raises(ValueError) as err:
        data.check_format(tok, "chatml")
    assert "<|im_start|>" in str(err.value) and "<|im_end|>" not in str(err.value)


# -----------------------------------------------------------------------------
# Padding and policy batches


def test_pad_right_and_left_masks_from_lengths():
    eos = 2  # pad id equal to a real token id
    seqs = [[5, 2], [7, 8, 9, 2]]
    ids, mask = data.pad(seqs, pad_id=eos, side="right")
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 2, 2, 2], [7, 8, 9, 2]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # the real final EOS keeps mask 1
    ids, mask = data.pad(seqs, pad_id=eos, side="left")
    assert ids.tolist() == [[2, 2, 5, 2], [7, 8, 9, 2]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_pad_errors():
    with pytest.raises(ValueError, match="no sequences"):
        data.pad([], 0)
    with pytest.raises(ValueError, match="side"):
        data.pad([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        data.pad([[1], []], 0)


def test_policy_batch_response_mask():
    prompts = [[10, 11, 12], [20]]
    responses = [[13, 2], [21, 22, 2]]  # both end in EOS = pad id 2
    b = data.policy_batch(prompts, responses, pad_id=2, side="right")
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 2], [20, 21, 22, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    b = data.policy_batch(prompts, responses, pad_id=2, side="left")
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 2], [2, 20, 21, 22, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]


# -----------------------------------------------------------------------------
# Reward batches


def test_response_text(tok):
    eos, im_end = tok.token_to_id(EOS), tok.token_to_id("<|im_end|>")
    body = tok.encode("the cat sat", add_special_tokens=False).ids
    assert data.response_text(tok, body + [im_end], {eos, im_end}) == ("the cat sat", True)
    assert data.response_text(tok, body + [eos, eos, eos], [eos]) == ("the cat sat", True)  # padded after EOS
    assert data.response_text(tok, body, [eos]) == ("the cat sat", False)
    # A special token that is not a stop id stays in the text rather than vanishing.
    assert data.response_text(tok, body + [im_end], [eos]) == ("the cat sat<|im_end|>", False)


def reward_batch(tok, prompts, responses, finished, eos, pad_id, side="right"):
    return data.pad([data.reward_ids(tok, "chatml", p, r, f, eos) for p, r, f in zip(prompts, responses, finished)],
                    pad_id, side)


def test_reward_rows_eos_only_when_finished(tok):
    eos, pad_id = tok.token_to_id(EOS), tok.token_to_id("<|eot_id|>")  # pad != eos here
    prompts, responses = ["how are you?", "hi"], ["the cat sat on the mat.", "hello"]
    ids, mask = reward_batch(tok, prompts, responses, [True, False], eos, pad_id)
    rows = [data.encode_prompt(tok, "chatml", p) + tok.encode(r, add_special_tokens=False).ids
            for p, r in zip(prompts, responses)]
    rows[0] = rows[0] + [eos]
    lengths = [len(r) for r in rows]
    assert ids.shape == mask.shape == (2, max(lengths))
    for i, row in enumerate(rows):
        assert ids[i, :lengths[i]].tolist() == row
        assert mask[i].tolist() == [1] * lengths[i] + [0] * (max(lengths) - lengths[i])
    assert (ids[1] == eos).sum() == 0  # the unfinished row has no EOS anywhere
    # Left padding with pad == eos: the finished row's last real token is its EOS, and it keeps mask 1.
    ids, mask = reward_batch(tok, prompts, responses, [True, False], eos, eos, side="left")
    assert ids[0, -1] == eos and mask[0, -1] == 1
    assert mask.sum(1).tolist() == lengths


# -----------------------------------------------------------------------------
# Prompt files


def test_read_prompts_jsonl_and_txt(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a\u2028b", "id": 1}, ensure_ascii=False) + "\n\n"
                 + json.dumps({"prompt": "second"}) + "\r\n")
    assert data.read_prompts(f) == ["a\u2028b", "second"]
    f.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "after a BOM"}\n')
    assert data.read_prompts(f) == ["after a BOM"]
    f = tmp_path / "p.txt"
    f.write_bytes(b"first one\r\n\n   \nsecond {braces}\n")  # CRLF on the first line
    assert data.read_prompts(str(f)) == ["first one", "second {braces}"]


@pytest.mark.parametrize("content, line, what", [
    ('{"prompt": "ok"}\n\n{"prompt": oops}\n', 3, "malformed JSON"),
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', 2, '"prompt" key'),
    ('["a list"]\n', 1, '"prompt" key'),
    ('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": 5}\n', 3, "non-empty string"),
    ('{"prompt": "  "}\n', 1, "non-empty string"),
])
def test_read_prompts_jsonl_errors(tmp_path, content, line, what):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError) as err:
        data.read_prompts(f)
    msg = str(err.value)
    assert f"line {line}:" in msg and what in msg and "bad.jsonl" in msg and "\n" not in msg


def test_read_prompts_file_errors(tmp_path):
    for name in ("empty.jsonl", "empty.txt"):
        (tmp_path / name).write_text("\n  \n")
        with pytest.raises(ValueError, match=f"{name} has no prompts"):
            data.read_prompts(tmp_path / name)
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"p\.csv.*extension"):
        data.read_prompts(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError):
        data.read_prompts(tmp_path / "missing.txt")
