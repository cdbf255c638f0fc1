"""What a checkpoint the size of the paper's meets first: sharded saving, the paper's teacher (UltraRM's
LlamaRewardModel), sliding-window attention, and one-line errors for broken checkpoint files, found before
any model loads. Every comparison is with transformers or with the sequence alone."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import checkpoint as C
import data
import generate as G
import roles
import run
import tsalign
from conftest import VOCAB, argv, hf_load, make_checkpoint, uncached_greedy


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def ids_of(*shape, seed=0):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---- Sharded saving ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama_tied", "qwen2", "gpt2"])
def test_save_in_shards_past_a_size_limit(tmp_path, family):
    ours = C.load_model(make_checkpoint(tmp_path / "src", family))
    out = str(tmp_path / "out")
    C.save_model(ours, out, max_shard_size=30_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) >= 3 and "model.safetensors" not in files
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(files) and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())  # a tied weight once
    for f in files:  # no shard past the limit, but for a single tensor larger than it
        sizes = [t.numel() * 4 for t in load_file(os.path.join(out, f)).values()]
        assert sum(sizes) <= 30_000 or len(sizes) == 1
    ids = ids_of(2, 16)
    want = ours(ids)
    assert (AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits - want).abs().max() <= 1e-5
    assert torch.equal(C.load_model(out)(ids), want)
    C.save_model(ours, out)  # saved again in one file: no shard is left behind to shadow it
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]


# ---- The paper's teacher: UltraRM-13B's LlamaRewardModel -----------------------------------------

def ultrarm_like(tmp_path):
    """A tiny LlamaForSequenceClassification, and the same weights laid out as UltraRM's checkpoint is: its
    head named regression_head and its architecture LlamaRewardModel."""
    src = make_checkpoint(tmp_path / "rm", "llama", reward=True, seed=5)
    dst = str(tmp_path / "ultrarm")
    shutil.copytree(src, dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    sd["regression_head.weight"] = sd.pop("score.weight")
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["architectures"] = ["LlamaRewardModel"]
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return src, dst


@pytest.mark.parametrize("side", ["right", "left"])
def test_ultrarm_layout_loads_as_a_reward_model(tmp_path, side):
    src, dst = ultrarm_like(tmp_path)
    hf, ours = hf_load(src, reward=True), C.load_model(dst)
    assert ours.config.reward and ours.config.arch == "LlamaRewardModel"
    rows = [ids_of(1, n, seed=n)[0].tolist() for n in (7, 12, 4)]
    alone = [hf(torch.tensor([r])).logits[0, 0] for r in rows]  # transformers on each sequence alone
    ids, mask = data.pad(rows, 0, side=side)
    assert (ours(ids, mask) - torch.stack(alone)).abs().max() <= 1e-5
    C.save_model(ours, str(tmp_path / "again"))  # and it saves in its own layout
    assert "regression_head.weight" in load_file(str(tmp_path / "again" / "model.safetensors"))
    assert data.format_prompt("ultrarm", "Hi") == "Human: Hi\n\nAssistant: "


# ---- Sliding-window attention --------------------------------------------------------------------

WINDOWED = {"mistral": dict(sliding_window=4),
            "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None)}


@pytest.mark.parametrize("family", list(WINDOWED))
def test_sliding_window_equals_transformers(tmp_path, family):
    d = make_checkpoint(tmp_path / family, family, **WINDOWED[family])
    hf, ours = hf_load(d), C.load_model(d)
    assert ours.config.windows == ([4, 4] if family == "mistral" else [None, 4])
    ids = ids_of(2, 20)  # five windows long
    ref = hf(ids).logits
    assert (ours(ids) - ref).abs().max() <= 1e-4
    # Padded: each row equals the sequence alone (as in training batches and in sampling).
    rows = [ids[0, :20].tolist(), ids[1, :9].tolist()]
    for side in ("left", "right"):
        p, m = data.pad(rows, 0, side=side)
        got = ours(p, m)
        for i, r in enumerate(rows):
            cols = slice(0, len(r)) if side == "right" else slice(20 - len(r), 20)
            assert (got[i, cols] - hf(torch.tensor([r])).logits[0]).abs().max() <= 1e-4, (side, i)
    # Cached decoding, one prompt or K samples sharing it, equals a full forward each step.
    prompts = [ids[0, :6].tolist(), ids[1, :3].tolist()]
    out = G.generate(ours, prompts, 12)
    for p, o in zip(prompts, out):
        want, gaps = uncached_greedy(ours, p, 12)
        upto = next((t for t, g in enumerate(gaps) if g < 1e-5), 12)
        assert o[:upto] == want[:upto]
    assert G.generate(ours, prompts, 12, num_samples=3) == [o for o in out for _ in range(3)]


# ---- Broken checkpoints: one line naming the file, before anything loads -------------------------

def broken(tmp_path, how):
    d = str(tmp_path / "teacher")
    shutil.copytree(make_checkpoint(tmp_path / "good", "gpt2", reward=True, seed=3), d)
    weights = os.path.join(d, "model.safetensors")
    if how == "truncated":
        open(weights, "r+b").truncate(os.path.getsize(weights) - 100)
    elif how == "corrupt":
        open(weights, "wb").write(b"not a safetensors file at all")
    elif how == "bad index":
        json.dump({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}},
                  open(os.path.join(d, "model.safetensors.index.json"), "w"))
    elif how == "index names a tensor its file lacks":
        os.rename(weights, os.path.join(d, "model-00001-of-00001.safetensors"))
        json.dump({"weight_map": {"nope.weight": "model-00001-of-00001.safetensors"}},
                  open(os.path.join(d, "model.safetensors.index.json"), "w"))
    elif how == "unknown architecture":
        cfg = json.load(open(os.path.join(d, "config.json")))
        json.dump({**cfg, "architectures": ["T5ForConditionalGeneration"]}, open(os.path.join(d, "config.json"), "w"))
    elif how == "sentencepiece only":
        open(os.path.join(d, "tokenizer.model"), "wb").write(b"\x00")
    return d


PROBLEMS = {"truncated": r"model\.safetensors is truncated or corrupt \(.*incomplete metadata",
            "corrupt": r"model\.safetensors is truncated or corrupt",
            "bad index": r"weight file .*model-00001-of-00002\.safetensors does not exist",
            "index names a tensor its file lacks": r"does not contain tensor 'nope\.weight'",
            "unknown architecture": r"unsupported architectures \['T5ForConditionalGeneration'\]",
            "sentencepiece only": r"no tokenizer\.json in .*teacher; it has a sentencepiece tokenizer\.model: make "
                                  r"tokenizer\.json once with transformers"}


@pytest.mark.parametrize("how", list(PROBLEMS))
def test_a_broken_teacher_is_one_line_before_any_model_loads(world, tmp_path, capsys, monkeypatch, how):
    teacher = broken(tmp_path, how)
    if how != "sentencepiece only":
        data.load_tokenizer(world["teacher"]).save(os.path.join(teacher, "tokenizer.json"))
    loaded = []
    for module in (run, roles):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loaded.append(a) or pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as e:
        tsalign.main(argv(world, tmp_path / "run", "--teacher", teacher))
    assert e.value.code == 2 and not loaded
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tsalign: error: "), err
    assert re.search(PROBLEMS[how], err), err
