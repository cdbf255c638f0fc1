"""Hugging Face checkpoints in and out: config.json -> ModelConfig, safetensors <-> our weights.

A checkpoint folder holds config.json, the weights (model.safetensors, or shards and an index) and
the tokenizer files. Loading builds our model from config.json, never from a folder name, and
copies each tensor through one name table per layout, checking that none is missing, unexpected or
mis-shaped. Saving walks the table backwards, so transformers loads what we save.
"""
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from encoder import EncoderRewardModel, encoder_config
from model import CausalLM, ModelConfig, RewardModel, lora_delta

# ---- config.json -> ModelConfig ------------------------------------------------------------------

# architectures entry -> (family, is a reward model). A reward model is a *ForSequenceClassification
# checkpoint with one label: its `score` head gives one scalar per sequence.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False), "LlamaForSequenceClassification": ("llama", True),
    "MistralForCausalLM": ("mistral", False), "MistralForSequenceClassification": ("mistral", True),
    "Qwen2ForCausalLM": ("qwen2", False), "Qwen2ForSequenceClassification": ("qwen2", True),
    "Qwen3ForCausalLM": ("qwen3", False), "Qwen3ForSequenceClassification": ("qwen3", True),
    "GPT2LMHeadModel": ("gpt2", False), "GPT2ForSequenceClassification": ("gpt2", True),
    "LlamaRewardModel": ("llama", True),  # UltraRM-13B, the paper's teacher; head: regression_head
    "DebertaV2ForSequenceClassification": ("deberta-v2", True),  # the paper's student (encoder.py)
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def config_from_hf(hf, generation=None, source=None):
    """Our config from a config.json dict (transformers 4.x or 5.x) and generation_config.json."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"unsupported architectures {archs} in config.json; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    family, reward = ARCHITECTURES[arch]
    if reward:
        n_labels = hf.get("num_labels", len(hf.get("id2label") or {"0": 0}))
        if n_labels != 1:
            raise ValueError(f"{arch} with {n_labels} labels is not a reward model; "
                             "expected num_labels 1")
    # Stop ids: config.json's eos_token_id, plus generation_config.json's (instruct models such as
    # Llama-3 and Qwen2.5 keep their end-of-turn id only there).
    stops = list(dict.fromkeys(_as_list(hf.get("eos_token_id"))
                               + _as_list((generation or {}).get("eos_token_id"))))
    common = dict(arch=arch, family=family, reward=reward, vocab_size=hf["vocab_size"],
                  stop_token_ids=stops, bos_token_id=hf.get("bos_token_id"),
                  pad_token_id=hf.get("pad_token_id"), hf=hf, source=source)
    if family == "deberta-v2":
        return encoder_config(hf, common)
    if family == "gpt2":
        C = hf["n_embd"]
        return ModelConfig(**common, n_layer=hf["n_layer"], n_head=hf["n_head"],
                           n_kv_head=hf["n_head"], n_embd=C, head_dim=C // hf["n_head"],
                           n_inner=hf.get("n_inner") or 4 * C, max_positions=hf["n_positions"],
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           act=_activation(hf.get("activation_function", "gelu_new")), gpt2=True,
                           qkv_bias=True, o_bias=True, mlp_bias=True,
                           tie_embeddings=hf.get("tie_word_embeddings", True))
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    # RoPE: transformers 5.x writes rope_parameters {rope_type, rope_theta, ...}; 4.x writes
    # rope_theta at the top level and rope_scaling {type or rope_type, ...} (or null).
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope or dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope type {kind!r} in config.json; "
                         "supported: default, linear, llama3")
    attn_bias = hf.get("attention_bias", False)
    return ModelConfig(**common, n_layer=hf["num_hidden_layers"], n_head=H,
                       n_kv_head=hf.get("num_key_value_heads") or H, n_embd=C,
                       head_dim=hf.get("head_dim") or C // H, n_inner=hf["intermediate_size"],
                       max_positions=hf.get("max_position_embeddings", 2048),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), windows=sliding_windows(hf, family),
                       act=_activation(hf.get("hidden_act", "silu")),
                       qkv_bias=True if family == "qwen2" else attn_bias,
                       o_bias=False if family == "qwen2" else attn_bias,
                       mlp_bias=hf.get("mlp_bias", False), qk_norm=family == "qwen3",
                       tie_embeddings=hf.get("tie_word_embeddings", False), rope_theta=float(theta),
                       rope_scaling=None if kind == "default" else {**scaling, "rope_type": kind})


def sliding_windows(hf, family):
    """Per layer, its attention window (keys a query sees, itself included) or None; None: no layer
    slides. Mistral: `sliding_window` on every layer. Qwen2/3: with `use_sliding_window`, on the
    layers `layer_types` calls "sliding_attention", or else on those from `max_window_layers` on."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if family == "mistral" and window:
        return [window] * n
    if family not in ("qwen2", "qwen3") or not hf.get("use_sliding_window") or not window:
        return None
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", n) else "full_attention"
        for i in range(n)]
    windows = [window if t == "sliding_attention" else None for t in types]
    return windows if any(windows) else None


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} in config.json; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---- The name table: our module names -> Hugging Face's, one literal dict per layout -------------

# {i} is the layer index; a module's .weight and .bias map to the Hugging Face module's. A plain
# name is copied; ("T", name) is GPT-2's Conv1D, whose weight is stored transposed, (in, out);
# ("cat", names...) is our fused projection: stacked along the output dim on load, split by the
# module's `parts` on save. Modules a config lacks (biases, Qwen3's q/k norms) are not in our model.
LLAMA_NAMES = {  # Llama, Mistral, Qwen2, Qwen3
    "decoder.tok_emb": "model.embed_tokens",
    "decoder.blocks.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "decoder.blocks.{i}.attn.qkv": ("cat", "model.layers.{i}.self_attn.q_proj",
                                    "model.layers.{i}.self_attn.k_proj",
                                    "model.layers.{i}.self_attn.v_proj"),
    "decoder.blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
    "decoder.blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
    "decoder.blocks.{i}.attn.o": "model.layers.{i}.self_attn.o_proj",
    "decoder.blocks.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "decoder.blocks.{i}.mlp.gate_up": ("cat", "model.layers.{i}.mlp.gate_proj",
                                       "model.layers.{i}.mlp.up_proj"),
    "decoder.blocks.{i}.mlp.down": "model.layers.{i}.mlp.down_proj",
    "decoder.norm": "model.norm",
    "lm_head": "lm_head",
    "score": "score",
}
GPT2_NAMES = {
    "decoder.tok_emb": "transformer.wte",
    "decoder.pos_emb": "transformer.wpe",
    "decoder.blocks.{i}.attn_norm": "transformer.h.{i}.ln_1",
    "decoder.blocks.{i}.attn.qkv": ("T", "transformer.h.{i}.attn.c_attn"),  # q, k, v fused too
    "decoder.blocks.{i}.attn.o": ("T", "transformer.h.{i}.attn.c_proj"),
    "decoder.blocks.{i}.mlp_norm": "transformer.h.{i}.ln_2",
    "decoder.blocks.{i}.mlp.up": ("T", "transformer.h.{i}.mlp.c_fc"),
    "decoder.blocks.{i}.mlp.down": ("T", "transformer.h.{i}.mlp.c_proj"),
    "decoder.norm": "transformer.ln_f",
    "lm_head": "lm_head",
    "score": "score",
}
DEBERTA_NAMES = {  # DebertaV2ForSequenceClassification
    "encoder.tok_emb": "deberta.embeddings.word_embeddings",
    "encoder.pos_emb": "deberta.embeddings.position_embeddings",
    "encoder.emb_norm": "deberta.embeddings.LayerNorm",
    "encoder.blocks.{i}.attn.qkv": ("cat", "deberta.encoder.layer.{i}.attention.self.query_proj",
                                    "deberta.encoder.layer.{i}.attention.self.key_proj",
                                    "deberta.encoder.layer.{i}.attention.self.value_proj"),
    "encoder.blocks.{i}.attn.pos_k": "deberta.encoder.layer.{i}.attention.self.pos_key_proj",
    "encoder.blocks.{i}.attn.pos_q": "deberta.encoder.layer.{i}.attention.self.pos_query_proj",
    "encoder.blocks.{i}.attn.o": "deberta.encoder.layer.{i}.attention.output.dense",
    "encoder.blocks.{i}.attn_norm": "deberta.encoder.layer.{i}.attention.output.LayerNorm",
    "encoder.blocks.{i}.mlp.up": "deberta.encoder.layer.{i}.intermediate.dense",
    "encoder.blocks.{i}.mlp.down": "deberta.encoder.layer.{i}.output.dense",
    "encoder.blocks.{i}.mlp_norm": "deberta.encoder.layer.{i}.output.LayerNorm",
    "encoder.rel_emb": "deberta.encoder.rel_embeddings",
    "encoder.rel_norm": "deberta.encoder.LayerNorm",
    "encoder.conv": "deberta.encoder.conv.conv",
    "encoder.conv_norm": "deberta.encoder.conv.LayerNorm",
    "pooler": "pooler.dense",
    "score": "classifier",
}

# Not weights, but saved by some transformers versions: GPT-2's masks, RoPE tables, position ids.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq",
                    "embeddings.position_ids")


def hf_names(model):
    """Our parameter name -> (its Hugging Face tensor names, how: None (copy), "T" or "cat")."""
    table = {}
    cfg = model.config
    layout = LLAMA_NAMES
    if cfg.encoder:
        layout = DEBERTA_NAMES
    elif cfg.gpt2:
        layout = GPT2_NAMES
    for ours, theirs in layout.items():
        how, theirs = (None, [theirs]) if isinstance(theirs, str) else (theirs[0], theirs[1:])
        for i in range(model.config.n_layer) if "{i}" in ours else [None]:
            table[ours.format(i=i)] = ([t.format(i=i) for t in theirs], how)
    if model.config.arch == "LlamaRewardModel":  # UltraRM's own class names it regression_head
        table["score"] = (["regression_head"], None)
    modules = {name: name.rsplit(".", 1) for name in own_params(model)}  # (module, weight or bias)
    return {name: ([f"{t}.{suffix}" for t in table[m][0]], table[m][1])
            for name, (m, suffix) in modules.items()}


def own_params(m):
    """Our model's weights by name (LoRA adapters excluded; a tied output layer appears once)."""
    sd = m.state_dict()
    if m.config.tie_embeddings and not m.config.reward:
        sd.pop("lm_head.weight")
    return {k: v for k, v in sd.items() if ".lora_" not in k}


# ---- Loading -------------------------------------------------------------------------------------

def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def _weight_files(path, arch=None):
    """Hugging Face name -> the safetensors file holding it (one file, or shards and an index). Each
    header is read, so a missing, truncated or corrupt file, or an index naming a tensor its file
    lacks, is found before any tensor loads. arch: config.json's, for the conversion hint."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"weight index {index} has no weight_map")
        files = {k: os.path.join(path, f) for k, f in weight_map.items()}
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = {k: os.path.join(path, "model.safetensors")
                 for k in _tensor_names(os.path.join(path, "model.safetensors"))}
    else:
        pickled = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                   if os.path.exists(os.path.join(path, f))]
        hint = (f"; it has {pickled[0]}: convert it once with transformers, e.g. python -c "
                f"\"import transformers as t; t.{arch}.from_pretrained('{path}')"
                f".save_pretrained('{path}')\""
                if pickled and arch and arch != "LlamaRewardModel" else "")  # UltraRM: not in it
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                                f"{path}{hint}")
    held = {f: _tensor_names(f) for f in set(files.values())}
    for k, f in files.items():
        if k not in held[f]:
            raise ValueError(f"{f} does not contain tensor {k!r} (listed in its index)")
    return files


def _tensor_names(file):
    if not os.path.exists(file):
        raise FileNotFoundError(f"weight file {file} does not exist")
    try:
        with safe_open(file, framework="pt") as f:
            return set(f.keys())
    except Exception as e:  # safetensors' own error for a truncated or corrupt file
        raise ValueError(f"weight file {file} is truncated or corrupt "
                         f"({str(e).splitlines()[0]})") from None


def check_folder(path):
    """Check what loading needs, without loading a tensor: config.json (a supported model), every
    weight file's header, tokenizer.json. Returns its ModelConfig; errors name the file."""
    cfg = read_config(path)
    _weight_files(path, cfg.arch)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        spm = [f for f in ("tokenizer.model", "spm.model") if os.path.exists(os.path.join(path, f))]
        hint = (f"; it has a sentencepiece {spm[0]}: make tokenizer.json once with transformers, "
                f"e.g. python -c \"from transformers import AutoTokenizer as T; "
                f"T.from_pretrained('{path}').save_pretrained('{path}')\""
                if spm else "")
        raise FileNotFoundError(f"no tokenizer.json in {path}{hint}")
    return cfg


def default_dtype(hf, device):
    """float32 on CPU (bf16 matmuls are much slower there); the checkpoint's dtype elsewhere."""
    return (torch.float32 if device.type == "cpu"
            else getattr(torch, hf.get("dtype") or hf.get("torch_dtype") or "float32"))


def read_config(path):
    """The ModelConfig of a checkpoint folder, from its config.json (and generation_config.json)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face checkpoint folder")
    hf = _read_json(os.path.join(path, "config.json"), "config")
    gen_path = os.path.join(path, "generation_config.json")
    gen = _read_json(gen_path, "generation config") if os.path.exists(gen_path) else None
    try:
        return config_from_hf(hf, gen, source=os.path.abspath(path))
    except KeyError as e:
        raise ValueError(f"config.json in {path} lacks the key {e.args[0]!r}") from None


def is_encoder(path):
    """Whether the folder holds an encoder (a DeBERTa); False if unreadable (check_folder tells)."""
    try:
        return read_config(path).encoder
    except (OSError, ValueError, TypeError):
        return False


def load_model(path, device=None, dtype=None):
    """Load a Hugging Face checkpoint folder as a CausalLM or a RewardModel (eval mode)."""
    cfg = read_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(cfg.hf, device)
    with torch.device("meta"):  # no time spent on a random init that the checkpoint overwrites
        if cfg.encoder:
            model = EncoderRewardModel(cfg)
        elif cfg.reward:
            model = RewardModel(cfg)
        else:
            model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if not cfg.reward:
        model.tie_weights()  # to_empty makes a fresh tensor per module, so tie again
    load_weights(model, path)
    return model.eval()


def load_weights(model, path):
    """Copy each checkpoint weight into model; one missing, unexpected or mis-shaped is an error."""
    files = _weight_files(path, model.config.arch)
    names = hf_names(model)
    used, handles = set(), {}

    def read(name):
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f].get_tensor(name)

    with torch.no_grad():
        for name, param in own_params(model).items():
            theirs, how = names[name]
            for t in theirs:
                if t not in files:
                    raise ValueError(f"checkpoint {path} is missing tensor {t!r} (for {name})")
            ws = [read(t) for t in theirs]
            ws = [w.t() if how == "T" and w.dim() == 2 else w for w in ws]  # Conv1D: (in, out)
            parts = (model.get_submodule(name.rsplit(".", 1)[0]).parts if how == "cat"
                     else [param.shape[0]])
            for t, w, n in zip(theirs, ws, parts):
                if tuple(w.shape) != (n, *param.shape[1:]):
                    raise ValueError(f"tensor {t!r} in {path} has shape {tuple(w.shape)}, "
                                     f"expected {(n, *param.shape[1:])}")
            param.copy_(torch.cat(ws))  # "cat": the parts stacked along the output dim
            used.update(theirs)
    skip = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if model.config.encoder:  # absolute positions a DeBERTa does not use; transformers ignores them
        skip.add("deberta.embeddings.position_embeddings.weight")
    unexpected = [k for k in files
                  if k not in used and k not in skip and not k.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors this {model.config.arch} does not use: "
                         f"{unexpected[:5]}")


# ---- Saving, in the same Hugging Face format -----------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "spm.model", "added_tokens.json")


def hf_tensors(model):
    """(Hugging Face name, CPU tensor) pairs, in order, one at a time, LoRA merged, in the model's
    dtype. A sharded parameter (FSDP2's DTensor) is gathered: every process calls this in step."""
    for name, (theirs, how) in hf_names(model).items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        w = model.get_parameter(name).detach()
        w = w.full_tensor() if hasattr(w, "full_tensor") else w
        if name.endswith(".weight") and getattr(module, "lora_a", None) is not None:
            w = w + lora_delta(module)
        w = w.t() if how == "T" and w.dim() == 2 else w
        for t, part in zip(theirs, w.split(module.parts) if how == "cat" else [w]):
            yield t, part.contiguous().cpu()


def shard_plan(model, max_shard_size):
    """Which Hugging Face tensors go in which file: lists of names, filled in order up to
    max_shard_size bytes (a larger tensor gets a file of its own), planned from the shapes."""
    plan, size = [[]], 0
    for name, (theirs, how) in hf_names(model).items():
        p = model.get_parameter(name)
        nbytes = p.numel() * p.element_size()
        if how == "cat":  # a fused parameter: each part's share of its rows
            sizes = [nbytes // p.shape[0] * n
                     for n in model.get_submodule(name.rsplit(".", 1)[0]).parts]
        else:
            sizes = [nbytes]
        for t, t_bytes in zip(theirs, sizes):
            if plan[-1] and size + t_bytes > max_shard_size:
                plan.append([])
                size = 0
            plan[-1].append(t)
            size += t_bytes
    return plan


def save_model(model, path, max_shard_size=5 * 10**9):
    """Write config.json, the weights and the source's tokenizer files into path as transformers
    does: model.safetensors, or past max_shard_size bytes model-0000i-of-0000n.safetensors shards
    and an index; one shard (and tensor) at a time in memory. A sharded model: every process calls
    this (to gather), rank 0 writes, and raises its OSError (a full disk) after every gather."""
    tensors = hf_tensors(model)
    try:
        _save_model(model, path, max_shard_size, tensors)
    except OSError:
        for _ in tensors:  # the gathers the other processes are still in
            pass
        raise


def write_weights(tensors, file):
    """safetensors' save_file; a failed write raised as an OSError naming the file (safetensors
    says only "Error while serializing: I/O error: No space left on device (os error 28)")."""
    try:
        save_file(tensors, file, metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), file) from None


def _save_model(model, path, max_shard_size, tensors):
    cfg = model.config
    main = not dist.is_initialized() or dist.get_rank() == 0
    if not main and not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return  # a whole model: rank 0 has it all
    plan = shard_plan(model, max_shard_size)
    files = (["model.safetensors"] if len(plan) == 1
             else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    if main:
        os.makedirs(path, exist_ok=True)
        hf = dict(cfg.hf)
        hf["architectures"] = [cfg.arch]
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = dtype
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        # Old weights in the folder would shadow or mix with the new ones on load.
        for name in os.listdir(path):
            if (name == "model.safetensors.index.json"
                    or name.startswith("model") and name.endswith(".safetensors")):
                os.remove(os.path.join(path, name))
    shard, done, total = {}, 0, 0
    for name, t in tensors:
        shard[name] = t
        total += t.numel() * t.element_size()
        if name == plan[done][-1]:  # a shard is complete
            if main:
                write_weights(shard, os.path.join(path, files[done]))
            shard, done = {}, done + 1
    if main and len(plan) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: files[i] for i, names in enumerate(plan) for t in names}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if main and cfg.source and os.path.abspath(cfg.source) != os.path.abspath(path):
        for name in TOKENIZER_FILES:
            src = os.path.join(cfg.source, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(path, name))
