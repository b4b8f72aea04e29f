"""Writes the seed corpus (tests/fuzz/corpus/<target>/) from edgemoe's own writers.

    python tests/fuzz/make_corpus.py

Deterministic: running it again rewrites the same bytes. Seeds are tiny valid files (a few
KiB each: routers of width 4, a two-layer model with an 8-token vocabulary), so that the
fuzzer's edits land in headers rather than in tensor data. Each harness's module doc says how
an input's first byte picks its mode; seeds for the byte-prefixed modes carry that byte.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np

import fuzzsupport  # puts the repository on sys.path
import fuzz_trace

import gguf

from edgemoe.router_format import Backbone, bias_shapes, random_router, write_gguf_router, write_safetensors_router
from edgemoe.synth import SynthConfig, write_model
from edgemoe.trace import Trace, save_trace

CORPUS = fuzzsupport.CORPUS


def _tiny_vocab(path: str) -> None:
    """A gpt2-style vocab GGUF of 8 tokens (what synth copies the tokenizer.* keys from)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["a", "b", "c", "ab", "bc", "<s>", "</s>", "Ġ"])
    w.add_token_types([1, 1, 1, 1, 1, 3, 3, 1])
    w.add_token_merges(["a b", "b c"])
    w.add_bos_token_id(5)
    w.add_eos_token_id(6)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def _every_type_gguf(path: str) -> None:
    """A GGUF with a key of every value type and tensors of several ggml types."""
    VT = gguf.GGUFValueType
    w = gguf.GGUFWriter(path, "llama")
    w.add_key_value("t.u8", 1, VT.UINT8)
    w.add_key_value("t.i8", -1, VT.INT8)
    w.add_key_value("t.u16", 2, VT.UINT16)
    w.add_key_value("t.i16", -2, VT.INT16)
    w.add_key_value("t.u32", 3, VT.UINT32)
    w.add_key_value("t.i32", -3, VT.INT32)
    w.add_key_value("t.f32", 0.5, VT.FLOAT32)
    w.add_key_value("t.bool", True, VT.BOOL)
    w.add_key_value("t.str", "x", VT.STRING)
    w.add_key_value("t.u64", 4, VT.UINT64)
    w.add_key_value("t.i64", -4, VT.INT64)
    w.add_key_value("t.f64", 0.25, VT.FLOAT64)
    w.add_key_value("t.arr_i32", [1, 2, 3], VT.ARRAY, VT.INT32)
    w.add_key_value("t.arr_str", ["p", "q"], VT.ARRAY, VT.STRING)
    w.add_key_value("general.alignment", 64, VT.UINT32)
    w.add_tensor("f32", np.arange(4, dtype=np.float32))
    w.add_tensor("f16", np.arange(6, dtype=np.float16).reshape(2, 3))
    q8 = np.zeros((1, 34), dtype=np.uint8)  # one Q8_0 block: 32 weights
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _routers():
    bb = Backbone(n_vocab=8, n_expert=4, n_expert_used=2, moe_layers=(0, 1))
    readme = random_router("readme", bb, n_embd=4, n_layer=1, n_head=2, n_ff=4, n_ctx=8, top_k=1, seed=1)
    pred = random_router("predictor", bb, n_embd=4, n_layer=1, n_head=2, n_ff=4, n_ctx=8, top_k=2, seed=2,
                         residual_expert=True)
    pred.weights.update({n: np.full(s, 0.5, np.float32) for n, s in bias_shapes(pred.hparams).items()})
    pred.hparams = pred.hparams.__class__(**{**pred.hparams.__dict__, "attention_scale": 0.125,
                                            "activation": "gelu"})
    pred.check()
    return readme, pred


def _safetensors_every_dtype() -> bytes:
    """A safetensors file with a tensor of each dtype the reader knows, and metadata."""
    arrays = {
        "F64": np.array([1.5], np.float64), "F32": np.array([[1, 2], [3, 4]], np.float32),
        "F16": np.array([0.5, 2], np.float16), "BF16": np.array([0x3F80, 0xC000], np.uint16),
        "I64": np.array([-1], np.int64), "I32": np.array([7, 8, 9], np.int32), "I16": np.array([-2], np.int16),
        "I8": np.array([-3, 3], np.int8), "U8": np.array([255], np.uint8), "BOOL": np.array([True, False]),
    }
    import json

    header = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for dtype, arr in arrays.items():
        header[f"t.{dtype.lower()}"] = {"dtype": dtype, "shape": list(arr.shape),
                                       "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    header["t.scalar"] = {"dtype": "F32", "shape": [], "data_offsets": [offset, offset + 4]}
    blobs.append(np.float32(3).tobytes())
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return fuzzsupport.safetensors_bytes(raw, b"".join(blobs))


def _trace_npz(tmp: str, compressed: bool = False) -> bytes:
    rng = np.random.default_rng(3)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(6)]).reshape(3, 2, 2).astype(np.int32)
    t = Trace(experts=experts, layers=np.array([0, 2], np.int32), tokens=np.arange(3, dtype=np.int32),
              n_expert=8, model="tiny.gguf")
    path = os.path.join(tmp, "t.npz")
    if compressed:
        np.savez_compressed(path, experts=t.experts, layers=t.layers, tokens=t.tokens, n_expert=np.int32(8),
                            model=np.str_(t.model), format_version=np.int32(1))
    else:
        save_trace(t, path)
    return pathlib.Path(path).read_bytes()


def main() -> None:
    seeds = {t: {} for t in ("gguf_header", "router_format", "safetensors", "trace")}
    with tempfile.TemporaryDirectory() as tmp:
        readme, pred = _routers()
        for name, router in (("readme", readme), ("predictor", pred)):
            write_gguf_router(router, os.path.join(tmp, f"{name}.gguf"))
            write_safetensors_router(router, os.path.join(tmp, f"{name}.safetensors"))
        rd = {n: pathlib.Path(tmp, n).read_bytes() for n in os.listdir(tmp)}

        vocab = os.path.join(tmp, "vocab.gguf")
        _tiny_vocab(vocab)
        model = os.path.join(tmp, "model.gguf")
        write_model(model, SynthConfig(arch="qwen3moe", vocab=vocab, n_layer=1, n_embd=32, n_ff=32, n_ff_exp=32,
                                       n_expert=4, n_expert_used=2, n_head=2, n_head_kv=1, expert_type="Q8_0",
                                       weight_type="F16", seed=1))
        every = os.path.join(tmp, "every-type.gguf")
        _every_type_gguf(every)
        from edgemoe.gguf_header import read_header

        model_bytes = pathlib.Path(model).read_bytes()
        seeds["gguf_header"].update({
            "synth-qwen3moe-header": model_bytes[:read_header(model).data_offset],  # tensor data cut
            "every-type.gguf": pathlib.Path(every).read_bytes(),
            "router-readme.gguf": rd["readme.gguf"],
        })
        seeds["router_format"].update({
            "raw-readme.gguf": b"\0" + rd["readme.gguf"],
            "raw-predictor.safetensors": b"\0" + rd["predictor.safetensors"],
            "json-readme": b"\1" + fuzzsupport.safetensors_payload(rd["readme.safetensors"]),
            "json-predictor": b"\1" + fuzzsupport.safetensors_payload(rd["predictor.safetensors"]),
        })
        every_st = _safetensors_every_dtype()
        index = (b'{"metadata":{"total_size":64},"weight_map":{"t.f32":"model-00001-of-00001.safetensors",'
                 b'"t.bf16":"model-00001-of-00001.safetensors"}}')
        seeds["safetensors"].update({
            "raw-every-dtype": b"\0" + every_st,
            "raw-router": b"\0" + rd["readme.safetensors"],
            "json-every-dtype": b"\1" + fuzzsupport.safetensors_payload(every_st),
            "index-and-shard": b"\2" + index + b"\0" + every_st,
        })
        npz = _trace_npz(tmp)
        seeds["trace"].update({
            "raw-trace.npz": b"\0" + npz,
            "raw-compressed.npz": b"\0" + _trace_npz(tmp, compressed=True),
            "members-trace": b"\1" + fuzz_trace.members_payload(npz),
        })
    for target, files in seeds.items():
        folder = CORPUS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        print(f"{folder}: {len(files)} seeds, {sum(map(len, files.values()))} bytes")


if __name__ == "__main__":
    main()
