"""The numpy router runtime against an independent torch forward written from docs/router-format.md."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgemoe.router_format import Backbone, random_router
from edgemoe.router_runtime import RouterRuntime, describe

pytest.importorskip("torch")

from router_reference import torch_router_logits  # noqa: E402


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
