"""`edgemoe info`: the report against the native layout, the router, dense models, bad input."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from conftest import HAS_CACHE, TINY, assert_one_line_error_of
from edgemoe.info import describe, format_report


def _cli(capsys, *args):
    from edgemoe.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(TINY))
def test_report_matches_the_native_layout(tiny_models, name):
    r = describe(tiny_models[name])
    kw = TINY[name]
    assert r.architecture == kw["arch"] and r.n_layer == kw["n_layer"]
    assert r.moe_layers == list(range(kw["n_layer"]))
    assert (r.n_expert, r.n_expert_used) == (kw["n_expert"], kw["n_expert_used"])
    assert r.n_expert_shared == (1 if kw["arch"] == "qwen2moe" else 0)
    assert r.shared_expert_gate == (kw["arch"] == "qwen2moe")
    exps = gguf.GGUFReader(tiny_models[name])
    assert r.expert_bytes == sum(t.n_bytes for t in exps.tensors if t.name.endswith("_exps.weight"))
    assert r.expert_bytes + r.non_expert_bytes == sum(t.n_bytes for t in exps.tensors)
    assert len(r.pools) == 1 and r.pools[0].layers == list(range(kw["n_layer"]))
    slot = r.pools[0].slot_bytes
    assert slot * kw["n_expert"] * kw["n_layer"] == r.expert_bytes
    assert r.min_budget_bytes == kw["n_expert_used"] * slot
    assert r.router is None and not r.dense
    want = kw.get("expert_type", "F16")
    for role in ("gate", "up", "down"):
        s = r.pools[0].roles[role]
        assert s.type == want and s.slice_bytes * 3 == slot
        assert r.roles[f"experts.{role}"].types == {want: kw["n_layer"]}
    assert r.roles["router"].types == {"F32": kw["n_layer"]}
    assert r.roles["token_embd"].types == {"F16": 1}
    # qwen3moe's tiny model is written with 4 KiB alignment and 8 KiB slices; the others at 32
    assert r.slices_aligned == (kw.get("alignment") == 4096)
    if HAS_CACHE:
        from edgemoe.cache import inspect_model

        n = inspect_model(tiny_models[name])
        assert (r.expert_bytes, r.non_expert_bytes, r.min_budget_bytes, len(r.pools), r.slices_aligned,
                r.n_moe_layer, max(s.slot_bytes for s in r.pools)) == \
               (n.expert_bytes, n.non_expert_bytes, n.min_budget_bytes, n.n_pools, n.slices_aligned,
                n.n_moe_layer, n.slot_bytes_max)


def test_deepseek_shape_dense_lead_and_shared_experts(tmp_path):
    from conftest import _vocab
    from edgemoe.shapes import SHAPES, synth_config
    from edgemoe.synth import write_model

    vocab = _vocab("ggml-vocab-deepseek-llm.gguf")
    path = write_model(tmp_path / "ds.gguf", synth_config(SHAPES["deepseek-v2-lite"], 0.08,
                                                           vocab_dir=vocab.parent)).path
    r = describe(path)
    assert r.architecture == "deepseek2"
    assert r.n_layer == 2 and r.moe_layers == [1]  # layer 0 is dense
    assert (r.n_expert, r.n_expert_used, r.n_expert_shared) == (64, 6, 2)
    assert "dense_ffn" in r.roles and "shared_experts" in r.roles
    assert r.roles["attention"].types == {"Q8_0": 2 * 5}  # q, kv_a_mqa, k_b, v_b, output per layer
    text = format_report(r)
    assert "2 shared (total width" in text and "layers 1:" in text


def _write_with_router(path, kind="readme", version=1, alignment=4096):
    """A minimal MoE GGUF (no tokenizer: info reads headers only) carrying router data."""
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.data_alignment = alignment
    if alignment != 32:
        w.add_custom_alignment(alignment)
    w.add_uint32("qwen3moe.block_count", 1)
    w.add_uint32("qwen3moe.expert_count", 4)
    w.add_uint32("qwen3moe.expert_used_count", 2)
    w.add_string("edgemoe.router.kind", kind)
    w.add_uint32("edgemoe.router.version", version)
    w.add_array("edgemoe.router.layers", [0])
    rng = np.random.default_rng(0)
    for role, shape in (("gate", (4, 32, 64)), ("up", (4, 32, 64)), ("down", (4, 64, 32))):
        w.add_tensor(f"blk.0.ffn_{role}_exps.weight", rng.standard_normal(shape).astype(np.float16))
    w.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((4, 64)).astype(np.float32))
    w.add_tensor("edgemoe.router.token_embd.weight", rng.standard_normal((100, 16)).astype(np.float32))
    w.add_tensor("edgemoe.router.output.weight", rng.standard_normal((8, 16)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_router_presence_and_kind(tmp_path, capsys):
    path = _write_with_router(tmp_path / "r.gguf", kind="predictor", version=3)
    r = describe(path)
    assert r.router is not None
    assert (r.router.kind, r.router.version, r.router.n_tensors) == ("predictor", 3, 2)
    assert r.router.bytes == (100 * 16 + 8 * 16) * 4
    assert r.router.keys["edgemoe.router.layers"] == "[1 values]"
    assert r.roles["edgemoe_router"].types == {"F32": 2}
    # router tensors are not experts
    assert r.expert_bytes == 3 * 4 * 32 * 64 * 2
    code, out, err = _cli(capsys, "info", str(path))
    assert code == 0, err
    assert "predictor v3: 2 tensors" in out
    code, out, err = _cli(capsys, "info", "--json", str(path))
    assert code == 0, err
    obj = json.loads(out)
    assert obj["router"]["kind"] == "predictor" and obj["router"]["version"] == 3
    assert obj["router"]["tensors"] == ["edgemoe.router.token_embd.weight", "edgemoe.router.output.weight"]


def test_alignment_reasons(tmp_path):
    # slices of 4 KiB at 4 KiB alignment: aligned; at 32: offsets are off
    aligned = describe(_write_with_router(tmp_path / "a.gguf", alignment=4096))
    assert aligned.slices_aligned and not aligned.misaligned_offsets and not aligned.odd_slice_sizes
    off = describe(_write_with_router(tmp_path / "b.gguf", alignment=32))
    assert off.slices_aligned is False and off.misaligned_offsets and not off.odd_slice_sizes
    assert "convert --align 4096" in format_report(off)


def test_json_fields(tiny_models, capsys):
    code, out, err = _cli(capsys, "info", str(tiny_models["qwen2moe"]), "--json")
    assert code == 0, err
    obj = json.loads(out)
    for key in ("path", "file_bytes", "gguf_version", "alignment", "architecture", "name", "n_layer",
                "n_moe_layer", "moe_layers", "n_expert", "n_expert_used", "n_expert_shared",
                "shared_expert_width", "shared_expert_gate", "expert_bytes", "non_expert_bytes",
                "expert_fraction", "pools", "slice_alignment", "slices_aligned", "misaligned_offsets",
                "odd_slice_sizes", "min_budget_bytes", "roles", "router", "dense", "n_params", "n_tensors"):
        assert key in obj, key
    assert obj["architecture"] == "qwen2moe" and obj["dense"] is False
    assert obj["shared_expert_width"] == TINY["qwen2moe"]["n_ff"] and obj["shared_expert_gate"] is True
    assert obj["pools"][0]["roles"]["down"]["shape"] == [TINY["qwen2moe"]["n_ff_exp"], TINY["qwen2moe"]["n_embd"]]
    assert obj["min_budget_bytes"] == 2 * obj["pools"][0]["slot_bytes"]
    assert obj["roles"]["shared_experts"]["types"] == {"F32": 8}  # 2 layers: gate_inp_shexp + gate/up/down
    assert abs(obj["expert_fraction"] - obj["expert_bytes"] / (obj["expert_bytes"] + obj["non_expert_bytes"])) < 1e-12


def test_human_table(tiny_models, capsys):
    code, out, err = _cli(capsys, "info", str(tiny_models["qwen3moe"]))
    assert code == 0, err
    assert out.startswith("file ") and "\narchitecture      qwen3moe" in out
    assert "8 routed, 2 used per token, no shared experts" in out
    assert "min cache budget" in out and "slices aligned    yes" in out
    assert "router            none" in out


def test_dense_model(dense_model, capsys):
    r = describe(dense_model)
    assert r.dense and r.n_expert == 0 and r.expert_bytes == 0 and r.slices_aligned is None
    assert r.min_budget_bytes == 0 and not r.pools
    code, out, err = _cli(capsys, "info", str(dense_model))
    assert code == 0, err
    assert "a dense model" in out
    code, out, err = _cli(capsys, "info", "--json", str(dense_model))
    assert json.loads(out)["dense"] is True


@pytest.mark.parametrize("case", ["missing", "directory", "text", "empty", "short-header", "truncated-data"])
def test_bad_input(case, tiny_models, tmp_path, capsys):
    src = tiny_models["qwen3moe"].read_bytes()
    path = tmp_path / "bad.gguf"
    needle = {"missing": "cannot open", "directory": "directory", "text": "not a gguf",
              "empty": "not a gguf", "short-header": "truncated", "truncated-data": "truncated"}[case]
    if case == "directory":
        path = tmp_path
    elif case == "text":
        path.write_text("hello, this is not a model\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "short-header":
        path.write_bytes(src[:5000])
    elif case == "truncated-data":
        path.write_bytes(src[:len(src) - 4096])
    code, out, err = _cli(capsys, "info", str(path))
    assert_one_line_error_of(code, err, needle)
    assert out == ""
