"""
The model: one hand-written decoder-only transformer that loads Hugging Face checkpoints.

Five families share one code path, told apart by a few switches in `ModelConfig`:
  Llama (2/3, TinyLlama, SmolLM/SmolLM2) and Mistral: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention
  Qwen2/Qwen2.5: the same, plus biases on the q/k/v projections
  Qwen3:         the same, plus an RMSNorm on each head of q and k (before RoPE)
  GPT-2:         LayerNorm, learned positions, GELU MLP, one fused q/k/v Conv1D (split on load)

A causal LM (`CausalLM`) ends in the output layer; a reward model (`RewardModel`) ends in a scalar
`score` head read at the last real token of each sequence. Both sit on the same `Decoder`.

Positions always come from the attention mask, so a left-padded row gives exactly what the
sequence gives alone. Batched sampling uses a preallocated KV cache (`generate`).

Shapes: B batch, T time (new tokens this call), S cache slots (keys), H query heads,
Hkv key/value heads, D head dim, C model dim, V vocab, K samples per prompt.
"""
import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# Config: read from the checkpoint's config.json, never guessed

# architectures entry -> (family, is a reward model). A reward model is a *ForSequenceClassification
# checkpoint with one label: its `score` head gives one scalar per sequence.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False), "LlamaForSequenceClassification": ("llama", True),
    "MistralForCausalLM": ("mistral", False), "MistralForSequenceClassification": ("mistral", True),
    "Qwen2ForCausalLM": ("qwen2", False), "Qwen2ForSequenceClassification": ("qwen2", True),
    "Qwen3ForCausalLM": ("qwen3", False), "Qwen3ForSequenceClassification": ("qwen3", True),
    "GPT2LMHeadModel": ("gpt2", False), "GPT2ForSequenceClassification": ("gpt2", True),
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu"}


@dataclass
class ModelConfig:
    arch: str                     # the architectures entry of config.json, e.g. "Qwen2ForCausalLM"
    family: str                   # llama | mistral | qwen2 | qwen3 | gpt2
    reward: bool                  # True: scalar score head; False: output layer over the vocabulary
    vocab_size: int
    n_layer: int
    n_head: int                   # H
    n_kv_head: int                # Hkv (grouped-query attention when < H)
    n_embd: int                   # C
    head_dim: int                 # D (Qwen3 may have D != C / H)
    n_inner: int                  # MLP hidden size
    max_positions: int            # the longest sequence the model may see
    norm_eps: float
    act: str = "silu"             # silu | gelu_tanh | gelu
    gpt2: bool = False            # LayerNorm, learned positions, plain GELU MLP
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False         # Qwen3: RMSNorm over each head of q and k
    tie_embeddings: bool = False  # output layer shares the token embedding
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...}
    stop_token_ids: list = field(default_factory=list)  # every id that ends a response
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the raw config.json, kept for saving
    source: str | None = None     # the folder it was loaded from (tokenizer files are copied from it)


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def config_from_hf(hf, generation=None, source=None):
    """Build our config from a config.json dict (transformers 4.x or 5.x layout) and generation_config.json."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"unsupported architectures {archs} in config.json; supported: {', '.join(ARCHITECTURES)}")
    family, reward = ARCHITECTURES[arch]
    if reward:
        n_labels = hf.get("num_labels", len(hf.get("id2label") or {"0": 0}))
        if n_labels != 1:
            raise ValueError(f"{arch} with {n_labels} labels is not a reward model; expected num_labels 1")
    # Stop ids: config.json's eos_token_id, plus generation_config.json's (instruct models such as
    # Llama-3 and Qwen2.5 keep their end-of-turn id only there).
    stops = []
    for x in _as_list(hf.get("eos_token_id")) + _as_list((generation or {}).get("eos_token_id")):
        if x not in stops:
            stops.append(x)
    common = dict(arch=arch, family=family, reward=reward, vocab_size=hf["vocab_size"], stop_token_ids=stops,
                  bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id"), hf=hf, source=source)
    if family == "gpt2":
        C = hf["n_embd"]
        return ModelConfig(**common, n_layer=hf["n_layer"], n_head=hf["n_head"], n_kv_head=hf["n_head"],
                           n_embd=C, head_dim=C // hf["n_head"], n_inner=hf.get("n_inner") or 4 * C,
                           max_positions=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           act=_activation(hf.get("activation_function", "gelu_new")), gpt2=True,
                           qkv_bias=True, o_bias=True, mlp_bias=True,
                           tie_embeddings=hf.get("tie_word_embeddings", True))
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    # RoPE: transformers 5.x writes rope_parameters {rope_type, rope_theta, ...}; 4.x writes rope_theta at
    # the top level and rope_scaling {type or rope_type, ...} (or null).
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope or dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope type {kind!r} in config.json; supported: default, linear, llama3")
    max_pos = hf.get("max_position_embeddings", 2048)
    # Sliding-window attention is not implemented, so a model that uses it may only see sequences that
    # fit in one window, where it is exactly full attention.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", family == "mistral") else None
    if window:
        max_pos = min(max_pos, window)
    attn_bias = hf.get("attention_bias", False)
    return ModelConfig(**common, n_layer=hf["num_hidden_layers"], n_head=H,
                       n_kv_head=hf.get("num_key_value_heads") or H, n_embd=C,
                       head_dim=hf.get("head_dim") or C // H, n_inner=hf["intermediate_size"],
                       max_positions=max_pos, norm_eps=hf.get("rms_norm_eps", 1e-6),
                       act=_activation(hf.get("hidden_act", "silu")),
                       qkv_bias=True if family == "qwen2" else attn_bias,
                       o_bias=False if family == "qwen2" else attn_bias,
                       mlp_bias=hf.get("mlp_bias", False), qk_norm=family == "qwen3",
                       tie_embeddings=hf.get("tie_word_embeddings", False), rope_theta=float(theta),
                       rope_scaling=None if kind == "default" else {**scaling, "rope_type": kind})


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} in config.json; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# -----------------------------------------------------------------------------
# Building blocks

# Decoding multiplies a few rows (one per sequence) by each weight. For that, MKL's kernels are far from
# the memory bandwidth when called the way F.linear calls them (x W^T): on our 2-core AMD EPYC, asking for
# the transposed product W x^T instead was 1.2-2x faster from 2 to 256 rows (the output layer 1.7x at 64
# rows). A single row goes to MKL's matrix-vector kernel, which runs on one core; giving it two equal
# rows instead takes the matrix kernel on both cores, 1.2-1.5x faster for the larger weights. From a few
# hundred rows on (prefill, training) neither form wins consistently, so those keep F.linear.
# No weight is copied or re-laid out, so nothing can go stale after a weight update.
FEW_ROWS = 256


class Linear(nn.Linear):
    """nn.Linear with an optional low-rank adapter (LoRA, Hu et al. 2021): y = x W^T + b + s x A^T B^T."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("lora_a", None)  # (r, in) once added
        self.register_parameter("lora_b", None)  # (out, r), zero at the start so the adapter begins as a no-op

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if not 0 < rows <= FEW_ROWS:
            y = F.linear(x, self.weight, self.bias)
        else:  # see FEW_ROWS
            if rows == 1:
                y = (self.weight @ torch.cat([x, x]).view(2, -1).t())[:, 0]  # (out,): the first of 2 equal columns
            else:
                y = (self.weight @ x.reshape(rows, -1).t()).t().contiguous()  # (out, rows) -> (rows, out)
            y = y.view(*x.shape[:-1], -1)
            if self.bias is not None:
                y = y + self.bias
        if self.lora_a is not None:
            y = y + (x @ self.lora_a.t() @ self.lora_b.t()) * self.lora_scale
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # one call instead of six small ops, bit for bit the formula below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 (as the reference implementations do), scale in the model's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg, dim):
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.gpt2 else RMSNorm(dim, cfg.norm_eps)


def rope_inv_freq(cfg, device):
    """The RoPE frequencies (Su et al. 2021), with linear or Llama-3 scaling when the config asks."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))  # (D/2,)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg, pos, dtype):
    """cos and signed sin for integer positions pos (B, T) -> each (B, 1, T, D). Hugging Face's half-split
    layout (pairs are (i, i + D/2), not interleaved); the sin's first half carries the rotation's minus sign."""
    freqs = pos[..., None].float() * rope_inv_freq(cfg, pos.device)  # (B, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1)[:, None].to(dtype), torch.cat([-sin, sin], -1)[:, None].to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by its positions: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Rolling
    by D/2 swaps the halves, and the signed sin supplies the minus: bit for bit the reference's
    x * cos + cat(-x2, x1) * sin, in three ops instead of six (they add up at batch 1)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.cfg = cfg
        self.q = Linear(C, H * D, bias=cfg.qkv_bias)
        self.k = Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.v = Linear(C, Hkv * D, bias=cfg.qkv_bias)
        self.o = Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.norm_eps)
            self.k_norm = RMSNorm(D, cfg.norm_eps)

    def forward(self, x, rope, mask, cache=None, layer=0):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).view(B, T, cfg.n_head, cfg.head_dim)      # (B, T, H, D)
        k = self.k(x).view(B, T, cfg.n_kv_head, cfg.head_dim)   # (B, T, Hkv, D)
        v = self.v(x).view(B, T, cfg.n_kv_head, cfg.head_dim)   # (B, T, Hkv, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, Hkv, S, D): every slot filled so far
        # enable_gqa lets each group of H/Hkv query heads read its key/value head without copying it.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=cfg.n_kv_head != cfg.n_head)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)  # (B, T, H*D)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, I = cfg.n_embd, cfg.n_inner
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[cfg.act]
        self.gated = not cfg.gpt2
        if self.gated:  # SwiGLU (Shazeer 2020): down(act(gate(x)) * up(x))
            self.gate = Linear(C, I, bias=cfg.mlp_bias)
        self.up = Linear(C, I, bias=cfg.mlp_bias)
        self.down = Linear(I, C, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))  # (B, T, I)
        return self.down(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# The decoder, the two heads, and the KV cache

class KVCache:
    """Preallocated keys and values for every layer, (B, Hkv, S, D) each, written by slot index.

    All rows share the slot index (prompts are left-padded to one length); `valid` marks which slots
    hold real tokens and `next_pos` is each row's next position (its count of real tokens so far)."""

    def __init__(self, cfg, B, S, device, dtype):
        shape = (cfg.n_layer, B, cfg.n_kv_head, S, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # (B, S)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        self.filled = 0  # slots written so far (the same for every row)

    def write(self, layer, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.filled:self.filled + T] = k
        self.v[layer, :, :, self.filled:self.filled + T] = v
        return self.k[layer, :, :, :self.filled + T], self.v[layer, :, :, :self.filled + T]

    def repeat_rows(self, K):
        """Each row becomes K consecutive rows (one prefill serves K samples of the same prompt)."""
        self.k, self.v = self.k.repeat_interleave(K, 1), self.v.repeat_interleave(K, 1)
        self.valid = self.valid.repeat_interleave(K, 0)
        self.next_pos = self.next_pos.repeat_interleave(K, 0)


def attention_mask_4d(valid, T):
    """Which key slots each of the last T query slots may attend to: (B, 1, T, S) bool.

    A query sees real keys at or before its own slot. It also always sees itself, so a padding query
    (which has no real key) gets a harmless row instead of NaN; no real token ever attends to padding."""
    B, S = valid.shape
    q_slot = torch.arange(S - T, S, device=valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=valid.device)[None, :]         # (1, S)
    causal = k_slot <= q_slot                                      # (T, S)
    return ((causal & valid[:, None, :]) | (k_slot == q_slot))[:, None]  # (B, 1, T, S)


class Decoder(nn.Module):
    """Token ids -> final hidden states (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.gpt2:
            self.pos_emb = nn.Embedding(cfg.max_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.n_embd)

    def forward(self, input_ids, attention_mask=None, cache=None):
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()  # (B, T)
        if cache is None:
            valid = real
            pos = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, T): positions count real tokens only
        else:
            cache.valid[:, cache.filled:cache.filled + T] = real
            valid = cache.valid[:, :cache.filled + T]  # (B, S)
            pos = cache.next_pos[:, None] + (real.long().cumsum(1) - 1).clamp(min=0)
            cache.next_pos += real.long().sum(1)
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.cfg.gpt2:
            x, rope = x + self.pos_emb(pos), None
        else:
            rope = rope_cos_sin(self.cfg, pos, x.dtype)
        mask = attention_mask_4d(valid, T)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.filled += T
        return self.norm(x)


class CausalLM(nn.Module):
    """A decoder with an output layer: lm(ids, mask) -> logits (B, T, V)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.decoder = Decoder(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.decoder.tok_emb.weight

    def hidden_states(self, input_ids, attention_mask=None):
        return self.decoder(input_ids, attention_mask)  # (B, T, C)

    def logits(self, hidden):
        return self.lm_head(hidden)  # (..., C) -> (..., V)

    def forward(self, input_ids, attention_mask=None, select=None):
        """Logits (B, T, V); with select, a (B, T) bool mask, only at the selected positions, (N, V):
        the output layer is the largest matmul of a small model, and training needs it only where a
        response token is predicted."""
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, C)
        return self.logits(h if select is None else h[select])


class RewardModel(nn.Module):
    """A decoder with a scalar head: rm(ids, mask) -> rewards (B,), read at each row's last real token."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.decoder = Decoder(cfg)
        self.score = Linear(cfg.n_embd, 1, bias=False)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.decoder(input_ids, attention_mask)  # (B, T, C)
        # The last real token comes from the mask, never from `ids != pad_id`: pad may equal EOS, and a
        # finished response ends in EOS. Works for left and right padding alike.
        T = input_ids.shape[1]
        last = (attention_mask.long() * torch.arange(T, device=h.device)).argmax(1)  # (B,)
        return self.score(h[torch.arange(len(h), device=h.device), last]).squeeze(-1)  # (B,)


def add_reward_head(lm):
    """A new reward model with lm's decoder (copied) and a fresh scalar head; lm is left unchanged."""
    cfg = lm.config
    arch = cfg.arch.replace("LMHeadModel", "ForSequenceClassification").replace("ForCausalLM", "ForSequenceClassification")
    hf = {**cfg.hf, "architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    rm = RewardModel(replace(cfg, arch=arch, reward=True, hf=hf))
    p = next(lm.parameters())
    rm.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        rm.decoder.load_state_dict(lm.decoder.state_dict())
        nn.init.normal_(rm.score.weight, std=cfg.hf.get("initializer_range", 0.02))
    return rm


# -----------------------------------------------------------------------------
# Checkpoint names: one table from our parameter names to Hugging Face's

def name_table(cfg):
    """Our parameter name -> (Hugging Face name, how). how: None (copy), "T" (GPT-2's Conv1D stores
    weights transposed), or ("qkv", j) (slice j of GPT-2's fused c_attn, transposed)."""
    t = {}
    if cfg.gpt2:
        t["decoder.tok_emb.weight"] = ("transformer.wte.weight", None)
        t["decoder.pos_emb.weight"] = ("transformer.wpe.weight", None)
        t["decoder.norm.weight"] = ("transformer.ln_f.weight", None)
        t["decoder.norm.bias"] = ("transformer.ln_f.bias", None)
        for i in range(cfg.n_layer):
            ours, hf = f"decoder.blocks.{i}.", f"transformer.h.{i}."
            for j, n in enumerate("qkv"):
                t[ours + f"attn.{n}.weight"] = (hf + "attn.c_attn.weight", ("qkv", j))
                t[ours + f"attn.{n}.bias"] = (hf + "attn.c_attn.bias", ("qkv", j))
            for o, h, how in [("attn_norm", "ln_1", None), ("mlp_norm", "ln_2", None), ("attn.o", "attn.c_proj", "T"),
                              ("mlp.up", "mlp.c_fc", "T"), ("mlp.down", "mlp.c_proj", "T")]:
                t[ours + o + ".weight"] = (hf + h + ".weight", how)
                t[ours + o + ".bias"] = (hf + h + ".bias", None)
    else:
        t["decoder.tok_emb.weight"] = ("model.embed_tokens.weight", None)
        t["decoder.norm.weight"] = ("model.norm.weight", None)
        for i in range(cfg.n_layer):
            ours, hf = f"decoder.blocks.{i}.", f"model.layers.{i}."
            pairs = [("attn_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight"),
                     ("attn.q_norm.weight", "self_attn.q_norm.weight"), ("attn.k_norm.weight", "self_attn.k_norm.weight")]
            for o, h in [("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                         ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                         ("mlp.down", "mlp.down_proj")]:
                pairs += [(o + ".weight", h + ".weight"), (o + ".bias", h + ".bias")]
            for o, h in pairs:
                t[ours + o] = (hf + h, None)
    t["lm_head.weight"] = ("lm_head.weight", None)
    t["score.weight"] = ("score.weight", None)
    return t


def own_params(m):
    """Our model's weights by name (LoRA adapters excluded; a tied output layer appears once)."""
    sd = m.state_dict()
    if getattr(m.config, "tie_embeddings", False) and not m.config.reward:
        sd.pop("lm_head.weight")
    return {k: v for k, v in sd.items() if ".lora_" not in k}


# Saved by some transformers versions, but not weights: GPT-2's causal-mask buffers, cached RoPE tables.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# -----------------------------------------------------------------------------
# Loading

def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def _weight_files(path):
    """Hugging Face name -> the safetensors file holding it (one file, or shards listed by an index)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = {k: os.path.join(path, f) for k, f in _read_json(index, "weight index")["weight_map"].items()}
        for f in set(files.values()):
            if not os.path.exists(f):
                raise FileNotFoundError(f"weight shard {f} listed in {index} does not exist")
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def default_dtype(hf, device):
    """float32 on CPU (bf16 matmuls are hundreds of times slower there); the checkpoint's dtype elsewhere."""
    if device.type == "cpu":
        return torch.float32
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return getattr(torch, name)


def load_model(path, device=None, dtype=None):
    """Load a Hugging Face checkpoint folder as a CausalLM or a RewardModel (eval mode)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face checkpoint folder")
    hf = _read_json(os.path.join(path, "config.json"), "config")
    gen_path = os.path.join(path, "generation_config.json")
    gen = _read_json(gen_path, "generation config") if os.path.exists(gen_path) else None
    try:
        cfg = config_from_hf(hf, gen, source=os.path.abspath(path))
    except KeyError as e:
        raise ValueError(f"config.json in {path} lacks the key {e.args[0]!r}") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(hf, device)
    with torch.device("meta"):  # no time spent on a random init that the checkpoint overwrites
        model = (RewardModel if cfg.reward else CausalLM)(cfg)
    model = model.to_empty(device=device).to(dtype)
    if not cfg.reward:
        model.tie_weights()  # to_empty makes a fresh tensor per module, so tie again
    load_weights(model, path)
    return model.eval()


def load_weights(model, path):
    """Copy every weight from the checkpoint into model; any missing, unexpected or mis-shaped tensor is an error."""
    files = _weight_files(path)
    table = name_table(model.config)
    ours = own_params(model)
    used = set()
    handles = {}

    def read(name):
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        try:
            return handles[f].get_tensor(name)
        except Exception:  # an index that names a tensor its shard does not hold
            raise ValueError(f"{f} does not contain tensor {name!r}") from None

    with torch.no_grad():
        for name, param in ours.items():
            hf_name, how = table[name]
            if hf_name not in files:
                raise ValueError(f"checkpoint {path} is missing tensor {hf_name!r} (for {name})")
            w = read(hf_name)
            if how == "T":
                w = w.t()
            elif how is not None:  # ("qkv", j): GPT-2 fuses q, k, v along the output dim of a Conv1D
                w = w.chunk(3, dim=-1)[how[1]]
                w = w.t() if w.dim() == 2 else w
            if tuple(w.shape) != tuple(param.shape):
                raise ValueError(f"tensor {hf_name!r} in {path} has shape {tuple(w.shape)}, expected {tuple(param.shape)}")
            param.copy_(w)
            used.add(hf_name)
    skip = {"lm_head.weight"} if model.config.tie_embeddings else set()
    unexpected = [k for k in files if k not in used and k not in skip and not k.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors this {model.config.arch} does not use: {unexpected[:5]}")


# -----------------------------------------------------------------------------
# Saving, in the same Hugging Face format

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def hf_state_dict(model):
    """Our weights under Hugging Face names, LoRA merged in, in the model's dtype."""
    table = name_table(model.config)
    out, qkv = {}, {}
    for name, w in own_params(model).items():
        w = merged_weight(model.get_submodule(name.rsplit(".", 1)[0]), name, w).detach()
        hf_name, how = table[name]
        if how == "T":
            out[hf_name] = w.t()
        elif how is not None:
            qkv.setdefault(hf_name, [None] * 3)[how[1]] = w.t() if w.dim() == 2 else w
        else:
            out[hf_name] = w
    for hf_name, parts in qkv.items():
        out[hf_name] = torch.cat(parts, dim=-1)
    return {k: v.contiguous().cpu() for k, v in out.items()}


def save_model(model, path):
    """Write config.json, model.safetensors and the source checkpoint's tokenizer files into path."""
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    dtype = next(model.parameters()).dtype
    hf = dict(cfg.hf)
    hf["architectures"] = [cfg.arch]
    hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    # Old weights in the folder (a sharded checkpoint's index and shards) would shadow the new file on load.
    for name in os.listdir(path):
        if name == "model.safetensors.index.json" or (name.startswith("model-") and name.endswith(".safetensors")):
            os.remove(os.path.join(path, name))
    save_file(hf_state_dict(model), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if cfg.source and os.path.abspath(cfg.source) != os.path.abspath(path):
        for name in TOKENIZER_FILES:
            src = os.path.join(cfg.source, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(path, name))


# -----------------------------------------------------------------------------
# LoRA: low-rank adapters on the attention and MLP projections (Hu et al. 2021)

LORA_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def lora_layers(model):
    return [m for n, m in model.named_modules() if isinstance(m, Linear) and n.endswith(LORA_TARGETS)]


def add_lora(model, rank, alpha=None):
    """Freeze the model and add trainable adapters: W x + (alpha / rank) B A x, with B = 0 at the start,
    so the adapted model equals the base model exactly until the first update. A reward model's scalar
    head stays trainable (a fresh head must learn)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(alpha if alpha is not None else 2 * rank)
    model.requires_grad_(False)
    for lin in lora_layers(model):
        w = lin.weight
        lin.lora_a = nn.Parameter(torch.empty(rank, lin.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(lin.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        lin.lora_b = nn.Parameter(torch.zeros(lin.out_features, rank, device=w.device, dtype=w.dtype))
        lin.lora_scale = alpha / rank
    if isinstance(model, RewardModel):
        model.score.requires_grad_(True)
    return model


def merged_weight(lin, name, w):
    if name.endswith(".weight") and isinstance(lin, Linear) and lin.lora_a is not None:
        return w + (lin.lora_b @ lin.lora_a) * lin.lora_scale
    return w


def merge_lora(model):
    """Fold every adapter into its base weight (W += s B A), remove the adapters, unfreeze the model."""
    with torch.no_grad():
        for lin in lora_layers(model):
            if lin.lora_a is not None:
                lin.weight += (lin.lora_b @ lin.lora_a) * lin.lora_scale
                lin.lora_a = lin.lora_b = None
    model.requires_grad_(True)
    return model


# -----------------------------------------------------------------------------
# Sampling: a small pipeline on the last position's logits, and a batched loop with a KV cache

NUCLEUS_TRIES = 3  # top-p draws from the full distribution before a row falls back to a sort


def random_numbers(top_p):
    """How many random numbers a row's draw takes: one, or with top-p one per try plus the fallback's."""
    return 1 if top_p is None or top_p >= 1 else NUCLEUS_TRIES + 1


def sample_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None, u=None):
    """logits (B, V) -> next token ids (B,). Temperature 0 is argmax; otherwise temperature, then
    top-k, then top-p (the smallest set of most probable tokens whose probability reaches top_p; Holtzman
    et al. 2020), then a draw. u: the draw's random numbers in (0, 1], (B, random_numbers(top_p)); None
    draws them from generator."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1)      # (B, V)
    if u is None:
        u = 1.0 - torch.rand(len(probs), random_numbers(top_p), generator=generator, device=probs.device)
    u = u.to(cdf)
    tok = draw(cdf, u[:, 0])    # (B,)
    if top_p is None or top_p >= 1:
        return tok
    return nucleus(probs, cdf, tok, u, top_p)


def draw(cdf, u):
    """Inverse-CDF draw: the first token whose cumulative probability reaches u * total, (B,). With u in
    (0, 1], a token of probability zero is never drawn. One random number per row: torch.multinomial
    draws one per vocabulary entry (90-120 ms a step for 64 rows of 49152 here)."""
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(-1)


def in_nucleus(probs, tok, top_p):
    """Whether each row's token (B,) is in its top-p nucleus: the tokens ranked before it (more probable,
    or as probable with a lower id, as a stable sort ranks them) hold less than top_p of the mass."""
    p = probs.gather(-1, tok[:, None])  # (B, 1)
    ids = torch.arange(probs.shape[-1], device=probs.device)
    before = (probs > p) | ((probs == p) & (ids < tok[:, None]))  # (B, V)
    return torch.where(before, probs, 0.0).sum(-1) < top_p  # (B,)


def nucleus(probs, cdf, tok, u, top_p):
    """Top-p sampling without sorting the vocabulary (a sort of 64 x 49152 took ~150 ms a step here).

    Rejection sampling: draw from the full distribution and keep the draw if it is in the nucleus, else
    draw again; a kept draw follows the nucleus distribution exactly, and each try is kept with
    probability >= top_p. Rows still rejected after NUCLEUS_TRIES draw from the sorted nucleus with their
    last random number, which keeps the result exact."""
    tok, todo = tok.clone(), ~in_nucleus(probs, tok, top_p)  # (B,), (B,)
    for r in range(1, NUCLEUS_TRIES):
        rows = todo.nonzero().squeeze(-1)
        if len(rows) == 0:
            return tok
        t = draw(cdf[rows], u[rows, r])
        ok = in_nucleus(probs[rows], t, top_p)
        tok[rows[ok]] = t[ok]
        todo[rows[ok]] = False
    rows = todo.nonzero().squeeze(-1)
    if len(rows):
        p, order = probs[rows].sort(dim=-1, descending=True, stable=True)  # (R, V)
        c = p.cumsum(-1)
        kept = (c - p < top_p) & (p > 0)  # the mass before a token is below top_p
        tok[rows] = order.gather(-1, draw((p * kept).cumsum(-1), u[rows, -1])[:, None]).squeeze(-1)
    return tok


def _check_sampling(prompts, max_new_tokens, temperature, top_k, top_p, num_samples, max_positions):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts (lists of token ids)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_positions:
        raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                         f"context of {max_positions} positions")


@torch.no_grad()
def generate(lm, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
             generator=None, return_logprobs=False, num_samples=1):
    """Sample continuations of many prompts (lists of token ids, any lengths) in one batch.

    Returns the new token ids of each sequence (len(prompts) * num_samples lists, prompt-major: prompt
    i's samples at i*K .. i*K+K-1), each ending with its stop token if it stopped on one (so a list
    whose last id is not a stop id was truncated at max_new_tokens). With return_logprobs, also each
    new token's log-prob under the model (temperature 1, before top-k/top-p). eos_token_id: an id, a
    list of ids (e.g. lm.config.stop_token_ids) or None (never stop).

    generator: one torch.Generator for the whole batch, or a list with one CPU generator per prompt. With
    a list, each prompt's random numbers come from its own stream, drawn up front, so its samples do not
    depend on which other prompts share the batch (or, under torchrun, on which process samples it)."""
    cfg = lm.config
    _check_sampling(prompts, max_new_tokens, temperature, top_k, top_p, num_samples, cfg.max_positions)
    per_prompt = isinstance(generator, (list, tuple))
    if per_prompt and len(generator) != len(prompts):
        raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts; give one per prompt")
    stops = torch.tensor(_as_list(eos_token_id), dtype=torch.long)
    device = next(lm.parameters()).device
    # Left-pad the prompts to one length, so every row's next token lands in the same cache slot.
    Tp = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), Tp, dtype=torch.long)
    mask = torch.zeros(len(prompts), Tp, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.tensor(p)
        mask[i, Tp - len(p):] = 1
    ids, mask, stops = ids.to(device), mask.to(device), stops.to(device)
    cache = KVCache(cfg, len(prompts), Tp + max_new_tokens, device, next(lm.parameters()).dtype)
    logits = lm.logits(lm.decoder(ids, mask, cache)[:, -1])  # (B, V): the output layer on the last slot only
    if num_samples > 1:  # one prefill per prompt, then K rows of it
        cache.repeat_rows(num_samples)
        logits = logits.repeat_interleave(num_samples, 0)
    N = logits.shape[0]
    tokens = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
    logps = torch.zeros(N, max_new_tokens, device=device)
    length = torch.zeros(N, dtype=torch.long, device=device)  # new tokens kept per row
    done = torch.zeros(N, dtype=torch.bool, device=device)
    ones = torch.ones(N, 1, dtype=torch.long, device=device)
    u = None
    if per_prompt and temperature > 0:  # (N, max_new_tokens, n): row i*K+k is sample k of prompt i
        n = random_numbers(top_p)
        u = 1.0 - torch.cat([torch.rand(num_samples, max_new_tokens, n, generator=g) for g in generator]).to(device)
    for t in range(max_new_tokens):
        nxt = sample_token(logits, temperature, top_k, top_p, generator, None if u is None else u[:, t])  # (N,)
        tokens[:, t] = nxt
        if return_logprobs:
            logps[:, t] = logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        length += (~done).long()
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = lm.logits(lm.decoder(nxt[:, None], ones, cache)[:, -1])  # (N, V)
    length = length.tolist()
    out = [tokens[i, :length[i]].tolist() for i in range(N)]
    if return_logprobs:
        return out, [logps[i, :length[i]].tolist() for i in range(N)]
    return out
