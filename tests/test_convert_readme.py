"""Read-ME checkpoints through `edgemoe convert`: the embedded router against a torch forward of
Read-ME's cluster predictor, llama.cpp's logits against a torch forward of the whole model
with those routes, both expert layouts, requantization, refusals; and the router format's
optional biases that Read-ME's router needs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, assert_one_line_error, needs_cache
from edgemoe.errors import RouterFormatError
from edgemoe.router_format import (Backbone, bias_shapes, load_router, random_router, weight_shapes,
                                   write_gguf_router, write_safetensors_router)
from edgemoe.router_runtime import RouterRuntime
from readme_checkpoints import ReadmeShape, torch_readme_forward, torch_router_logits, write_readme_checkpoint


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


# --- Read-ME checkpoints ---------------------------------------------------------------------

# token ids inside the tiny vocabulary; long enough that every cluster gets tokens
PROMPT = [5, 17, 42, 99, 123, 7, 250, 3, 64, 201, 11, 12, 180, 33, 2, 90, 150, 77, 8, 300, 41, 19, 260, 101]
LAYOUTS = ("fused", "separate")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    # the same seed: one model, saved in both of Read-ME's expert layouts
    return {layout: write_readme_checkpoint(root / layout, seed=0, fused=layout == "fused") for layout in LAYOUTS}


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    from edgemoe.convert import convert

    root = tmp_path_factory.mktemp("readme-gguf")
    out = {}
    for layout, d in checkpoints.items():
        out[layout] = root / f"{layout}.gguf"
        result = convert(d, out[layout], outtype="f32")
        assert (result.arch, result.router_kind) == ("bailingmoe", "readme")
    return out


def _routed_logits(path, tokens, choices):
    """llama.cpp's logits with every token's routes handed to the native side first (all layers)."""
    from edgemoe.engine import Engine

    routes = np.ascontiguousarray(np.asarray(choices, dtype=np.int32)[:, None])
    with Engine(path, n_threads=N_THREADS, n_ctx=128, kv_type="f32", expert_cache="100%") as e:
        for il in range(e.n_layer):
            e.cache.set_routes(il, routes)
        return e.eval(tokens)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_embedded_router_picks_what_readme_picks(layout, checkpoints, converted):
    ref = torch_router_logits(checkpoints[layout], PROMPT)
    assert len(set(ref.argmax(-1).tolist())) == ReadmeShape().n_cluster  # every cluster chosen somewhere
    router = load_router(converted[layout])
    assert (router.kind, router.residual_expert, router.hparams.top_k) == ("readme", True, 1)
    assert router.hparams.attention_scale == pytest.approx(1 / ReadmeShape().normalizer)
    assert router.choice_experts[:, :, 0].tolist() == [[c, c] for c in range(ReadmeShape().n_cluster)]
    whole = RouterRuntime(router)
    logits = whole.logits(PROMPT)
    assert float(np.abs(logits - ref).max()) < 1e-4 * float(np.abs(ref).max())
    assert whole.choices(logits)[:, 0].tolist() == ref.argmax(-1).tolist()
    # one token at a time, through the runtime's KV cache: the same choices
    stepwise = RouterRuntime(router)
    assert [int(stepwise.choices(stepwise.logits([t]))[0, 0]) for t in PROMPT] == ref.argmax(-1).tolist()


@needs_cache
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_torch_forward_with_the_routers_routes(layout, checkpoints, converted):
    choices, ref = torch_readme_forward(checkpoints[layout], PROMPT)
    got = _routed_logits(converted[layout], PROMPT, choices)
    scale = float(np.abs(ref).max())
    assert scale > 0.5
    assert float(np.abs(got - ref).max()) < 1e-4 * scale


@needs_cache
def test_any_routes_are_obeyed_with_weight_one(checkpoints, converted):
    """Other choices than the router's: llama.cpp still computes residual + that expert, so the
    zero gate gives the named expert weight exactly 1."""
    n = ReadmeShape().n_cluster
    forced = (np.arange(len(PROMPT)) * 3 + 1) % n
    choices, ref = torch_readme_forward(checkpoints["fused"], PROMPT, choices=forced)
    _, own = torch_readme_forward(checkpoints["fused"], PROMPT)
    assert float(np.abs(ref - own).max()) > 0.1  # the forced routes change the output
    got = _routed_logits(converted["fused"], PROMPT, forced)
    assert float(np.abs(got - ref).max()) < 1e-4 * float(np.abs(ref).max())


@needs_cache
def test_builtin_router_path_when_the_engine_has_one(checkpoints, converted):
    from edgemoe.engine import Engine

    if not isinstance(getattr(Engine, "router", None), property):
        pytest.skip("this Engine has no built-in router path")
    _, ref = torch_readme_forward(checkpoints["fused"], PROMPT)
    with Engine(converted["fused"], n_threads=N_THREADS, n_ctx=128, kv_type="f32") as e:
        got = e.eval(PROMPT)
    assert float(np.abs(got - ref).max()) < 1e-4 * float(np.abs(ref).max())


def _tensors(path):
    import gguf

    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def test_fused_experts_split_into_the_separate_layout(converted):
    """The channels all fused experts share become the shared expert: the same file as the
    separate-residual layout, tensor for tensor."""
    import gguf

    assert _tensors(converted["fused"]) == _tensors(converted["separate"])
    r = gguf.GGUFReader(str(converted["fused"]))
    f = {name: field.contents() for name, field in r.fields.items()}
    shape = ReadmeShape()
    n_ff_exp = max(shape.clusters)
    assert f["general.architecture"] == "bailingmoe"
    assert f["edgemoe.router_decoupled"] is True
    assert (f["bailingmoe.expert_count"], f["bailingmoe.expert_used_count"]) == (shape.n_cluster, 1)
    assert f["bailingmoe.expert_feed_forward_length"] == n_ff_exp
    assert f["bailingmoe.expert_shared_count"] == -(-shape.residual // n_ff_exp)  # residual padded up
    assert f["bailingmoe.expert_weights_norm"] is True and f["bailingmoe.expert_weights_scale"] == 1.0
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    assert not t["blk.0.ffn_gate_inp.weight"].any()
    shexp = t["blk.1.ffn_up_shexp.weight"]
    assert shexp.shape == (2 * n_ff_exp, shape.hidden_size)
    assert shexp[:shape.residual].any(axis=1).all() and not shexp[shape.residual:].any()  # zero padding
    assert not t["blk.0.ffn_up_exps.weight"][3, min(shape.clusters):].any()  # the narrowest expert, padded


@needs_cache
def test_float16_checkpoint_and_q8_0_output(tmp_path, checkpoints, converted):
    import gguf

    from edgemoe.convert import convert

    d = write_readme_checkpoint(tmp_path / "f16", seed=0, fused=True, dtype=np.float16)
    f16, q8 = tmp_path / "f16.gguf", tmp_path / "q8.gguf"
    convert(d, f16)
    convert(d, q8, outtype="q8_0")
    choices, ref = torch_readme_forward(d, PROMPT)  # the f16 weights, widened
    for path, qtype in ((f16, gguf.GGMLQuantizationType.F16), (q8, gguf.GGMLQuantizationType.Q8_0)):
        r = gguf.GGUFReader(str(path))
        types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in r.tensors}
        assert types["blk.0.ffn_gate_exps.weight"] == qtype
        assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
        assert types["edgemoe.router.blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F32
        assert r.fields["edgemoe.router_decoupled"].contents() is True
        router = load_router(path)
        assert RouterRuntime(router).choices(RouterRuntime(router).logits(PROMPT))[:, 0].tolist() == choices.tolist()
        got = _routed_logits(path, PROMPT, choices)
        if qtype == gguf.GGMLQuantizationType.F16:
            assert float(np.abs(got - ref).max()) < 1e-2 * float(np.abs(ref).max())
        else:  # 8-bit weights: close per token
            assert min(np.corrcoef(g, x)[0, 1] for g, x in zip(got, ref)) > 0.99
            assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9


# --- refusals, through the CLI --------------------------------------------------------------

def _variant(src, dst, config=None, edit=None):
    """A copy of checkpoint `src` with config.json keys replaced and its tensors passed through `edit`."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit:
        save_file(edit(load_file(str(dst / "model.safetensors"))), str(dst / "model.safetensors"))
    return dst


def _without(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _masked_dense(t):
    """What Read-ME's training saves: the dense MLP, its experts only in a mask file."""
    out = {k: v for k, v in t.items() if ".moe." not in k}
    for i in range(ReadmeShape().num_hidden_layers):
        for proj in ("gate", "up", "down"):
            out[f"model.layers.{i}.mlp.{proj}_proj.weight"] = t[f"model.layers.{i}.moe.{proj}_proj_0.weight"]
    return out


@needs_cache
@pytest.mark.parametrize("change,needles", [
    (dict(config={"N_cluster": 3}), ("layer 0 has 4 experts", "n_cluster is 3")),
    (dict(edit=_without("cluster_predictor.k_proj_1.bias")), ("cluster_predictor.k_proj_1.bias is missing",)),
    (dict(edit=_without("model.layers.1.moe.down_proj_2.weight")), ("moe.down_proj_2.weight is missing",)),
    (dict(edit=_masked_dense), ("masked dense mlp", "mask file")),
    (dict(config={"nonautoregressive": True}), ("non-autoregressive router",)),
    (dict(config={"hidden_act_predictor": "gelu"}), ("activation 'gelu'",)),
    (dict(config={"inter_dim": 48}), ("embedding_dim 32 != inter_dim 48",)),
])
def test_refusals_are_one_line_errors(tmp_path, checkpoints, edgemoe_env, change, needles):
    d = _variant(checkpoints["fused"], tmp_path / "src", **change)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(d), "-o", str(out_dir / "m.gguf")],
                          env=edgemoe_env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, *needles)
    assert not list(out_dir.iterdir())
