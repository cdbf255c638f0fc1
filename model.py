"""
The model: one hand-written decoder-only transformer for Hugging Face checkpoints' weights.

Five families share one code path, told apart by a few switches in `ModelConfig`:
  Llama (2/3, TinyLlama, SmolLM/SmolLM2), Mistral: RMSNorm, RoPE, SwiGLU, grouped-query attention
  Qwen2/Qwen2.5: the same, plus biases on the q/k/v projections
  Qwen3:         the same, plus an RMSNorm on each head of q and k (before RoPE)
  GPT-2:         LayerNorm, learned positions, GELU MLP (its fused q/k/v is split on load)
A causal LM (`CausalLM`) ends in the output layer, a reward model (`RewardModel`) in a scalar head
read at the last real token. A batch row may hold a prompt shared by G continuations ("branches",
see `visible`), computed once; positions count the real tokens on a token's path, so a padded or
shared row gives exactly what the sequence gives alone, and the projections and MLP see real tokens
only. The KV cache serves generate.py; checkpoint.py loads and saves; LoRA is at the end.

Shapes: B batch, T time (new tokens), S cache slots (keys), H query heads, Hkv key/value heads,
D head dim, C model dim, V vocab, K samples per prompt, M real tokens of a batch, G branches a row.
"""
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Config: built from a checkpoint's config.json by checkpoint.config_from_hf, never guessed

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
    windows: list | None = None   # per layer: sliding window or None (checkpoint.sliding_windows)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...}
    stop_token_ids: list = field(default_factory=list)  # every id that ends a response
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the raw config.json, kept for saving
    source: str | None = None     # the folder it was loaded from (saving copies its tokenizer)
    encoder: bool = False         # True in encoder.EncoderConfig: how shared code tells them apart


# ---- Building blocks -----------------------------------------------------------------------------

class Linear(nn.Linear):
    """nn.Linear that may fuse projections (`parts`: output sizes; q, k, v in one matmul) and have
    LoRA adapters (Hu et al. 2021), one a part as PEFT's: y = x W^T + b + s cat_j(x A_j^T B_j^T)."""

    def __init__(self, in_features, out_features, bias=True, parts=None):
        super().__init__(in_features, out_features, bias=bias)
        self.parts = tuple(parts or (out_features,))
        self.lora_a = self.lora_b = None  # then ParameterLists: (r, in), (out_j, r) per part

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_a is not None:
            low_rank = [x @ a.t() @ b.t() for a, b in zip(self.lora_a, self.lora_b)]
            y = y + torch.cat(low_rank, -1) * self.lora_scale
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # one call for six small ops, bit for bit the formula below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 (as the reference implementations do), scale in the model's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg, dim):
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.gpt2 else RMSNorm(dim, cfg.norm_eps)


def rope_inv_freq(cfg, device):
    """The RoPE frequencies (Su et al. 2021), with linear or Llama-3 scaling if the config asks."""
    D = cfg.head_dim
    exponent = torch.arange(0, D, 2, dtype=torch.float32, device=device) / D  # (D/2,)
    inv_freq = 1.0 / (cfg.rope_theta ** exponent)  # (D/2,)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, the band between blended.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg, pos, dtype):
    """cos and signed sin (its first half carries the minus) for positions pos (B, T) -> each
    (B, T, 1, D), in Hugging Face's half-split layout (pairs (i, i + D/2), not interleaved)."""
    freqs = pos[..., None].float() * rope_inv_freq(cfg, pos.device)  # (B, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return (torch.cat([cos, cos], -1)[:, :, None].to(dtype),
            torch.cat([-sin, sin], -1)[:, :, None].to(dtype))


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, D): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); a roll by D/2 and the
    signed sin give bit for bit x * cos + cat(-x2, x1) * sin, in three ops, not six."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg, window=None):
        super().__init__()
        C, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.cfg, self.window = cfg, window  # window: keys seen (itself included), or None
        self.qkv = Linear(C, (H + 2 * Hkv) * D, bias=cfg.qkv_bias, parts=(H * D, Hkv * D, Hkv * D))
        self.o = Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.norm_eps)
            self.k_norm = RMSNorm(D, cfg.norm_eps)

    def forward(self, x, rope, mask, grid, cache=None, layer=0):
        """x (M, C): the real tokens of a (B, T) grid, flattened (the projections see only them);
        grid (B, T, where) places them for attention (where: flat indices; None: all are real)."""
        cfg = self.cfg
        B, T, where = grid
        H, Hkv = cfg.n_head, cfg.n_kv_head
        qkv = self.qkv(x)                                        # (M, (H + 2 Hkv) D)
        if where is not None:                                    # zeros at padding (masked below)
            qkv = qkv.new_zeros(B * T, qkv.shape[1]).index_copy(0, where, qkv)
        qkv = qkv.view(B, T, H + 2 * Hkv, cfg.head_dim)          # (B, T, H + 2 Hkv, D): q, k, v
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qkv[:, :, :H]),
                            self.k_norm(qkv[:, :, H:H + Hkv])], 2)  # (B, T, H + Hkv, D)
        else:
            qk = qkv[:, :, :H + Hkv]
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotated in one go
        q, k, v = (qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2),
                   qkv[:, :, H + Hkv:].transpose(1, 2))  # (B, H, T, D), then (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, Hkv, S, D): every slot filled so far
        # enable_gqa lets each group of H/Hkv query heads read its key/value head without a copy.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and T > 1,
                                           enable_gqa=cfg.n_kv_head != cfg.n_head)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B * T, cfg.n_head * cfg.head_dim)  # (B*T, H*D)
        return self.o(y if where is None else y[where])  # (M, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, I = cfg.n_embd, cfg.n_inner
        self.act = {"silu": F.silu, "gelu": F.gelu,
                    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[cfg.act]
        self.gated = not cfg.gpt2
        if self.gated:  # SwiGLU (Shazeer 2020): down(act(gate(x)) * up(x)); gate, up: one matrix
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

    def forward(self, x, rope, mask, grid, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), rope, mask, grid, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# ---- Which keys a token sees: a prompt shared by G branches ------------------------------------
# A batch row holds one sequence, or a prompt and G continuations of it (the K samples of a prompt
# being decoded, the K responses the student scores, a DPO pair): the prompt is branch 0,
# continuation g branch g, and each token sees the real tokens before it on its own path (the
# prompt and its branch). The prompt is computed once, and each continuation gets exactly what it
# gets alone. Every forward (prefill, decoding, scoring, training) goes this way.

def visible(valid, branch, q_branch, T):
    """(B, T, S) bool: the real keys each of the last T query slots sees: at or before its slot, in
    the prefix (branch 0) or its own branch. valid, branch (B, S); q_branch (B, T)."""
    S = valid.shape[1]
    q_slot = torch.arange(S - T, S, device=valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=valid.device)[None, :]         # (1, S)
    on_path = (branch[:, None, :] == 0) | (branch[:, None, :] == q_branch[:, :, None])  # (B, T, S)
    return on_path & valid[:, None, :] & (k_slot <= q_slot)


def shares_prefix(model):
    """Whether model (perhaps inside DistributedDataParallel) computes a prefix shared by branches:
    our decoders do, as their attention is causal; an encoder reads whole rows and is given them."""
    return isinstance(getattr(model, "module", model), (CausalLM, RewardModel))


def sdpa_mask(see, dtype, pos=None, key_pos=None, window=None):
    """SDPA's additive mask (B, 1, T, S) from `visible`: 0 where a query sees a key, else -inf; with
    a window, no key `window` or more positions back (Mistral's and Qwen2's sliding window). A query
    always sees its own slot (a padding query gets a harmless row, not NaN). Built once per forward,
    not in every layer as SDPA would from a bool mask."""
    B, T, S = see.shape
    if window is not None:
        see = see & ((pos[:, :, None] - key_pos[:, None, :]) < window)
    see = see | (torch.arange(S, device=see.device)
                 == torch.arange(S - T, S, device=see.device)[:, None])  # its own slot
    mask = torch.zeros(B, 1, T, S, dtype=dtype, device=see.device)
    return mask.masked_fill_(~see[:, None], float("-inf"))


class KVCache:
    """Preallocated keys and values per layer, (B, Hkv, S, D) each: a forward of T tokens writes the
    next T slots of every row. Each slot records whether it is real, its branch and position, so a
    row holds a prompt (branch 0) and its samples, a slot per sample each step (see `visible`).
    `keep` drops finished rows and branches: stopped samples cost nothing."""

    def __init__(self, cfg, B, S, device, dtype):
        self.k = [torch.zeros(B, cfg.n_kv_head, S, cfg.head_dim, device=device, dtype=dtype)
                  for _ in range(cfg.n_layer)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # (B, S)
        self.branch = torch.zeros(B, S, dtype=torch.long, device=device)  # (B, S)
        self.pos = torch.zeros(B, S, dtype=torch.long, device=device)     # (B, S)
        self.filled = 0  # slots written so far (the same for every row)

    def write(self, layer, k, v):
        """Store this step's keys and values (B, Hkv, T, D); return all slots filled so far."""
        T = k.shape[2]
        self.k[layer].narrow(2, self.filled, T).copy_(k)
        self.v[layer].narrow(2, self.filled, T).copy_(v)
        return (self.k[layer].narrow(2, 0, self.filled + T),
                self.v[layer].narrow(2, 0, self.filled + T))

    def keep(self, rows, branches, room):
        """Keep rows (B',) and in each the branches still decoding: branches (B', n) maps each old
        branch to its new number (the prompt's 0 to 0; -1: drop its slots). The kept slots are
        copied together, in order, with `room` free slots after: a copy, so done now and then."""
        f = self.filled
        new_branch = branches.gather(1, self.branch[rows, :f])  # (B', f)
        keep = self.valid[rows, :f] & (new_branch >= 0)  # (B', f)
        n = keep.sum(1)  # (B',)
        S = int(n.max())
        # (B', S): the kept slots first
        slots = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :S]
        real = torch.arange(S, device=n.device) < n[:, None]  # (B', S)
        for i in range(len(self.k)):
            for kv in (self.k, self.v):
                old = kv[i][rows[:, None], :, slots]  # (B', S, Hkv, D)
                kv[i] = old.new_zeros(len(rows), old.shape[2], S + room, old.shape[3])
                kv[i][:, :, :S] = old.transpose(1, 2)
        self.valid = F.pad(real, (0, room))
        self.branch = F.pad(new_branch.gather(1, slots).clamp(min=0) * real, (0, room))
        self.pos = F.pad(self.pos[rows, :f].gather(1, slots) * real, (0, room))
        self.filled = S


# ---- The decoder and its two heads ---------------------------------------------------------------

class Decoder(nn.Module):
    """Token ids -> final hidden states (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.gpt2:
            self.pos_emb = nn.Embedding(cfg.max_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, (cfg.windows or [None] * cfg.n_layer)[i])
                                    for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.n_embd)

    def forward(self, input_ids, attention_mask=None, cache=None, branch=None):
        """attention_mask (B, T): 1 on real tokens (left or right padding); branch (B, T): each
        token's (see `visible`; None: a plain sequence per row); cache: a KVCache to extend."""
        B, T = input_ids.shape
        real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())
        plain = branch is None and (cache is None or cache.filled == 0) and bool(real.all())
        if branch is None:
            branch = torch.zeros_like(input_ids)
        valid, branches = real, branch  # (B, S) with S = T, without a cache
        if cache is not None:
            f = cache.filled
            cache.valid[:, f:f + T], cache.branch[:, f:f + T] = real, branch
            valid, branches = cache.valid[:, :f + T], cache.branch[:, :f + T]  # (B, S)
        windows = set(self.cfg.windows or ()) - {None}
        see = None if plain and not windows else visible(valid, branches, branch, T)  # (B, T, S)
        if plain:  # one all-real sequence per row: positions 0..T-1, SDPA's causal kernel, no mask
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
        else:  # positions count the real tokens on a token's path: padding, sharing change nothing
            pos = (see.sum(-1) - 1).clamp(min=0)  # (B, T)
        key_pos = pos
        if cache is not None:
            cache.pos[:, f:f + T] = pos
            key_pos = cache.pos[:, :f + T]
        dtype = self.tok_emb.weight.dtype
        full = plain or (T == 1 and bool(see.all()))  # a decode step seeing every slot: no mask
        masks = {None: None if full else sdpa_mask(see, dtype)}  # by window (None: no window)
        masks.update({w: sdpa_mask(see, dtype, pos, key_pos, w) for w in windows})
        # (M,): the real tokens
        where = None if bool(real.all()) else real.flatten().nonzero().squeeze(1)
        ids, pos_real = input_ids.flatten(), pos.flatten()
        if where is not None:
            ids, pos_real = ids[where], pos_real[where]
        x = self.tok_emb(ids)  # (M, C)
        if self.cfg.gpt2:
            x, rope = x + self.pos_emb(pos_real), None
        else:
            rope = rope_cos_sin(self.cfg, pos, dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, masks.get(block.attn.window), (B, T, where), cache, i)
        if cache is not None:
            cache.filled += T
        x = self.norm(x)  # (M, C)
        if where is not None:
            x = x.new_zeros(B * T, x.shape[1]).index_copy(0, where, x)
        return x.view(B, T, -1)  # (B, T, C), zeros at padding


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

    def hidden_states(self, input_ids, attention_mask=None, branch=None):
        return self.decoder(input_ids, attention_mask, branch=branch)  # (B, T, C)

    def logits(self, hidden):
        return self.lm_head(hidden)  # (..., C) -> (..., V)

    def forward(self, input_ids, attention_mask=None, select=None, cache=None, branch=None):
        """Logits (B, T, V); with select, only at those positions, (N, V): a (B, T) bool mask or
        (N,) flat indices into B*T (a position may repeat). Training needs the output layer, the
        largest matmul of a small model, only at response tokens; "last": (B, V), for sampling.
        cache: a KVCache to extend; branch: see `visible`."""
        h = self.decoder(input_ids, attention_mask, cache, branch)  # (B, T, C)
        if select is None:
            return self.logits(h)
        if isinstance(select, str):
            return self.logits(h[:, -1])
        return self.logits(h[select] if select.dtype == torch.bool else h.flatten(0, 1)[select])


class RewardModel(nn.Module):
    """A decoder with a scalar head: rm(ids, mask) -> rewards (B,) at each row's last real token."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.decoder = Decoder(cfg)
        self.score = Linear(cfg.n_embd, 1, bias=False)

    def forward(self, input_ids, attention_mask=None, branch=None, select=None):
        """select: (N,) flat indices into B*T of the tokens to read a reward at (rows packed with
        branches end at several tokens); None: each row's last real token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.decoder(input_ids, attention_mask, branch=branch)  # (B, T, C)
        if select is not None:
            return self.score(h.flatten(0, 1)[select]).squeeze(-1)  # (N,)
        # The last real token comes from the mask, never from `ids != pad_id`: pad may equal EOS,
        # and a finished response ends in EOS. Works for left and right padding alike.
        T = input_ids.shape[1]
        last = (attention_mask.long() * torch.arange(T, device=h.device)).argmax(1)  # (B,)
        return self.score(h[torch.arange(len(h), device=h.device), last]).squeeze(-1)  # (B,)


def add_reward_head(lm):
    """A new reward model with lm's decoder (copied) and a fresh scalar head; lm is unchanged."""
    cfg = lm.config
    arch = cfg.arch.replace("LMHeadModel", "ForSequenceClassification").replace(
        "ForCausalLM", "ForSequenceClassification")
    hf = {**cfg.hf, "architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"},
          "label2id": {"LABEL_0": 0}}
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
    return [m for n, m in model.named_modules()
            if isinstance(m, Linear) and n.endswith(LORA_TARGETS)]


def add_lora(model, rank, alpha=None):
    """Freeze the model and add trainable adapters: W x + (alpha / rank) B A x, B = 0 at first (the
    base model exactly until the first update). A reward model's fresh head stays trainable."""
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
