"""The DeBERTa-v2/v3 encoder reward model (encoder.py) against transformers' DebertaV2ForSequenceClassification:
rewards, hidden states and gradients on tiny random models of both branches of its attention, loading and
saving, the student's pair encoding and its truncation rule, the file and option checks, and TS-Align rounds
with a DeBERTa student (one process, and under torchrun)."""
import json
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import data
import roles
import tsalign
from checkpoint import check_folder, config_from_hf, hf_names, load_model, save_model
from conftest import WORDS, argv, metrics
from encoder import log_buckets
from model import add_lora, merge_lora

tf = pytest.importorskip("transformers")

# Configuration A: deberta-v3's branch (its config.json, with 16 buckets to fit a tiny model). B: the other
# branch of every switch: absolute positions, no buckets, separate position projections, the convolution.
CONFIGS = {
    "A": dict(relative_attention=True, position_buckets=16, max_relative_positions=-1, share_att_key=True,
              pos_att_type="p2c|c2p", position_biased_input=False, type_vocab_size=0, norm_rel_ebd="layer_norm"),
    "B": dict(relative_attention=True, position_buckets=-1, max_relative_positions=24, share_att_key=False,
              pos_att_type=["c2p", "p2c"], position_biased_input=True, type_vocab_size=0, norm_rel_ebd="none",
              conv_kernel_size=3, conv_act="tanh", hidden_act="gelu_new"),
}
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, pad_token_id=0, num_labels=1, initializer_range=0.3)


def make_deberta(folder, name, seed=0, **overrides):
    """A tiny random DebertaV2ForSequenceClassification saved into folder; every tensor drawn (LayerNorm
    weights and biases too, so that one read from the wrong place shows). Returns the transformers model."""
    config = tf.DebertaV2Config(**{**TINY, **CONFIGS[name], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = tf.DebertaV2ForSequenceClassification(config).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if p.dim() == 1:
                    p.copy_((0.0 if n.endswith("bias") else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
            hf.classifier.weight.mul_(4)  # rewards of order 1
    hf.save_pretrained(str(folder))
    return hf


def hf_rewards(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits[:, 0]


def rows(lengths, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.pad([torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths], 0)


# Long rows cross many buckets (A: 8 exact distances each way, then log buckets up to 127; B: distances
# beyond 24 share the last embedding); the short ones are padded by up to 95 tokens.
LENGTHS = [100, 63, 17, 5]


def test_log_buckets_equal_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
    d = torch.arange(-1500, 1501)
    for buckets, max_relative in [(256, 512), (16, 128), (32, 64), (64, 1024)]:
        assert torch.equal(log_buckets(d, buckets, max_relative), make_log_bucket_position(d, buckets, max_relative))


@pytest.mark.parametrize("name", ["A", "B"])
def test_rewards_equal_transformers(tmp_path, name):
    hf = make_deberta(tmp_path, name)
    ours = load_model(str(tmp_path), "cpu")
    ids, mask = rows(LENGTHS)
    theirs = hf_rewards(hf, ids, mask)
    assert theirs.std() > 0.3  # rewards of order 1, so that an error shows above the tolerance
    with torch.no_grad():
        batched = ours(ids, mask)
        assert (batched - theirs).abs().max() < 1e-4
        for i, n in enumerate(LENGTHS):  # alone, unpadded: the same reward, by both
            alone = ids[i:i + 1, :n]
            assert (ours(alone) - batched[i]).abs().max() < 1e-5
            assert (hf_rewards(hf, alone, torch.ones_like(alone)) - ours(alone)).abs().max() < 1e-4
        # The final hidden states of every real token, not only the first one the reward reads.
        h_ours = ours.encoder(ids, mask)
        h_theirs = hf.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        assert (h_ours[real] - h_theirs[real]).abs().max() < 1e-4


# What transformers' DeBERTa modules assume for keys that DebertaV2Config itself does not define.
MODULE_DEFAULTS = dict(share_att_key=False, norm_rel_ebd="none", conv_act="tanh", position_buckets=-1, conv_groups=1)


def test_missing_keys_take_transformers_defaults(tmp_path):
    """config.json read as transformers reads it: a key left out means transformers' default."""
    make_deberta(tmp_path, "B", hidden_act="gelu")
    cfg = json.loads((tmp_path / "config.json").read_text())
    defaults = {**tf.DebertaV2Config().to_dict(), **MODULE_DEFAULTS}
    dropped = [k for k in cfg if k in defaults and cfg[k] == defaults[k] and k not in ("architectures", "model_type")]
    assert {"share_att_key", "norm_rel_ebd", "conv_act", "position_buckets", "layer_norm_eps", "hidden_act",
            "pooler_hidden_act", "type_vocab_size"} <= set(dropped)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in dropped}))
    hf = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours = load_model(str(tmp_path), "cpu")
    ids, mask = rows(LENGTHS)
    with torch.no_grad():
        assert (ours(ids, mask) - hf_rewards(hf, ids, mask)).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["A", "B"])
def test_gradients_equal_transformers(tmp_path, name):
    """Training mode without dropout: the gradient of every weight equals transformers'."""
    hf = make_deberta(tmp_path, name, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    ours = load_model(str(tmp_path), "cpu").train()
    ids, mask = rows(LENGTHS)
    w = torch.linspace(-1, 1, len(LENGTHS))
    (ours(ids, mask) * w).sum().backward()
    (hf(input_ids=ids, attention_mask=mask).logits[:, 0] * w).sum().backward()
    theirs = dict(hf.named_parameters())
    for name_, (hf_names_, _) in hf_names(ours).items():
        g = ours.get_parameter(name_).grad
        g_hf = torch.cat([theirs[n].grad for n in hf_names_])
        assert (g - g_hf).abs().max() <= 1e-4 * max(1.0, g_hf.abs().max().item()), name_


@pytest.mark.parametrize("hidden, attention", [(0.1, 0.0), (0.0, 0.1), (0.0, 0.0)])
def test_dropout_follows_the_config_in_training_only(tmp_path, hidden, attention):
    """hidden_dropout_prob and attention_probs_dropout_prob each act in training (two forwards differ), and
    none acts while scoring (load_model gives eval mode)."""
    make_deberta(tmp_path, "A", hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention)
    ours = load_model(str(tmp_path), "cpu")
    ids, mask = rows(LENGTHS)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask), ours(ids, mask))
        ours.train()
        assert torch.equal(ours(ids, mask), ours(ids, mask)) == (hidden == attention == 0.0)


def test_save_reloads_in_transformers_sharded_with_lora(tmp_path):
    make_deberta(tmp_path / "src", "A")
    ours = load_model(str(tmp_path / "src"), "cpu")
    torch.manual_seed(0)  # the adapters' values, whatever tests ran before (the bounds below are tight)
    add_lora(ours, 2)
    assert {n.rsplit(".", 1)[0] for n, p in ours.named_parameters() if p.requires_grad} >= {
        "encoder.blocks.0.attn.qkv.lora_a", "encoder.blocks.1.mlp.down.lora_b", "pooler.lora_a", "score"}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.2)  # adapters that change the rewards
    out = tmp_path / "saved"
    save_model(ours, str(out), max_shard_size=20_000)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1  # shards, with their index
    (out / "tokenizer.json").write_text("{}")  # (check_folder wants one; the source had none to copy)
    assert check_folder(str(out)).encoder
    ids, mask = rows(LENGTHS)
    with torch.no_grad():
        mine = ours(ids, mask)
        hf = tf.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
        # rewards of a few units: float32 through the adapters agrees to a few parts in a million
        close = partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
        close(hf_rewards(hf, ids, mask), mine)
        close(load_model(str(out), "cpu")(ids, mask), mine)
        merge_lora(ours)
        close(ours(ids, mask), mine)


def test_loading_ignores_what_transformers_ignores(tmp_path):
    """Older saves carry position ids, and deberta-v3 checkpoints absolute positions that it does not use;
    transformers ignores both, and so do we. Any other extra tensor is an error."""
    make_deberta(tmp_path, "A")
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    tensors["deberta.embeddings.position_ids"] = torch.arange(128)[None]
    tensors["deberta.embeddings.position_embeddings.weight"] = torch.randn(128, 32)
    save_file(tensors, file, metadata={"format": "pt"})
    load_model(str(tmp_path), "cpu")
    tensors["deberta.encoder.extra.weight"] = torch.randn(3)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not use.*deberta.encoder.extra.weight"):
        load_model(str(tmp_path), "cpu")


@pytest.mark.parametrize("key, value", [("type_vocab_size", 2), ("pos_att_type", "c2p|p2p"), ("norm_rel_ebd", "batch"),
                                        ("hidden_act", "mish"), ("embedding_size", 16), ("conv_kernel_size", 2),
                                        ("pooler_hidden_size", 16)])
def test_unimplemented_settings_are_one_line_errors_naming_the_key(key, value):
    hf = {**TINY, **CONFIGS["B"], "architectures": ["DebertaV2ForSequenceClassification"], key: value}
    with pytest.raises(ValueError) as e:
        config_from_hf(hf, source="somewhere")
    assert str(e.value).startswith(f"{key} {value!r} in config.json of somewhere: ") and "\n" not in str(e.value)


# ---- The student's input: its tokenizer's pair encoding, right padding, the truncation rule --------

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]


def pair_tokenizer():
    """A word-level tokenizer over the test world's words whose post-processor builds DeBERTa-v3's single
    and pair encodings: [CLS] A [SEP], and [CLS] A [SEP] B [SEP]."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tok


def deberta_student(folder, name="A", **overrides):
    """A DeBERTa reward model over pair_tokenizer's vocabulary, with its tokenizer.json: a student folder."""
    hf = make_deberta(folder, name, vocab_size=len(SPECIALS + WORDS), **overrides)
    pair_tokenizer().save(os.path.join(folder, "tokenizer.json"))
    return hf


def test_pair_ids_and_the_truncation_rule():
    tok, cls, sep = pair_tokenizer(), 1, 2
    ids = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    prompt, response = "a b c d e f", "1 2 3"
    # Short enough: exactly the tokenizer's own pair encoding.
    assert data.pair_ids(tok, prompt, response, 64) == tok.encode(prompt, response).ids
    assert data.pair_ids(tok, prompt, response, 64) == [cls, *ids(prompt), sep, *ids(response), sep]
    # Too long: the response stays whole, the prompt loses its beginning, the row is max_len long.
    assert data.pair_ids(tok, prompt, response, 8) == [cls, *ids("e f"), sep, *ids(response), sep]
    # A response too long alone keeps its beginning, and no prompt token is left.
    assert data.pair_ids(tok, prompt, "1 2 3 4 5 6 7 8", 8) == [cls, sep, *ids("1 2 3 4 5"), sep]


def test_scorer_reads_the_pair_at_the_first_token(tmp_path):
    hf = deberta_student(str(tmp_path), max_position_embeddings=20)
    s = roles.load_scorer(str(tmp_path), "chatml")  # an encoder takes no format: whatever it is asked
    assert (s.fmt, s.eos) == ("pair", None)
    prompts = ["a b c", "1 2", "j i h g f e d c b a 9 8 7 6 5 4 3 2 1 0"]
    responses = ["d e", "3 4 5 6 7 8 9", "a b c"]
    got = s.score(prompts, responses, [True, False, True])
    tok = pair_tokenizer()
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = data.pair_ids(tok, p, r, 20)
        assert row[0] == 1 and len(row) <= 20 and tok.decode(row[row.index(2) + 1:-1]) == r
        ids = torch.tensor([row])
        assert (hf_rewards(hf, ids, torch.ones_like(ids))[0] - got[i]).abs() < 1e-4  # alone = in the padded batch
    # A response finished or not is the same pair to an encoder.
    assert torch.equal(s.score(prompts, responses, [False, True, False]), got)
    # Its prompt is cut to fit, so the context check exempts it (a decoder's 20 tokens would be too few).
    policy = SimpleNamespace(tok=tok, fmt="plain", model=SimpleNamespace(config=SimpleNamespace(max_positions=99)))
    data.check_lengths(policy, [s], prompts, 16)


# ---- Files and options: one line, before anything loads ------------------------------------------

def test_missing_tokenizer_json_and_pickled_weights_give_the_command(tmp_path):
    make_deberta(tmp_path, "A")
    (tmp_path / "spm.model").write_bytes(b"stand-in")
    with pytest.raises(FileNotFoundError) as e:
        check_folder(str(tmp_path))
    assert "spm.model" in str(e.value) and "AutoTokenizer" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{}")
    os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        check_folder(str(tmp_path))
    message = str(e.value)
    assert "pytorch_model.bin" in message and "t.DebertaV2ForSequenceClassification.from_pretrained" in message
    assert "\n" not in message


def test_student_format_with_an_encoder_student_is_refused(world, tmp_path, capsys):
    deberta_student(str(tmp_path / "deberta"))
    with pytest.raises(SystemExit) as e:
        tsalign.main(argv(world, tmp_path / "run", "--student", str(tmp_path / "deberta"),
                          "--student-format", "chatml"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("tsalign: error: --student-format:") and len(err.splitlines()) == 1


def test_encoder_tokenizer_without_pairs_is_refused(tmp_path):
    deberta_student(str(tmp_path))
    tok = pair_tokenizer()
    tok.post_processor = None
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no post-processor that builds pairs"):
        roles.load_scorer(str(tmp_path), "chatml")


# ---- TS-Align with a DeBERTa student -------------------------------------------------------------

def test_rounds_with_a_deberta_student_resume_and_load_in_transformers(world, tmp_path):
    """A decoder policy and teacher, a DeBERTa student (20 positions: too few for a decoder's prompt + 16 new
    tokens, so the truncation rule is used): pairs are mined, the student is trained with replay, saved, and
    the saved student loads in transformers and gives our rewards. A resumed run reloads it as an encoder."""
    student = str(tmp_path / "deberta")
    deberta_student(student, max_position_embeddings=20)
    out = tmp_path / "run"
    tsalign.main(argv(world, out, "--student", student, "--rounds", "1"))
    tsalign.main(["--resume", "--out", str(out), "--rounds", "2"])
    rows_ = metrics(out)
    assert [m["round"] for m in rows_] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["student_format"] == "pair"
    assert all(m["pairs"] > 0 and m["student_loss"] > 0 for m in rows_[1:]), "no pairs mined: nothing below is tested"
    before = load_model(student, "cpu").state_dict()
    saved = str(out / "round_2" / "student")
    after = load_model(saved, "cpu")
    assert max((after.state_dict()[k] - before[k]).abs().max() for k in before) > 1e-4  # it learned
    hf = tf.AutoModelForSequenceClassification.from_pretrained(saved, dtype=torch.float32).eval()
    pairs = [json.loads(line) for line in open(out / "round_2" / "pairs.jsonl")]
    tok = data.load_tokenizer(saved)  # its tokenizer was saved with it
    ids, mask = data.pad([data.pair_ids(tok, p["prompt"], p["chosen"], 20) for p in pairs], 0)
    with torch.no_grad():
        assert (after(ids, mask) - hf_rewards(hf, ids, mask)).abs().max() < 1e-4


def test_a_round_with_lora_on_a_deberta_student(world, tmp_path):
    student = str(tmp_path / "deberta")
    deberta_student(student, "B")
    out = tmp_path / "run"
    tsalign.main(argv(world, out, "--student", student, "--rounds", "1", "--student-lora-rank", "2"))
    assert metrics(out)[1]["pairs"] > 0
    before = load_model(student, "cpu").state_dict()
    after = load_model(str(out / "round_1" / "student"), "cpu").state_dict()
    changed = {k for k in before if (after[k] - before[k]).abs().max() > 1e-6}
    # The adapters were on the linear layers (merged on saving); embeddings and norms stayed frozen.
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.blocks.1.mlp.up.weight", "encoder.blocks.0.attn.pos_k.weight",
            "pooler.weight", "score.weight"} <= changed
    assert not {k for k in changed if "norm" in k or "emb" in k or "conv" in k}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_train_the_deberta_student_as_one(world, tmp_path):
    """Under torchrun (two gloo processes, with DDP, then with --fsdp) the student after a round equals one
    process's. Dropout off: with it each process draws its own masks, as data parallelism means it to."""
    student = str(tmp_path / "deberta")
    deberta_student(student, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    extra = ("--student", student, "--rounds", "1", "--sample-batch", "5", "--student-warmup", "0", "--device", "cpu")
    tsalign.main(argv(world, tmp_path / "one", *extra))
    one = load_model(str(tmp_path / "one" / "round_1" / "student"), "cpu").state_dict()
    start = load_model(student, "cpu").state_dict()
    assert metrics(tmp_path / "one")[1]["pairs"] > 0 and max((one[k] - start[k]).abs().max() for k in one) > 1e-3
    for name, fsdp in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "tsalign.py"), *argv(world, out, *extra), *fsdp]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert metrics(out)[1]["pairs"] == metrics(tmp_path / "one")[1]["pairs"], name
        two = load_model(str(out / "round_1" / "student"), "cpu").state_dict()
        for k in one:
            assert (one[k] - two[k]).abs().max() < 1e-4, (name, k)
