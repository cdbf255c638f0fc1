"""
The model: one hand-written decoder-only transformer for Hugging Face checkpoints' weights.

Five families share one code path, told apart by a few switches in `ModelConfig`:
  Llama (2/3, TinyLlama, SmolLM/SmolLM2) and Mistral: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention
  Qwen2/Qwen2.5: the same, plus biases on the q/k/v projections
  Qwen3:         the same, plus an RMSNorm on each head of q and k (before RoPE)
  GPT-2:         LayerNorm, learned positions, GELU MLP (its fused q/k/v is split on load)
A causal LM (`CausalLM`) ends in the output layer, a reward model (`RewardModel`) in a scalar head read at
the last real token. Positions come from the attention mask, so a left-padded row gives exactly what the
sequence gives alone. The KV cache serves generate.py; checkpoint.py loads and saves; LoRA is at the end.

Shapes: B batch, T time (new tokens this call), S cache slots (keys), H query heads,
Hkv key/value heads, D head dim, C model dim, V vocab, K samples per prompt.
"""
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Config: built from a checkpoint's config.json by checkpoint.config_from_hf, never guessed ----

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


# ---- Building blocks -----------------------------------------------------------------------------

# Decoding multiplies a few rows by each weight: on a 2-core AMD EPYC, W x^T was 1.2-2x faster than F.linear's
# x W^T from 2 to 256 rows, and one row passed as two took MKL's matrix kernel on both cores. No weight is
# copied, so nothing can go stale after an update.
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
    """Rotate x (B, H, T, D): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). A roll by D/2 swaps the halves
    and the signed sin gives the minus: bit for bit x * cos + cat(-x2, x1) * sin, in three ops, not six."""
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


# ---- The decoder, the two heads, and the KV cache ------------------------------------------------

class KVCache:
    """Preallocated keys and values for every layer, (B, Hkv, S, D) each, written by slot index. All rows
    share the slot index (prompts are left-padded to one length); `valid` marks the slots holding real
    tokens, and `next_pos` is each row's next position (its count of real tokens so far)."""

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
    """Which key slots each of the last T query slots may attend to, (B, 1, T, S) bool: real keys at or
    before its own slot, and always itself, so a padding query gets a harmless row instead of NaN."""
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
        """Logits (B, T, V); with select, a (B, T) bool mask, only at the selected positions, (N, V): the
        output layer is the largest matmul of a small model, and training needs it only at response tokens."""
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


# ---- LoRA: low-rank adapters on the attention and MLP projections (Hu et al. 2021) ---------------

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
