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
    windows: list | None = None   # per layer: its sliding attention window, or None (see checkpoint.sliding_windows)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...}
    stop_token_ids: list = field(default_factory=list)  # every id that ends a response
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the raw config.json, kept for saving
    source: str | None = None     # the folder it was loaded from (tokenizer files are copied from it)
    encoder: bool = False         # always False here; encoder.EncoderConfig's is True (how shared code tells them apart)


# ---- Building blocks -----------------------------------------------------------------------------

class Linear(nn.Linear):
    """nn.Linear that may fuse several projections (`parts`: their output sizes; q, k and v in one matrix is one
    matrix product instead of three), with optional low-rank adapters (LoRA, Hu et al. 2021), one per part as
    PEFT has one per projection: y = x W^T + b + s cat_j(x A_j^T B_j^T)."""

    def __init__(self, in_features, out_features, bias=True, parts=None):
        super().__init__(in_features, out_features, bias=bias)
        self.parts = tuple(parts or (out_features,))
        self.lora_a = self.lora_b = None  # once added: ParameterLists of (r, in) and (out_j, r), one per part

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_a is not None:
            y = y + torch.cat([x @ a.t() @ b.t() for a, b in zip(self.lora_a, self.lora_b)], -1) * self.lora_scale
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
    """cos and signed sin for integer positions pos (B, T) -> each (B, T, 1, D). Hugging Face's half-split
    layout (pairs are (i, i + D/2), not interleaved); the sin's first half carries the rotation's minus sign."""
    freqs = pos[..., None].float() * rope_inv_freq(cfg, pos.device)  # (B, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1)[:, :, None].to(dtype), torch.cat([-sin, sin], -1)[:, :, None].to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, D): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). A roll by D/2 swaps the halves
    and the signed sin gives the minus: bit for bit x * cos + cat(-x2, x1) * sin, in three ops, not six."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg, window=None):
        super().__init__()
        C, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.cfg, self.window = cfg, window  # window: sliding-window size (keys seen, itself included) or None
        self.qkv = Linear(C, (H + 2 * Hkv) * D, bias=cfg.qkv_bias, parts=(H * D, Hkv * D, Hkv * D))
        self.o = Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.norm_eps)
            self.k_norm = RMSNorm(D, cfg.norm_eps)

    def forward(self, x, rope, mask, cache=None, layer=0):
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv = cfg.n_head, cfg.n_kv_head
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, cfg.head_dim)  # (B, T, H + 2 Hkv, D): q, k, v heads side by side
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qkv[:, :, :H]), self.k_norm(qkv[:, :, H:H + Hkv])], 2)  # (B, T, H + Hkv, D)
        else:
            qk = qkv[:, :, :H + Hkv]
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotated in one go
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv:].transpose(1, 2)
        if cache is not None and cache.prefix is not None:  # K samples of each prompt: see KVCache
            y = cache.attend(layer, q, k, v, self.window)
        else:
            if cache is not None:
                k, v = cache.write(layer, k, v)  # (B, Hkv, S, D): every slot filled so far
            # enable_gqa lets each group of H/Hkv query heads read its key/value head without copying it.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=cfg.n_kv_head != cfg.n_head)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)  # (B, T, H*D)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, I = cfg.n_embd, cfg.n_inner
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[cfg.act]
        self.gated = not cfg.gpt2
        if self.gated:  # SwiGLU (Shazeer 2020): down(act(gate(x)) * up(x)), gate and up in one matrix
            self.gate_up = Linear(C, 2 * I, bias=cfg.mlp_bias, parts=(I, I))
        else:
            self.up = Linear(C, I, bias=cfg.mlp_bias)
        self.down = Linear(I, C, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, I) each
            return self.down(self.act(gate) * up)
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, window=None):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg, window)
        self.mlp_norm = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# ---- The decoder, the two heads, and the KV cache ------------------------------------------------

class KVCache:
    """Preallocated keys and values for every layer, (B, Hkv, S, D) each, written by slot index. All rows
    share the slot index (prompts are left-padded to one length); `valid` marks the slots holding real
    tokens, and `next_pos` is each row's next position (its count of real tokens so far).

    For K samples of each prompt, `share_prefix` keeps the prompts' keys and values once, as a prefix that
    the K rows of a prompt all read, and gives every row fresh slots for its own new tokens: the prompt is
    stored and read once instead of K times (most of what attention reads, when prompts are long)."""

    def __init__(self, cfg, B, S, device, dtype):
        self.k = [torch.zeros(B, cfg.n_kv_head, S, cfg.head_dim, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # (B, S)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        self.filled = 0      # slots written so far (the same for every row)
        self.prefix = None   # after share_prefix: the prompts' (keys, values) per layer and their valid slots

    def write(self, layer, k, v):
        """Store this step's keys and values (B, Hkv, T, D); return every row's slots filled so far."""
        T = k.shape[2]
        self.k[layer].narrow(2, self.filled, T).copy_(k)
        self.v[layer].narrow(2, self.filled, T).copy_(v)
        return self.k[layer].narrow(2, 0, self.filled + T), self.v[layer].narrow(2, 0, self.filled + T)

    def share_prefix(self, K, S):
        """After the prefill of B prompts: they become the shared prefix of B * K rows (prompt b's samples are
        rows b*K .. b*K+K-1), each with S fresh slots."""
        B, Hkv, _, D = self.k[0].shape
        self.prefix = ([k.narrow(2, 0, self.filled) for k in self.k], [v.narrow(2, 0, self.filled) for v in self.v],
                       self.valid[:, :self.filled], K)
        self.k = [k.new_zeros(B * K, Hkv, S, D) for k in self.k]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.valid = self.valid.new_zeros(B * K, S)
        self.next_pos = self.next_pos.repeat_interleave(K, 0)
        self.filled = 0

    def attend(self, layer, q, k, v, window=None):
        """Attention of q (N, H, 1, D) over the shared prefix and each row's own keys: one softmax over both.
        The K rows of a prompt read its prefix as K groups of query heads, so the prefix is never copied.
        window: a sliding window (no key `window` or more positions back), or None."""
        k, v = self.write(layer, k, v)                                    # (N, Hkv, t, D): the rows' own
        k_pre, v_pre, valid_pre, K = self.prefix[0][layer], self.prefix[1][layer], self.prefix[2], self.prefix[3]
        N, H, _, D = q.shape
        B, Hkv, Tp, _ = k_pre.shape
        G = H // Hkv                                                      # query heads per key/value head
        q = q.reshape(N, Hkv, G, D) * D ** -0.5
        by_prompt = q.view(B, K, Hkv, G, D).transpose(1, 2).reshape(B, Hkv, K * G, D)
        s_pre = (by_prompt @ k_pre.transpose(2, 3)).masked_fill(~valid_pre[:, None, None], float("-inf"))
        s_pre = s_pre.view(B, Hkv, K, G, Tp).transpose(1, 2).reshape(N, Hkv, G, Tp)  # (N, Hkv, G, Tp)
        s_new = q @ k.transpose(2, 3)                                     # (N, Hkv, G, t)
        if window is not None:  # positions: the query's, the prompt's keys', then the row's own keys'
            q_pos = self.next_pos[:, None] - 1                            # (N, 1)
            pre_pos = (valid_pre.long().cumsum(1) - 1).repeat_interleave(K, 0)                # (N, Tp)
            new_pos = valid_pre.sum(1).repeat_interleave(K)[:, None] + torch.arange(k.shape[2], device=q.device)
            s_pre = s_pre.masked_fill((q_pos - pre_pos >= window)[:, None, None], float("-inf"))
            s_new = s_new.masked_fill((q_pos - new_pos >= window)[:, None, None], float("-inf"))
        p = torch.cat([s_pre, s_new], -1).softmax(-1)                     # (N, Hkv, G, Tp + t)
        p_pre = p[..., :Tp].reshape(B, K, Hkv, G, Tp).transpose(1, 2).reshape(B, Hkv, K * G, Tp)
        y_pre = (p_pre @ v_pre).view(B, Hkv, K, G, D).transpose(1, 2).reshape(N, Hkv, G, D)
        return (y_pre + p[..., Tp:] @ v).reshape(N, H, 1, D)


def attention_mask_4d(valid, T):
    """Which key slots each of the last T query slots may attend to, (B, 1, T, S) bool: real keys at or
    before its own slot, and always itself, so a padding query gets a harmless row instead of NaN."""
    B, S = valid.shape
    q_slot = torch.arange(S - T, S, device=valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=valid.device)[None, :]         # (1, S)
    causal = k_slot <= q_slot                                      # (T, S)
    return ((causal & valid[:, None, :]) | (k_slot == q_slot))[:, None]  # (B, 1, T, S)


def window_mask(valid, pos, T, window):
    """attention_mask_4d, and no key `window` or more positions before the query (sliding-window attention,
    as Mistral and Qwen2 define it). Positions count real tokens, so left padding changes nothing."""
    key_pos = valid.long().cumsum(1) - 1                     # (B, S)
    near = (pos[:, :, None] - key_pos[:, None, :]) < window  # (B, T, S)
    return attention_mask_4d(valid, T) & near[:, None]       # (B, 1, T, S)


class Decoder(nn.Module):
    """Token ids -> final hidden states (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.gpt2:
            self.pos_emb = nn.Embedding(cfg.max_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, (cfg.windows or [None] * cfg.n_layer)[i]) for i in range(cfg.n_layer))
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
        # With no padding (one sequence, or one being decoded), SDPA's own causal kernel needs no mask.
        full = bool(valid.all()) and (cache is None or cache.filled == 0 or T == 1)
        masks = {None: None if full else attention_mask_4d(valid, T)}  # by window (None: no sliding window)
        if cache is None or cache.prefix is None:  # (with a shared prefix, KVCache.attend applies windows itself)
            masks.update({w: window_mask(valid, pos, T, w) for w in set(self.cfg.windows or ()) - {None}})
        for i, block in enumerate(self.blocks):
            x = block(x, rope, masks.get(block.attn.window), cache, i)
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

    def forward(self, input_ids, attention_mask=None, select=None, cache=None):
        """Logits (B, T, V); with select, a (B, T) bool mask, only at the selected positions, (N, V): the
        output layer is the largest matmul of a small model, and training needs it only at response tokens;
        select="last": the last position's, (B, V), what sampling needs. cache: a KVCache to extend."""
        h = self.decoder(input_ids, attention_mask, cache)  # (B, T, C)
        return self.logits(h if select is None else h[:, -1] if isinstance(select, str) else h[select])


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

LORA_TARGETS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.up", "mlp.down",
                "attn.pos_q", "attn.pos_k", "pooler")  # the last three: encoder.py's


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
        kw = dict(device=lin.weight.device, dtype=lin.weight.dtype)
        lin.lora_a = nn.ParameterList(torch.empty(rank, lin.in_features, **kw) for _ in lin.parts)
        for a in lin.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        lin.lora_b = nn.ParameterList(torch.zeros(n, rank, **kw) for n in lin.parts)
        lin.lora_scale = alpha / rank
    if model.config.reward:
        model.score.requires_grad_(True)
    return model


def lora_delta(lin):
    """What lin's adapters add to its weight: s cat_j(B_j A_j), (out, in)."""
    return torch.cat([b @ a for a, b in zip(lin.lora_a, lin.lora_b)]) * lin.lora_scale


def merge_lora(model):
    """Fold every adapter into its base weight, remove the adapters, unfreeze the model."""
    with torch.no_grad():
        for lin in lora_layers(model):
            if lin.lora_a is not None:
                lin.weight += lora_delta(lin)
                lin.lora_a = lin.lora_b = None
    model.requires_grad_(True)
    return model
