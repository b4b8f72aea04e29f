"""`edgemoe convert` from a GGUF: bytes and keys kept, alignment applied, routers embedded."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, assert_one_line_error, needs_cache

pytestmark = needs_cache

PROMPT = [10, 200, 3000, 45, 7, 999, 12, 64]


def _read(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    keys = {}
    for name, f in r.fields.items():
        if not name.startswith("GGUF."):
            v = f.contents()
            keys[name] = (list(v) if isinstance(v, list) else v, tuple(f.types))
    tensors = {t.name: (int(t.tensor_type), tuple(t.shape.tolist()), np.asarray(t.data).tobytes(),
                        r.data_offset + int(t.data_offset)) for t in r.tensors}
    return keys, tensors


@pytest.fixture(scope="module")
def source(tiny_models):
    # llama.cpp's default 32-byte alignment: the converter has work to do
    return tiny_models["qwen2moe"]


def test_reemit_keeps_every_key_and_tensor_byte(source, tmp_path):
    from edgemoe.convert import convert

    out = tmp_path / "aligned.gguf"
    convert(source, out, align=4096)
    src_keys, src_tensors = _read(source)
    out_keys, out_tensors = _read(out)
    assert int(out_keys.pop("general.alignment")[0]) == 4096
    src_keys.pop("general.alignment", None)
    assert out_keys == src_keys
    assert list(out_tensors) == list(src_tensors)
    for name, (qtype, shape, data, offset) in out_tensors.items():
        assert (qtype, shape, data) == src_tensors[name][:3], name
        assert offset % 4096 == 0, name
        if name.endswith("_exps.weight"):
            slice_bytes = len(data) // shape[-1]
            if slice_bytes % 4096 == 0:  # whole-page slices start on page boundaries
                assert all((offset + e * slice_bytes) % 4096 == 0 for e in range(shape[-1]))


def test_reemitted_model_runs_identically(source, tmp_path):
    from edgemoe.convert import convert
    from edgemoe.engine import Engine

    out = tmp_path / "aligned.gguf"
    convert(source, out)
    with Engine(source, n_threads=N_THREADS, n_ctx=64) as e:
        ref = e.eval(PROMPT)
    with Engine(out, n_threads=N_THREADS, n_ctx=64, expert_cache="50%") as e:
        assert np.array_equal(e.eval(PROMPT), ref)


def _backbone(path):
    from edgemoe.convert.gguf_source import plan_gguf

    return plan_gguf(str(path)).backbone


@pytest.mark.parametrize("form", ["safetensors", "gguf"])
def test_router_round_trips(form, source, tmp_path):
    from edgemoe.convert import convert
    from edgemoe.convert.gguf_source import plan_gguf
    from edgemoe.engine import Engine
    from edgemoe.router_format import (load_router, random_router, write_gguf_router,
                                       write_safetensors_router)

    router = random_router("readme", _backbone(source), seed=7, top_k=2)
    router_file = tmp_path / f"router.{form}"
    (write_safetensors_router if form == "safetensors" else write_gguf_router)(router, router_file)
    out = tmp_path / "with-router.gguf"
    convert(source, out, router=router_file)

    back = plan_gguf(str(out)).router
    assert back is not None and back.kind == "readme" and back.hparams == router.hparams
    assert np.array_equal(back.layers, router.layers)
    assert np.array_equal(back.choice_experts, router.choice_experts)
    assert back.weights.keys() == router.weights.keys()
    assert all(np.array_equal(back.weights[k], router.weights[k]) for k in router.weights)
    assert load_router(router_file).hparams == router.hparams

    # the backbone's tensors are untouched, and the patched runtime loads the file
    _, src_tensors = _read(source)
    _, out_tensors = _read(out)
    assert all(out_tensors[n][2] == src_tensors[n][2] for n in src_tensors)
    # a readme router's choices are the routes: the source, handed the same routes, agrees
    from edgemoe.router_runtime import RouterRuntime

    with Engine(source, n_threads=N_THREADS, n_ctx=64, expert_cache="100%") as e:
        e.cache.set_routes_all(RouterRuntime(router).routes(PROMPT))
        ref = e.eval(PROMPT)
    with Engine(out, n_threads=N_THREADS, n_ctx=64, expert_cache="25%", notice=lambda m: None) as e:
        assert e.router is not None
        assert np.array_equal(e.eval(PROMPT), ref)

    # converting again keeps the router; a new one replaces it
    again = tmp_path / "again.gguf"
    convert(out, again)
    assert plan_gguf(str(again)).router.kind == "readme"
    other = random_router("predictor", _backbone(source), seed=8)
    other_file = tmp_path / "other.safetensors"
    write_safetensors_router(other, other_file)
    replaced = tmp_path / "replaced.gguf"
    convert(out, replaced, router=other_file)
    got = plan_gguf(str(replaced)).router
    assert got.kind == "predictor" and np.array_equal(got.weights["head.weight"], other.weights["head.weight"])
    assert sum(t.name.startswith("edgemoe.router.") for t in plan_gguf(str(replaced)).tensors) == \
        len(list(other.tensor_items()))


def test_requantize_keeps_router(source, tmp_path):
    import gguf

    from edgemoe.convert import convert
    from edgemoe.convert.gguf_source import plan_gguf
    from edgemoe.engine import Engine
    from edgemoe.router_format import random_router, write_gguf_router

    router_file = tmp_path / "router.gguf"
    write_gguf_router(random_router("predictor", _backbone(source), seed=1), router_file)
    with_router = tmp_path / "r.gguf"
    convert(source, with_router, router=router_file)
    out = tmp_path / "q8.gguf"
    convert(with_router, out, outtype="q8_0")
    plan = plan_gguf(str(out))
    types = {t.name: t.qtype for t in plan.tensors}
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["edgemoe.router.head.weight"] == gguf.GGMLQuantizationType.F32
    assert plan.router is not None and plan.router.kind == "predictor"
    with Engine(out, n_threads=N_THREADS, n_ctx=64) as e:
        assert np.isfinite(e.eval(PROMPT)).all()


def test_router_must_fit_the_model(source, tmp_path):
    from edgemoe.convert import convert
    from edgemoe.errors import RouterFormatError
    from edgemoe.router_format import Backbone, random_router, write_safetensors_router

    bb = _backbone(source)
    wrong = random_router("readme", Backbone(bb.n_vocab, bb.n_expert, bb.n_expert_used, (0, 1, 2)))
    path = tmp_path / "wrong.safetensors"
    write_safetensors_router(wrong, path)
    with pytest.raises(RouterFormatError, match="layers"):
        convert(source, tmp_path / "out.gguf", router=path)
    assert not (tmp_path / "out.gguf").exists()


# --- refusals, through the CLI --------------------------------------------------------------

def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "edgemoe", "convert", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _no_outputs(d, keep=()):
    left = [p for p in os.listdir(d) if p not in keep]
    assert left == [], left


def test_out_equal_to_src_is_refused(source, tmp_path, edgemoe_env):
    src = tmp_path / "m.gguf"
    src.write_bytes(source.read_bytes())
    before = src.read_bytes()
    assert_one_line_error(_cli([str(src), "-o", str(src)], edgemoe_env), "never overwrites")
    assert_one_line_error(_cli([str(src), "-o", str(tmp_path / "." / "m.gguf")], edgemoe_env), "never overwrites")
    assert src.read_bytes() == before
    _no_outputs(tmp_path, keep=("m.gguf",))


@pytest.mark.parametrize("case", ["garbage", "truncated", "missing"])
def test_corrupt_gguf_is_refused(case, source, tmp_path, edgemoe_env):
    src = tmp_path / "src.gguf"
    data = source.read_bytes()
    if case == "garbage":
        src.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    elif case == "truncated":
        src.write_bytes(data[:200])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _cli([str(src), "-o", str(out_dir / "m.gguf")], edgemoe_env)
    assert_one_line_error(proc, "no such file" if case == "missing" else "gguf")
    _no_outputs(out_dir)


def test_dense_model_with_router_is_refused(dense_model, source, tmp_path, edgemoe_env):
    from edgemoe.router_format import random_router, write_safetensors_router

    router = tmp_path / "router.safetensors"
    write_safetensors_router(random_router("readme", _backbone(source)), router)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_one_line_error(_cli([str(dense_model), "-o", str(out_dir / "m.gguf"), "--router", str(router)], edgemoe_env),
             "dense")
    _no_outputs(out_dir)


def test_bad_router_file_is_refused(source, tmp_path, edgemoe_env):
    router = tmp_path / "router.safetensors"
    router.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}        ")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_one_line_error(_cli([str(source), "-o", str(out_dir / "m.gguf"), "--router", str(router)], edgemoe_env), "router")
    _no_outputs(out_dir)


def test_disk_full_leaves_no_output(source, tmp_path, edgemoe_env):
    """A write that fails midway (here: a file-size limit, as a full disk would) removes the
    temporary file and never creates OUT."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    src = tmp_path / "src.gguf"
    src.write_bytes(source.read_bytes())
    assert src.stat().st_size > 256 * 1024
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(src), "-o", str(out_dir / "m.gguf")],
                          env=edgemoe_env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert_one_line_error(proc, "cannot write")
    _no_outputs(out_dir)
