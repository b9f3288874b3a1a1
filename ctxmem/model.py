"""A decoder-only Transformer whose key/value cache stores keys *before* rotation.

Shapes: B batch, T new tokens, P cached (past) slots, S = P + T slots, H query heads,
Hkv key/value heads, D head_dim, V vocab.

Keys are rotated at attention time with positions derived from the slot mask (position of a slot =
number of valid slots before it in its row). That one rule gives the StreamingLLM sink cache its
cache-relative positions (Xiao et al. 2023, §3.2: "positions within the cache"), makes left padding
transparent, and lets eviction be a plain gather of slots.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (B, Hkv, S, D) keys before rotation, values


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 whatever the activation dtype, as Llama does, so bf16 stays stable
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, S) -> cos, sin (B, 1, S, D) in fp32, half-split layout (as Hugging Face Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(d, d, bias=cfg.bias)
        self.wk = nn.Linear(d, kv, bias=cfg.bias)
        self.wv = nn.Linear(d, kv, bias=cfg.bias)
        self.wo = nn.Linear(d, d, bias=cfg.bias)  # the output projection Wᴼ
        if cfg.sink == "learned":  # one logit per head in every softmax denominator, value zero
            self.head_sink = nn.Parameter(torch.zeros(cfg.n_heads))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...] | None,
                allowed: torch.Tensor | None, past: KV | None,
                sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, KV]:
        """rope: (q_cos, q_sin, k_cos, k_sin), computed once per forward for all layers.
        allowed: None (plain causal) or (B, 1, T, S) bool. sink: None, or (s_cos, s_sin, sink_keys):
        the query rotated a second time (B, 1, T, D) for scoring the slots flagged in sink_keys
        (B, S) - attention sinks seen at the distance decoding gives them (see ctxmem.layout)."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, Hkv, S, D), still unrotated
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        q_plain = q
        if rope is not None:
            q = apply_rope(q, rope[0], rope[1])
            k = apply_rope(k, rope[2], rope[3])
        rep = cfg.n_heads // cfg.n_kv_heads
        if rep > 1:  # grouped-query attention: query head h reads key/value head h // rep
            S = k.shape[2]
            k = k[:, :, None].expand(B, cfg.n_kv_heads, rep, S, cfg.head_dim).reshape(B, cfg.n_heads, S, cfg.head_dim)
            v = v[:, :, None].expand(B, cfg.n_kv_heads, rep, S, cfg.head_dim).reshape(B, cfg.n_heads, S, cfg.head_dim)
        p = cfg.dropout if self.training else 0.0
        if cfg.sink == "learned":
            y = self._attend_explicit(q, k, v, allowed, sink, q_plain, rope, p)
        elif sink is not None:
            y = self._attend_with_sinks(q, apply_rope(q_plain, sink[0], sink[1]), k, v, allowed, sink[2])
        elif allowed is None:  # softmax(Q Kᵀ / sqrt(D)) V
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, cfg.d_model)
        return self.wo(y), present

    def _attend_explicit(self, q, k, v, allowed, sink, q_plain, rope, p: float) -> torch.Tensor:
        """softmax over the scores and the head's learned sink logit (whose value is zero), explicit
        because SDPA has no extra column. allowed None = causal. Shapes as _attend_with_sinks."""
        B, H, T, D = q.shape
        S = k.shape[2]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, S)
        if sink is not None:
            q_sink = apply_rope(q_plain, sink[0], sink[1]).float()
            span = sink[2].shape[-1]
            to_sinks = torch.matmul(q_sink, k[:, :, :span].float().transpose(-1, -2)) / math.sqrt(D)
            head = torch.where(sink[2][:, None, None, :], to_sinks, scores[..., :span])
            scores = torch.cat((head, scores[..., span:]), dim=-1)
        if allowed is None:
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        extra = self.head_sink.float()[None, :, None, None].expand(B, H, T, 1)
        weights = torch.softmax(torch.cat((scores, extra), dim=-1), dim=-1)[..., :S]  # (B, H, T, S)
        weights = F.dropout(weights, p) if p else weights
        return torch.matmul(weights, v.float()).to(v.dtype)

    @staticmethod
    def _attend_with_sinks(q: torch.Tensor, q_sink: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           allowed: torch.Tensor, sink_keys: torch.Tensor) -> torch.Tensor:
        """Attention where sink slots are scored against q_sink and the others against q: SDPA over q,
        with the difference on the sink slots added as a bias. Sinks are a stream's first tokens, so
        they lie among the first S' slots (sink_keys may be cut to those) and only they are scored
        twice. Measured faster than an explicit softmax, and than one SDPA over [q, q_sink] against
        [k, 0 | 0, k] (different query and value widths leave the fused kernel).
        q, q_sink (B, H, T, D); k, v (B, H, S, D); allowed (B, 1, T, S); sink_keys (B, S') -> (B, H, T, D)."""
        if _FLASH_CPU is not None and q.device.type == "cpu" and not torch.compiler.is_compiling():
            return _attend_in_two_parts(q, q_sink, k, v, allowed, sink_keys)
        scale = 1.0 / math.sqrt(q.shape[-1])
        span = sink_keys.shape[-1]
        k_head = k[:, :, :span].transpose(-1, -2)  # (B, H, D, S')
        fix = (torch.matmul(q_sink, k_head) - torch.matmul(q, k_head)) * scale  # (B, H, T, S')
        fix = fix.masked_fill(~sink_keys[:, None, None, :], 0.0)  # zero off the sinks
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = torch.cat((bias[..., :span] + fix, bias[..., span:].expand(-1, fix.shape[1], -1, -1)), dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


# PyTorch's fused CPU attention that also returns the log-sum-exp of each row; where present, the
# sink path merges two softmax parts with it instead of materialising a (B, H, T, S) bias.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_in_two_parts(q, q_sink, k, v, allowed, sink_keys) -> torch.Tensor:
    """Same result as the bias path of Attention._attend_with_sinks: softmax over the ordinary slots
    (fused kernel, with its log-sum-exp) and over the sink slots (explicit, S' columns), merged by
    their log-sum-exps. Shapes as there."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    span = sink_keys.shape[-1]
    is_sink = torch.zeros(allowed.shape[-1], dtype=torch.bool, device=q.device).expand(sink_keys.shape[0], -1)
    is_sink = torch.cat((sink_keys, is_sink[:, span:]), dim=-1)[:, None, None, :]  # (B, 1, 1, S)
    ordinary = allowed & ~is_sink
    bias = torch.zeros(ordinary.shape, dtype=q.dtype).masked_fill(~ordinary, float("-inf"))
    out_o, lse_o = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)  # (B, H, T, D), (B, H, T)
    has_o = ordinary.any(dim=-1)  # (B, 1, T): a stream's first tokens may read sinks only
    lse_o = lse_o.masked_fill(~has_o, float("-inf"))
    out_o = out_o.masked_fill(~has_o[..., None], 0.0)
    s = torch.matmul(q_sink, k[:, :, :span].transpose(-1, -2)) * scale  # (B, H, T, S')
    s = s.masked_fill(~(allowed[..., :span] & is_sink[..., :span]), float("-inf"))
    lse_s = torch.logsumexp(s, dim=-1)  # (B, H, T); -inf where a query reads no sink
    lse = torch.logaddexp(lse_o, lse_s)
    w_o = torch.exp(lse_o - lse).nan_to_num(0.0)[..., None]
    w_s = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # (B, H, T, S') already normalised jointly
    return (w_o * out_o + torch.matmul(w_s, v[:, :, :span])).to(v.dtype)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.ffn
        if cfg.ffn == "swiglu":
            self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        act = F.relu if self.kind == "relu" else F.gelu
        return self.w_down(act(self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, allowed, past, sink=None):
        a, present = self.attn(self.attn_norm(x), rope, allowed, past, sink)
        x = x + self.drop(a)
        x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return x, present


def slot_positions(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, S) of valid slots -> position of each slot (B, S): valid slots before it."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_allowed(mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """mask (B, S) -> (B, 1, T, S) bool: new token i (slot S-T+i) may read slot j if j is valid and j <= its slot.

    A token always reads its own slot, so a padding query never has an all-masked row (NaN)."""
    S = mask.shape[1]
    slots = torch.arange(S, device=mask.device)
    q_slots = slots[S - n_new:]
    causal = slots[None, :] <= q_slots[:, None]  # (T, S)
    allowed = causal[None] & mask.bool()[:, None, :]
    allowed = allowed | (slots[None, :] == q_slots[:, None])[None]
    return allowed[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.checkpoint_blocks = False  # activation checkpointing, switched on by training code
        self.reset_parameters()

    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)  # GPT-2: scale residual writes by depth
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = residual_std if name.endswith(("wo.weight", "w_down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past: list[KV] | None = None,
                use_cache: bool = False, key_positions: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None, sink_positions: torch.Tensor | None = None,
                sink_keys: torch.Tensor | None = None):
        """input_ids (B, T); positions (B, T) of the new tokens; past: per layer (k, v) each
        (B, Hkv, P, D). Then either attention_mask (B, P+T) of valid slots (key positions = rank of
        the slot, causal over slots), or an explicit layout from ctxmem.layout: key_positions (B, S),
        allowed (B, T, S) bool, and optionally sink_positions (B, T) with sink_keys (B, S) bool.
        Returns logits (B, T, V) [, present per layer]."""
        B, T = input_ids.shape
        P = past[0][0].shape[2] if past else 0
        if allowed is not None:
            k_pos, q_pos, allowed = key_positions, positions, allowed[:, None]
        elif attention_mask is None and P == 0:
            k_pos, allowed = None, None  # plain causal training/prefill path
            q_pos = positions if positions is not None else torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, P + T, dtype=torch.bool, device=input_ids.device)
            k_pos = slot_positions(attention_mask)
            q_pos = positions if positions is not None else k_pos[:, P:]
            allowed = attention_allowed(attention_mask, T)
        x = self.tok_emb(input_ids)
        if self.cfg.pos == "learned":
            x = x + self.pos_emb(q_pos)
        x = self.drop(x)
        rope, sink = None, None
        if self.cfg.pos == "rope":
            q_cos, q_sin = rope_cos_sin(q_pos, self.cfg.head_dim, self.cfg.rope_theta)
            k_cos, k_sin = (q_cos, q_sin) if k_pos is None else rope_cos_sin(k_pos, self.cfg.head_dim, self.cfg.rope_theta)
            rope = (q_cos, q_sin, k_cos, k_sin)
            if sink_positions is not None:
                sink = (*rope_cos_sin(sink_positions, self.cfg.head_dim, self.cfg.rope_theta), sink_keys)
        presents = []
        for i, block in enumerate(self.blocks):
            layer_past = past[i] if past else None
            if self.checkpoint_blocks and self.training:
                x, present = checkpoint(block, x, rope, allowed, layer_past, sink, use_reentrant=False)
            else:
                x, present = block(x, rope, allowed, layer_past, sink)
            presents.append(present)
        logits = self.lm_head(self.norm(x))
        return (logits, presents) if use_cache else logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
