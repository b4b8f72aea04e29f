"""An independent torch forward of a router, written from docs/router-format.md (not from
edgemoe/router_runtime.py): tests compare the runtime and the backbone's obeyed routes with it."""

from __future__ import annotations

import numpy as np
import torch


def torch_router_logits(router, tokens) -> np.ndarray:
    """The format spec in torch, float64, whole sequence at once (no KV cache)."""
    hp = router.hparams
    w = {k: torch.tensor(np.asarray(v, dtype=np.float64)) for k, v in router.weights.items()}
    ids = torch.tensor(np.asarray(tokens, dtype=np.int64))
    t = ids.numel()
    hd = hp.n_embd // hp.n_head

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + hp.rms_eps) * g

    def rope(x):  # x [T, H, hd], NEOX halves
        half = hd // 2
        inv = hp.rope_freq_base ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
        c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    act = {"silu": torch.nn.functional.silu, "relu": torch.relu,
           "gelu": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[hp.activation]
    scale = hp.attention_scale if hp.attention_scale is not None else 1 / np.sqrt(hd)
    h = w["token_embd.weight"][ids]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        a = rms(h, w[b + "attn_norm.weight"])
        q = rope((a @ w[b + "attn_q.weight"].T).reshape(t, hp.n_head, hd))
        k = rope((a @ w[b + "attn_k.weight"].T).reshape(t, hp.n_head_kv, hd))
        v = (a @ w[b + "attn_v.weight"].T).reshape(t, hp.n_head_kv, hd)
        out = []
        for head in range(hp.n_head):
            g = head // (hp.n_head // hp.n_head_kv)
            sc = (q[:, head] @ k[:, g].T) * scale
            sc = sc.masked_fill(~causal, float("-inf")).softmax(-1)
            out.append(sc @ v[:, g])
        h = h + torch.cat(out, -1) @ w[b + "attn_output.weight"].T
        m = rms(h, w[b + "ffn_norm.weight"])
        h = h + act(m @ w[b + "ffn_up.weight"].T) @ w[b + "ffn_down.weight"].T
    return (rms(h, w["output_norm.weight"]) @ w["head.weight"].T).numpy()


def torch_router_routes(router, tokens) -> np.ndarray:
    """Per-layer expert ids [T, n_moe_layer, ids] of the router's top_k choices (stable ties)."""
    logits = torch_router_logits(router, tokens)
    choices = np.argsort(-logits, axis=-1, kind="stable")[:, :router.hparams.top_k]
    picked = router.choice_experts[choices]  # [T, top_k, L, m]
    t, k, n_layer, m = picked.shape
    return picked.transpose(0, 2, 1, 3).reshape(t, n_layer, k * m)
