"""
The encoder: a hand-written DeBERTa-v2/v3 reward model (He et al. 2021, "DeBERTa: Decoding-enhanced
BERT with Disentangled Attention"), the kind of small student the paper uses (OpenAssistant's
reward-model-deberta-v3-large-v2, a DebertaV2ForSequenceClassification with one label).

Unlike model.py's decoders it reads the whole pair, [CLS] prompt [SEP] response [SEP]
(data.pair_ids), with no causal mask; its reward is a pooler and a one-output classifier on the
first token's final state. Right padding only: positions are slot indices.

What sets it apart is disentangled attention: a token is its content alone, and the distance
between two tokens has embeddings of its own. The score of query i for key j adds three terms
(He et al. 2021, eq. 4): content to content q_i.k_j, content to position q_i.pk_d (pk: the key
projection of the embedding of the distance d from i to j) and position to content k_j.pq_d, all
divided by sqrt(D * the number of terms). DeBERTa-v2 maps distances to log-spaced buckets: exact
up to half the buckets, then ever wider; v3 shares the content projections with the positions
(share_att_key). checkpoint.py loads and saves the weights; LoRA (model.add_lora) works here too.

Shapes: B batch, T time, H heads, D head dim, C model dim, I MLP hidden size, S the relative span
(there are 2S relative embeddings, for distances -S .. S-1).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear

ACTS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
        "tanh": torch.tanh, "silu": F.silu, "swish": F.silu}


@dataclass
class EncoderConfig:
    """Built from config.json by encoder_config, with transformers' defaults for missing keys."""
    arch: str                     # DebertaV2ForSequenceClassification
    family: str                   # deberta-v2
    reward: bool                  # always True: one output, the reward
    vocab_size: int
    n_layer: int
    n_head: int                   # H
    n_embd: int                   # C
    n_inner: int                  # I
    max_positions: int            # max_position_embeddings: longest pair (data.pair_ids cuts to it)
    norm_eps: float
    act: str = "gelu"             # the MLP's (hidden_act)
    pooler_act: str = "gelu"      # pooler_hidden_act
    abs_positions: bool = False   # position_biased_input: learned absolute positions are added
    c2p: bool = False             # pos_att_type holds c2p (content to position)
    p2c: bool = False             # pos_att_type holds p2c (position to content)
    relative: bool = False        # relative_attention: the c2p and p2c terms are computed
    buckets: int = 0              # position_buckets (0: distances are not bucketed)
    max_relative: int = 0         # max_relative_positions (max_position_embeddings when unset)
    share_att_key: bool = False   # the positions use the content q and k projections (v3)
    norm_rel: bool = False        # norm_rel_ebd layer_norm: a LayerNorm on the relative embeddings
    conv_kernel: int = 0          # conv_kernel_size: a convolution beside the first layer (0: none)
    conv_groups: int = 1
    conv_act: str = "tanh"
    dropout: float = 0.1          # hidden_dropout_prob (embeddings, layer outputs, relative ones)
    attn_dropout: float = 0.1     # attention_probs_dropout_prob
    pooler_dropout: float = 0.0
    cls_dropout: float = 0.1      # before the classifier (cls_dropout, else hidden_dropout_prob)
    stop_token_ids: list = field(default_factory=list)  # unused by an encoder; for shared checks
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the raw config.json, kept for saving
    source: str | None = None
    encoder: bool = True
    gpt2: bool = False
    tie_embeddings: bool = False

    @property
    def span(self):  # S
        return self.buckets if self.buckets > 0 else self.max_relative


# ---- config.json -> EncoderConfig ----------------------------------------------------------------

# DebertaV2Config's defaults, which transformers uses for a key config.json leaves out (the last
# row: keys its modules read with a default of their own).
DEBERTA_DEFAULTS = dict(
    hidden_size=1536, num_hidden_layers=24, num_attention_heads=24, intermediate_size=6144,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7, relative_attention=False,
    max_relative_positions=-1, pad_token_id=0, position_biased_input=True, pos_att_type=None,
    pooler_dropout=0.0, pooler_hidden_act="gelu", share_att_key=False, position_buckets=-1,
    norm_rel_ebd="none", conv_kernel_size=0, conv_groups=1, conv_act="tanh", cls_dropout=None)


def encoder_config(hf, common):
    """A DeBERTa-v2/v3 config.json as EncoderConfig; an error names a setting not implemented."""
    get = lambda k: hf.get(k, DEBERTA_DEFAULTS[k])  # noqa: E731
    C, H = get("hidden_size"), get("num_attention_heads")
    where = f"in config.json of {common['source']}" if common["source"] else "in config.json"

    def refuse(key, why):
        raise ValueError(f"{key} {hf.get(key)!r} {where}: {why}")

    for key, bad, why in [
            ("type_vocab_size", get("type_vocab_size") > 0,
             "token-type embeddings are not implemented (expected 0)"),
            ("embedding_size", hf.get("embedding_size", C) != C,
             f"only embeddings of hidden_size {C} are implemented"),
            ("attention_head_size", hf.get("attention_head_size", C // H) != C // H,
             f"expected hidden_size / heads"),
            ("pooler_hidden_size", hf.get("pooler_hidden_size", C) != C,
             f"expected hidden_size {C}"),
            ("conv_kernel_size", get("conv_kernel_size") % 2 == 0 and get("conv_kernel_size") > 0,
             "an even kernel is not implemented (transformers' own fails on it)")]:
        if bad:
            refuse(key, why)
    for key in ("hidden_act", "pooler_hidden_act", "conv_act"):
        if get(key) not in ACTS:
            refuse(key, f"unsupported activation; supported: {', '.join(ACTS)}")
    types = get("pos_att_type") or []
    types = [t.strip().lower() for t in (types.split("|") if isinstance(types, str) else types)]
    if set(types) - {"c2p", "p2c"}:
        refuse("pos_att_type", "only c2p and p2c are implemented")
    norm_rel = [t.strip() for t in (get("norm_rel_ebd") or "none").lower().split("|")]
    if set(norm_rel) - {"none", "layer_norm"}:
        refuse("norm_rel_ebd", "expected none or layer_norm")
    max_rel = get("max_relative_positions")
    cls_dropout = get("cls_dropout")
    return EncoderConfig(
        **{**common, "pad_token_id": get("pad_token_id")}, n_layer=get("num_hidden_layers"),
        n_head=H, n_embd=C, n_inner=get("intermediate_size"),
        max_positions=get("max_position_embeddings"), norm_eps=get("layer_norm_eps"),
        act=get("hidden_act"), pooler_act=get("pooler_hidden_act"),
        abs_positions=get("position_biased_input"), c2p="c2p" in types, p2c="p2c" in types,
        relative=get("relative_attention"), buckets=max(0, get("position_buckets")),
        max_relative=max_rel if max_rel >= 1 else get("max_position_embeddings"),
        share_att_key=get("share_att_key"), norm_rel="layer_norm" in norm_rel,
        conv_kernel=get("conv_kernel_size"), conv_groups=get("conv_groups"),
        conv_act=get("conv_act"), dropout=get("hidden_dropout_prob"),
        attn_dropout=get("attention_probs_dropout_prob"), pooler_dropout=get("pooler_dropout"),
        cls_dropout=get("hidden_dropout_prob") if cls_dropout is None else cls_dropout)


def log_buckets(rel, buckets, max_relative):
    """Relative distances -> bucketed distances (DeBERTa-v2): within half the buckets a distance is
    its own bucket; beyond, buckets widen geometrically so that max_relative lands on the last one.
    float32, as in transformers, so a distance on a bucket's edge lands where it lands there."""
    mid = buckets // 2
    far = rel.abs().clamp(min=mid)  # keeps log() finite; the near ones are kept as they are below
    ratio = torch.log(far / mid) / torch.log(torch.tensor((max_relative - 1) / mid)) * (mid - 1)
    return torch.where(rel.abs() <= mid, rel, rel.sign() * (mid + torch.ceil(ratio)).long())


def distance_rows(T, cfg, device):
    """(2T - 1,), never decreasing: for each distance d = i - j from 1 - T to T - 1, the row of the
    2S relative embeddings it reads (d, bucketed, plus S, clipped to the table)."""
    d = torch.arange(1 - T, T, device=device)
    if cfg.buckets > 0:
        d = log_buckets(d, cfg.buckets, cfg.max_relative)
    return (d + cfg.span).clamp(0, 2 * cfg.span - 1)


# ---- One layer: disentangled self-attention, then the MLP, each followed by add and LayerNorm ---

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.cfg, self.H, self.D = cfg, cfg.n_head, C // cfg.n_head
        self.qkv = Linear(C, 3 * C, parts=(C, C, C))  # query_proj, key_proj, value_proj as one
        if cfg.relative and not cfg.share_att_key:
            if cfg.c2p:
                self.pos_k = Linear(C, C)
            if cfg.p2c:
                self.pos_q = Linear(C, C)
        self.o = Linear(C, C)
        # The scale counts pos_att_type's terms even with relative_attention off, as transformers.
        self.scale = 1 / math.sqrt(self.D * (1 + cfg.c2p + cfg.p2c))

    def heads(self, x):  # (..., N, n C) -> (..., n H, N, D): n = 3 for q, k and v side by side
        return x.unflatten(-1, (-1, self.D)).transpose(-3, -2)

    def forward(self, x, keep, rel, rows, first=False):
        """x (B, T, C); keep (B, 1, 1, T): real keys, or None (no padding); rel (R, C): the relative
        embeddings that distance_rows picks (rows: (2T - 1,) into them), or None. first: only the
        first token's output, (B, 1, C); else (B, T, C)."""
        q, k, v = self.heads(self.qkv(x)).split(self.H, dim=1)  # (B, H, T, D) each
        if first:
            q = q[:, :, :1]  # (B, H, Tq = 1, D)
        mask = keep
        if rel is not None and (self.cfg.c2p or self.cfg.p2c):
            mask = self.relative_scores(q, k, rel, rows)  # (B, H, Tq, T), already scaled
            if keep is not None:
                mask = mask.masked_fill(~keep, float("-inf"))
        drop = self.cfg.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                           scale=self.scale)  # (B, H, Tq, D)
        return self.o(y.transpose(1, 2).flatten(2))  # (B, Tq, C)

    def relative_scores(self, q, k, rel, rows):
        """The c2p and p2c terms of queries q (B, H, Tq, D) (the first Tq tokens) and keys
        k (B, H, T, D), scaled: (B, H, Tq, T). Entry (i, j) depends on i - j alone, one of
        M = T + Tq - 1 distances, so each term is one product against the M distances' projected
        embeddings, (.., M) per query (or key), and a strided view of it: with the distances in
        order, entry (i, j) is one place on per step of j, and each next row M - 1 places on (the
        "skew" of Huang et al. 2018, Music Transformer), so nothing is gathered or copied."""
        cfg, (B, H, Tq, _), T = self.cfg, q.shape, k.shape[2]
        M = T + Tq - 1
        rel = F.dropout(rel, cfg.dropout, self.training)  # (R, C): projected once, not once per row
        if cfg.share_att_key:
            pq, pk, _ = self.heads(self.qkv(rel)).split(H, dim=0)  # (H, R, D) each
        else:
            pk = self.heads(self.pos_k(rel)) if cfg.c2p else None
            pq = self.heads(self.pos_q(rel)) if cfg.p2c else None
        scores = 0
        if cfg.c2p:  # query i's content against distance i - j's embedding: column Tq - 1 - i + j
            pk = pk[:, rows.flip(0)[T - Tq:]] * self.scale  # (H, M, D): distances Tq - 1 .. 1 - T
            a = q @ pk.transpose(-1, -2)                     # (B, H, Tq, M)
            scores = a.as_strided((B, H, Tq, T), (a.stride(0), a.stride(1), M - 1, 1),
                                  a.storage_offset() + Tq - 1)
        if cfg.p2c:  # key j's content against that distance's embedding: row j, col i - j + T - 1
            pq = pq[:, rows[:M]] * self.scale                # (H, M, D): distances 1 - T .. Tq - 1
            b = k @ pq.transpose(-1, -2)                     # (B, H, T, M)
            scores = scores + b.as_strided((B, H, Tq, T), (b.stride(0), b.stride(1), 1, M - 1),
                                           b.storage_offset() + T - 1)
        return scores.contiguous()


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up, self.down = Linear(cfg.n_embd, cfg.n_inner), Linear(cfg.n_inner, cfg.n_embd)
        self.act = ACTS[cfg.act]

    def forward(self, x):
        return self.down(self.act(self.up(x)))  # (B, T, C) -> (B, T, I) -> (B, T, C)


class Block(nn.Module):
    """Post-norm residual block (BERT's): x = norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.attn, self.attn_norm = Attention(cfg), nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp, self.mlp_norm = MLP(cfg), nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, x, keep, rel, rows, first=False):
        p, a = self.cfg.dropout, self.attn(x, keep, rel, rows, first)  # with first: (B, 1, C)
        x = self.attn_norm(x[:, :a.shape[1]] + F.dropout(a, p, self.training))
        return self.mlp_norm(x + F.dropout(self.mlp(x), p, self.training))


# ---- The encoder and the reward model ------------------------------------------------------------

class Encoder(nn.Module):
    """Token ids -> final hidden states (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        if cfg.abs_positions:
            self.pos_emb = nn.Embedding(cfg.max_positions, C)
        self.emb_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        if cfg.relative:
            self.rel_emb = nn.Embedding(2 * cfg.span, C)
            if cfg.norm_rel:
                self.rel_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        if cfg.conv_kernel:
            k = cfg.conv_kernel
            self.conv = nn.Conv1d(C, C, k, padding=(k - 1) // 2, groups=cfg.conv_groups)
            self.conv_norm = nn.LayerNorm(C, eps=cfg.norm_eps)

    def forward(self, input_ids, attention_mask, first=False):
        """Final states (B, T, C); first: the first token's (B, 1, C), all a reward reads, the last
        layer computing that row alone (its keys and values from every token)."""
        cfg, T, p = self.cfg, input_ids.shape[1], self.cfg.dropout
        real = attention_mask.bool()[..., None]  # (B, T, 1)
        x = self.tok_emb(input_ids)  # (B, T, C)
        if cfg.abs_positions:
            x = x + self.pos_emb(torch.arange(T, device=x.device))
        x = self.emb_norm(x) * real  # padding zeroed: the convolution reads its neighbours
        x = F.dropout(x, p, self.training)
        rel = rows = None
        if cfg.relative:  # the relative embeddings this length reads, normalised once for all
            rows = distance_rows(T, cfg, x.device)  # (2T - 1,)
            lo, hi = int(rows[0]), int(rows[-1])
            rel, rows = self.rel_emb.weight[lo:hi + 1], rows - lo  # (R, C), R = hi - lo + 1 <= 2S
            rel = self.rel_norm(rel) if cfg.norm_rel else rel
        # (B, 1, 1, T): a query sees every real key
        keep = None if real.all() else real.transpose(1, 2)[:, None]
        emb = x
        for i, block in enumerate(self.blocks):
            x = block(x, keep, rel, rows, first and i == cfg.n_layer - 1)
            if i == 0 and cfg.conv_kernel:
                x = self.convolve(emb, x, real, p)
        return x

    def convolve(self, emb, x, real, p):
        """DeBERTa-v2's convolution beside layer 1: on the embeddings, added to its output x."""
        c = self.conv(emb.transpose(1, 2)).transpose(1, 2) * real  # (B, T, C), nothing at padding
        c, real = c[:, :x.shape[1]], real[:, :x.shape[1]]  # x: the first row alone (1 layer)
        c = ACTS[self.cfg.conv_act](F.dropout(c, p, self.training))
        return self.conv_norm(x + c) * real


class EncoderRewardModel(nn.Module):
    """An encoder with a pooler and a scalar classifier: rm(ids, mask) -> rewards (B,), read at the
    first token ([CLS]). Rows are right-padded; padding does not change a row's reward."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.pooler = Linear(cfg.n_embd, cfg.n_embd)
        self.score = Linear(cfg.n_embd, 1)

    def forward(self, input_ids, attention_mask=None):
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.encoder(input_ids, attention_mask, first=True)[:, 0]  # (B, C)
        h = ACTS[cfg.pooler_act](self.pooler(F.dropout(h, cfg.pooler_dropout, self.training)))
        return self.score(F.dropout(h, cfg.cls_dropout, self.training)).squeeze(-1)  # (B,)
