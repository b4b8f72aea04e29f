"""Read-ME checkpoints through `edgemoe convert`: the embedded router against a torch forward of
Read-ME's cluster predictor, llama.cpp's logits against a torch forward of the whole model
with those routes, both expert layouts, requantization, refusals; and the router format's
optional biases that Read-ME's router needs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgemoe.errors import RouterFormatError
from edgemoe.router_format import (Backbone, bias_shapes, load_router, random_router, weight_shapes,
                                   write_gguf_router, write_safetensors_router)
from edgemoe.router_runtime import RouterRuntime


# --- the router format's optional biases -----------------------------------------------------

def _router_with_biases(seed=0, scale=0.5):
    bb = Backbone(n_vocab=200, n_expert=6, n_expert_used=1, moe_layers=(0, 1))
    r = random_router("readme", bb, n_embd=32, n_layer=2, n_head=2, n_ff=48, seed=seed, residual_expert=True)
    rng = np.random.default_rng(seed + 1)
    biases = {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in bias_shapes(r.hparams).items()}
    return r, biases


def test_router_biases_round_trip_in_both_file_forms(tmp_path):
    r, biases = _router_with_biases()
    r.weights.update(biases)
    r.check()
    for write, name in ((write_gguf_router, "r.gguf"), (write_safetensors_router, "r.safetensors")):
        write(r, tmp_path / name)
        back = load_router(tmp_path / name)
        assert set(back.weights) == set(r.weights)
        for n, w in r.weights.items():
            assert np.array_equal(back.weights[n], w), n


def test_router_without_biases_keeps_its_tensor_list_and_logits():
    r, biases = _router_with_biases()
    names = [n for n, _ in r.tensor_items()]
    assert names == ["edgemoe.router." + n for n in weight_shapes(r.hparams)] + [
        "edgemoe.router.layers", "edgemoe.router.choice_experts"]
    tokens = np.arange(0, 200, 7)
    plain = RouterRuntime(r).logits(tokens)
    # zero biases add exactly nothing; real ones change the output
    zeros = dataclasses.replace(r, weights={**r.weights, **{n: np.zeros_like(b) for n, b in biases.items()}})
    assert np.array_equal(RouterRuntime(zeros).logits(tokens), plain)
    with_b = dataclasses.replace(r, weights={**r.weights, **biases})
    assert not np.allclose(RouterRuntime(with_b).logits(tokens), plain)


def test_router_bias_of_the_wrong_shape_is_refused():
    r, biases = _router_with_biases()
    r.weights["blk.1.attn_k.bias"] = np.zeros(5, np.float32)
    with pytest.raises(RouterFormatError, match=r"blk\.1\.attn_k\.bias has shape \[5\]"):
        r.check()
    del r.weights["blk.1.attn_k.bias"]
    r.weights["blk.0.attn_norm.bias"] = np.zeros(32, np.float32)  # not a bias the format has
    with pytest.raises(RouterFormatError, match="unknown router tensor"):
        r.check()
