"""The numpy router runtime against an independent torch forward written from docs/router-format.md."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgemoe.router_format import Backbone, random_router
from edgemoe.router_runtime import RouterRuntime, describe

torch = pytest.importorskip("torch")


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


def _router(activation="silu", scale=None, n_head_kv=4, top_k=1):
    bb = Backbone(n_vocab=300, n_expert=16, n_expert_used=top_k, moe_layers=(0, 1, 2))
    r = random_router("readme", bb, n_embd=64, n_layer=2, n_head=4, n_ff=96, top_k=top_k, seed=3,
                      residual_expert=True)
    hp = dataclasses.replace(r.hparams, activation=activation, attention_scale=scale, n_head_kv=n_head_kv)
    if n_head_kv != 4:
        kv = n_head_kv * hp.head_dim
        rng = np.random.default_rng(5)
        for i in range(hp.n_layer):
            for t in ("attn_k", "attn_v"):
                r.weights[f"blk.{i}.{t}.weight"] = (rng.standard_normal((kv, 64)) / 8).astype(np.float32)
    r.hparams = hp
    r.check()
    return r


@pytest.mark.parametrize("activation,scale,n_head_kv", [("silu", None, 4), ("relu", 0.05, 2), ("gelu", None, 1)])
def test_runtime_matches_torch_forward_of_the_spec(activation, scale, n_head_kv):
    router = _router(activation, scale, n_head_kv)
    tokens = np.random.default_rng(1).integers(0, 300, size=70)
    ref = torch_router_logits(router, tokens)
    rt = RouterRuntime(router, capacity=8)  # capacity grows past 8: the cache's regrowth is covered
    got = rt.logits(tokens)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
    assert (rt.choices(got)[:, 0] == ref.argmax(-1)).all()


def test_one_step_per_token_equals_the_whole_prompt():
    router = _router(n_head_kv=2)
    tokens = np.random.default_rng(2).integers(0, 300, size=40)
    whole = RouterRuntime(router).logits(tokens)
    rt = RouterRuntime(router, capacity=4)
    steps = np.concatenate([rt.logits(tokens[:25])] + [rt.logits([t]) for t in tokens[25:]])
    np.testing.assert_allclose(steps, whole, rtol=1e-5, atol=1e-5)
    rt.reset()  # a new sequence starts at position 0 again
    np.testing.assert_allclose(rt.logits(tokens[:10]), whole[:10], rtol=1e-5, atol=1e-5)


def test_routes_follow_the_choice_map_and_ties_take_the_lower_id():
    router = _router(top_k=2)
    rt = RouterRuntime(router)
    tied = np.array([[1.0, 3.0, 3.0, 0.5] + [0.0] * 12], dtype=np.float32)
    assert rt.choices(tied).tolist() == [[1, 2]]
    routes = rt.routes([5, 6, 7])
    assert routes.shape == (3, 3, 2)
    assert routes.dtype == np.int32
    assert describe(router)["params"] == sum(w.size for w in router.weights.values())


def test_token_outside_the_vocabulary_is_refused():
    rt = RouterRuntime(_router())
    with pytest.raises(ValueError, match="vocabulary"):
        rt.logits([300])


def test_attention_scale_and_relu_survive_both_file_forms(tmp_path):
    from edgemoe.router_format import load_router, write_gguf_router, write_safetensors_router

    router = _router("relu", 0.125)
    for write, name in ((write_gguf_router, "r.gguf"), (write_safetensors_router, "r.safetensors")):
        write(router, tmp_path / name)
        back = load_router(tmp_path / name)
        assert back.hparams == router.hparams
        assert back.hparams.kq_scale == pytest.approx(0.125)
    plain = _router()  # no key written: the version-1 meaning, 1/sqrt(head_dim)
    write_gguf_router(plain, tmp_path / "p.gguf")
    assert load_router(tmp_path / "p.gguf").hparams.attention_scale is None
    assert plain.hparams.kq_scale == pytest.approx(1 / 4)
