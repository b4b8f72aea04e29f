"""Runs a Read-ME router (docs/router-format.md) on a token stream, one step per token.

The router keeps its own KV cache, so each new token costs one step of the small transformer,
never a recompute over the context. numpy in float32: the router is a few hundred thousand
multiply-adds per token, well under the backbone's time (BENCHMARKS.md has the share).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from edgemoe.router_format import Router, RouterHParams


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w


def _act(x: np.ndarray, name: str) -> np.ndarray:
    if name == "silu":
        return x / (np.float32(1.0) + np.exp(-x))
    if name == "gelu":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))
    return np.maximum(x, np.float32(0.0))


@dataclass
class _Block:
    attn_norm: np.ndarray
    wqkv: np.ndarray      # [n_embd, n_embd + 2*kv]: q, k, v in one matmul
    wo: np.ndarray        # [n_embd, n_embd] transposed for x @ wo
    ffn_norm: np.ndarray
    up: np.ndarray        # [n_embd, n_ff]
    down: np.ndarray      # [n_ff, n_embd]
    # optional biases (Read-ME's linears have them); None: the file has none, nothing is added
    bqkv: Optional[np.ndarray] = None
    bo: Optional[np.ndarray] = None
    b_up: Optional[np.ndarray] = None
    b_down: Optional[np.ndarray] = None


def _plus(x: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    return x if bias is None else x + bias


class RouterRuntime:
    """One sequence's router state. `step(tokens)` appends tokens and returns their choices."""

    def __init__(self, router: Router, capacity: int = 256):
        router.check()
        self.router = router
        hp: RouterHParams = router.hparams
        self.hp = hp
        w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in router.weights.items()}
        self._embd = w["token_embd.weight"]
        self._blocks: List[_Block] = []
        kv = hp.n_head_kv * hp.head_dim
        for i in range(hp.n_layer):
            b = f"blk.{i}."
            bqkv = None
            if any(b + n in w for n in ("attn_q.bias", "attn_k.bias", "attn_v.bias")):
                bqkv = np.concatenate([w.get(b + "attn_q.bias", np.zeros(hp.n_embd, np.float32)),
                                       w.get(b + "attn_k.bias", np.zeros(kv, np.float32)),
                                       w.get(b + "attn_v.bias", np.zeros(kv, np.float32))])
            self._blocks.append(_Block(
                attn_norm=w[b + "attn_norm.weight"],
                wqkv=np.ascontiguousarray(np.concatenate(
                    [w[b + "attn_q.weight"], w[b + "attn_k.weight"], w[b + "attn_v.weight"]], axis=0).T),
                wo=np.ascontiguousarray(w[b + "attn_output.weight"].T),
                ffn_norm=w[b + "ffn_norm.weight"],
                up=np.ascontiguousarray(w[b + "ffn_up.weight"].T),
                down=np.ascontiguousarray(w[b + "ffn_down.weight"].T),
                bqkv=bqkv, bo=w.get(b + "attn_output.bias"), b_up=w.get(b + "ffn_up.bias"),
                b_down=w.get(b + "ffn_down.bias")))
        self._out_norm = w["output_norm.weight"]
        self._head = np.ascontiguousarray(w["head.weight"].T)
        self._head_bias = w.get("head.bias")
        hd = hp.head_dim
        half = hd // 2
        self._inv_freq = (np.float64(hp.rope_freq_base) ** (-np.arange(half, dtype=np.float64) * 2.0 / hd))
        self._group = hp.n_head // hp.n_head_kv
        self._scale = np.float32(hp.kq_scale)
        self._capacity = 0
        self._grow(max(1, capacity))
        self.reset()

    def reset(self) -> None:
        """A new sequence: positions start at 0 again."""
        hp = self.hp
        self.n_past = 0
        shape = (hp.n_layer, hp.n_head_kv, self._capacity, hp.head_dim)
        self._k = np.zeros(shape, dtype=np.float32)
        self._v = np.zeros(shape, dtype=np.float32)

    def new_sequence(self) -> "RouterRuntime":
        """Another sequence's state over the same weights (one copy of them for all sequences)."""
        other = copy.copy(self)  # shares the weights and RoPE tables; _grow replaces, never mutates
        other.reset()
        return other

    def keep(self, n: int) -> None:
        """Keeps the first n positions (a kept prompt prefix); later ones are overwritten."""
        if n < 0:
            raise ValueError("cannot keep a negative number of positions")
        self.n_past = min(self.n_past, n)

    def _grow(self, need: int) -> None:
        """Room for `need` positions: the KV cache and the RoPE tables double as needed."""
        old = self._capacity
        cap = max(old, 1)
        while cap < need:
            cap *= 2
        if cap == old:
            return
        if old:
            pad = ((0, 0), (0, 0), (0, cap - old), (0, 0))
            self._k = np.pad(self._k, pad)
            self._v = np.pad(self._v, pad)
        ang = np.arange(cap, dtype=np.float64)[:, None] * self._inv_freq[None, :]
        self._cos = np.cos(ang).astype(np.float32)[:, None, :]   # [pos, 1, half]
        self._sin = np.sin(ang).astype(np.float32)[:, None, :]
        self._capacity = cap

    def _rope(self, x: np.ndarray, p0: int) -> np.ndarray:
        # x [T, heads, head_dim] at positions p0..p0+T-1; NEOX layout: (i, i + half) rotate together
        t = x.shape[0]
        cos, sin = self._cos[p0:p0 + t], self._sin[p0:p0 + t]
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        out = np.empty_like(x)
        out[..., :half] = a * cos - b * sin
        out[..., half:] = b * cos + a * sin
        return out

    def logits(self, tokens) -> np.ndarray:
        """Appends tokens to the sequence; the head's logits for each, float32 [T, n_choice]."""
        hp = self.hp
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        t = toks.size
        if t == 0:
            return np.zeros((0, hp.n_choice), dtype=np.float32)
        if toks.min() < 0 or toks.max() >= hp.n_vocab:
            raise ValueError(f"token id outside the router's vocabulary of {hp.n_vocab}")
        p0 = self.n_past
        self._grow(p0 + t)
        pos = np.arange(p0, p0 + t)
        nh, nkv, hd = hp.n_head, hp.n_head_kv, hp.head_dim
        kv = nkv * hd
        # causal mask over the cached keys 0..p0+t-1 for queries p0..p0+t-1 (one token sees them all)
        mask = None if t == 1 else np.where(np.arange(p0 + t)[None, :] <= pos[:, None], np.float32(0.0),
                                            np.float32(-np.inf))
        h = self._embd[toks]
        for i, blk in enumerate(self._blocks):
            a = _rmsnorm(h, blk.attn_norm, hp.rms_eps)
            qkv = _plus(a @ blk.wqkv, blk.bqkv)
            qk = self._rope(qkv[:, :hp.n_embd + kv].reshape(t, nh + nkv, hd), p0)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, hp.n_embd + kv:].reshape(t, nkv, hd)
            self._k[i, :, p0:p0 + t] = k.transpose(1, 0, 2)
            self._v[i, :, p0:p0 + t] = v.transpose(1, 0, 2)
            keys = self._k[i, :, :p0 + t]          # [nkv, P, hd]
            vals = self._v[i, :, :p0 + t]
            qg = q.transpose(1, 0, 2).reshape(nkv, self._group * t, hd)  # query head h -> kv head h // group
            s = (qg @ keys.transpose(0, 2, 1)).reshape(nkv, self._group, t, p0 + t) * self._scale
            if mask is not None:
                s += mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            o = (s.reshape(nkv, self._group * t, p0 + t) @ vals).reshape(nh, t, hd)
            h = h + _plus(o.transpose(1, 0, 2).reshape(t, hp.n_embd) @ blk.wo, blk.bo)
            m = _rmsnorm(h, blk.ffn_norm, hp.rms_eps)
            h = h + _plus(_act(_plus(m @ blk.up, blk.b_up), hp.activation) @ blk.down, blk.b_down)
        self.n_past = p0 + t
        return _plus(_rmsnorm(h, self._out_norm, hp.rms_eps) @ self._head, self._head_bias)

    def choices(self, logits: np.ndarray) -> np.ndarray:
        """The top_k choices per token, best first; equal logits: the lower id first. [T, top_k]"""
        k = self.hp.top_k
        order = np.argsort(-logits, axis=-1, kind="stable")
        return order[:, :k].astype(np.int32)

    def routes(self, tokens) -> np.ndarray:
        """Appends tokens; their experts in every MoE layer, int32 [T, n_moe_layer, per-token ids]."""
        return self.router.routes(self.choices(self.logits(tokens)))


def describe(router: Router) -> Dict[str, int]:
    """Parameters and multiply-adds per token of the router (for reports)."""
    hp = router.hparams
    n_params = int(sum(np.asarray(w).size for w in router.weights.values()))
    kv = hp.n_head_kv * hp.head_dim
    per_block = hp.n_embd * (hp.n_embd + 2 * kv) + hp.n_embd * hp.n_embd + 2 * hp.n_embd * hp.n_ff
    return {"params": n_params, "macs_per_token": hp.n_layer * per_block + hp.n_embd * hp.n_choice}
