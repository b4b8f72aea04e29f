#!/usr/bin/env python3
"""Write the seed corpus of fuzz_model_layout: tiny GGUFs (zero-filled tensor data, 256 bytes
to 6 KB each) that cover what model_layout.cpp reads, accepted and refused; and the hand-made
regression inputs (regressions/model_layout/handmade-*.gguf), headers no writer would produce.

    .venv/bin/python native/fuzz/make_corpus.py [out_dir]   # default native/fuzz/corpus/model_layout

Needs gguf-py (the `gguf` package, installed with the project's test extras). The output is
deterministic; the files are kept in the repository, so CI never runs this.
"""

from __future__ import annotations

import os
import pathlib
import struct
import sys
import tempfile

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

HERE = pathlib.Path(__file__).resolve().parent

# bytes per block and elements per block
QSIZE = {Q.F32: (4, 1), Q.F16: (2, 1), Q.BF16: (2, 1), Q.Q8_0: (34, 32), Q.Q4_0: (18, 32),
         Q.Q4_K: (144, 256), Q.Q6_K: (210, 256), Q.MXFP4: (17, 32)}


def tensor(w: gguf.GGUFWriter, name: str, ne, qtype=Q.F32) -> None:
    """A zero tensor of ggml shape `ne` (ne0 first) and type `qtype`."""
    bsize, bel = QSIZE[qtype]
    assert ne[0] % bel == 0, (name, ne)
    np_shape = tuple(reversed(ne))
    if qtype == Q.F32:
        w.add_tensor(name, np.zeros(np_shape, dtype=np.float32))
    elif qtype == Q.F16:
        w.add_tensor(name, np.zeros(np_shape, dtype=np.float16))
    else:
        byte_shape = np_shape[:-1] + (ne[0] // bel * bsize,)  # gguf-py wants rows as bytes
        w.add_tensor(name, np.zeros(byte_shape, dtype=np.uint8), raw_dtype=qtype)


def write(path: pathlib.Path, arch: str, kv, tensors, alignment=None, truncate=0) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    os.close(fd)
    w = gguf.GGUFWriter(tmp, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype in kv:
        if vtype == "u32":
            w.add_uint32(key, value)
        elif vtype == "i32":
            w.add_int32(key, value)
        elif vtype == "u64":
            w.add_uint64(key, value)
        elif vtype == "str":
            w.add_string(key, value)
        elif vtype == "f32":
            w.add_float32(key, value)
        elif vtype == "bool":
            w.add_bool(key, value)
        elif vtype == "arr_i32":
            w.add_array(key, value)
        else:
            raise ValueError(vtype)
    for t in tensors:
        tensor(w, *t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = pathlib.Path(tmp).read_bytes()
    os.unlink(tmp)
    if truncate:
        data = data[:-truncate]
    path.write_bytes(data)


def raw_gguf(kv, tensors, data: bytes, alignment: int = 32) -> bytes:
    """A GGUF v3 written field by field: kv is [(key, gguf type tag, packed value bytes)],
    tensors [(name, ne, ggml type tag, offset)]; then padding and `data`."""
    def string(b):
        b = b.encode() if isinstance(b, str) else b
        return struct.pack("<Q", len(b)) + b
    out = b"GGUF" + struct.pack("<Iqq", 3, len(tensors), len(kv))
    for key, tag, value in kv:
        out += string(key) + struct.pack("<I", tag) + value
    for name, ne, tag, offset in tensors:
        out += string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne)
        out += struct.pack("<iQ", tag, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def kv_str(key, value):
    b = value.encode() if isinstance(value, str) else value
    return (key, 8, struct.pack("<Q", len(b)) + b)


def kv_u32(key, value):
    return (key, 4, struct.pack("<I", value))


def handmade_regressions(out: pathlib.Path) -> None:
    """Inputs for the bugs the fuzzer found, and the ones found reading the code, each built
    to hit one check in model_layout.cpp (see README.md, Findings)."""
    out.mkdir(parents=True, exist_ok=True)
    moe = [kv_str("general.architecture", "qwen3moe"), kv_u32("qwen3moe.block_count", 1),
           kv_u32("qwen3moe.expert_count", 4), kv_u32("qwen3moe.expert_used_count", 2)]
    F32, Q8_0, F64 = 0, 8, 28

    # ggml: a tensor type tag outside enum ggml_type is loaded into the enum by gguf.cpp (UB)
    (out / "handmade-ggml-tensor-type-enum.gguf").write_bytes(
        raw_gguf(moe, [("blk.0.ffn_up_exps.weight", [8, 4, 4], 1000, 0)], bytes(512)))
    # ggml: gguf accepts 156328339607708064 x 59 Q8_0 elements (INT64_MAX/59 exactly, 9.8e18
    # bytes), ggml_new_tensor asserts INT64_MAX/ne1 > ne0 and aborts
    (out / "handmade-ggml-new-tensor-abort-equal.gguf").write_bytes(
        raw_gguf(moe, [("token_embd.weight", [156328339607708064, 59], Q8_0, 0)], b""))
    # ggml (hardening): gguf and ggml_new_tensor accept {0, 2^62, 2^62}, no elements, whose
    # row count ne1*ne2*ne3 overflows int64 (ggml_nrows on it is signed overflow)
    (out / "handmade-ggml-zero-element-row-overflow.gguf").write_bytes(
        raw_gguf(moe, [("token_embd.weight", [0, 2**62, 2**62], F32, 0)], b""))
    # ours: an expert tensor of 2^64 - 1024 bytes; data offset + tensor offset + size wrapped
    # around 2^64, and the wrapped end passed the "tensor data inside the file" check
    pad = kv_str("general.name", "x" * 600)  # a data section that starts past 512 bytes
    (out / "handmade-ours-data-end-overflow.gguf").write_bytes(
        raw_gguf(moe + [pad], [("blk.0.ffn_up_exps.weight", [8, 4, 4], F32, 0),
                               ("blk.0.ffn_down_exps.weight", [2**59 - 32, 1, 4], F64, 512)], bytes(512)))
    # ours: an architecture name with a newline and 1 KB long went verbatim into the one-line error
    arch = "qwen3moe\n" + "y" * 1100
    (out / "handmade-ours-arch-in-message.gguf").write_bytes(
        raw_gguf([kv_str("general.architecture", arch), kv_u32(arch + ".expert_count", 4)],
                 [("blk.0.ffn_up_exps.weight", [8, 4, 4], F32, 0),
                  ("blk.0.ffn_down_exps.weight", [4, 8, 4], F32, 512)], bytes(1024)))


def hparams(arch: str, n_layer: int, n_expert, n_used, vtype="u32"):
    kv = [(f"{arch}.block_count", n_layer, vtype),
          (f"{arch}.embedding_length", 32, "u32"),
          (f"{arch}.context_length", 256, "u32")]
    if n_expert is not None:
        kv.append((f"{arch}.expert_count", n_expert, vtype))
    if n_used is not None:
        kv.append((f"{arch}.expert_used_count", n_used, vtype))
    return kv


def moe_layer(il: int, n_embd: int, n_ff: int, n_expert: int, qtype=Q.F16, fused=False, aux=True,
              probs_bias=False, roles=("gate", "up", "down")):
    out = [(f"blk.{il}.attn_norm.weight", [n_embd])]
    if aux:
        out += [(f"blk.{il}.ffn_norm.weight", [n_embd]),
                (f"blk.{il}.ffn_gate_inp.weight", [n_embd, n_expert])]
    if probs_bias:
        out.append((f"blk.{il}.exp_probs_b.bias", [n_expert]))
    if fused:
        out.append((f"blk.{il}.ffn_gate_up_exps.weight", [n_embd, 2 * n_ff, n_expert], qtype))
    else:
        for r in roles:
            if r in ("gate", "up"):
                out.append((f"blk.{il}.ffn_{r}_exps.weight", [n_embd, n_ff, n_expert], qtype))
    if "down" in roles:
        down_q = qtype if n_ff % QSIZE[qtype][1] == 0 else Q.F16
        out.append((f"blk.{il}.ffn_down_exps.weight", [n_ff, n_embd, n_expert], down_q))
    return out


def main() -> int:
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus" / "model_layout"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.gguf"):
        old.unlink()

    def p(name):
        return out / f"{name}.gguf"

    common = [("token_embd.weight", [8, 16]), ("output_norm.weight", [8])]

    # accepted: separate gate/up/down experts, F16, router and norm per layer (qwen3moe-like)
    write(p("qwen3moe_f16"), "qwen3moe", hparams("qwen3moe", 2, 4, 2),
          common + moe_layer(0, 8, 4, 4) + moe_layer(1, 8, 4, 4))
    # accepted: fused gate_up experts, Q8_0, selection bias, 64-byte alignment
    write(p("fused_gate_up_q8_0"), "gpt-oss", hparams("gpt-oss", 2, 4, 2),
          common + moe_layer(0, 32, 2, 4, Q.Q8_0, fused=True, probs_bias=True)
          + moe_layer(1, 32, 2, 4, Q.Q8_0, fused=True, probs_bias=True), alignment=64)
    # accepted: a dense leading layer, then MoE layers of two layouts (two slot pools),
    # counts stored as u64, up without gate (down + up is enough)
    dense = [("blk.0.ffn_gate.weight", [8, 4]), ("blk.0.ffn_up.weight", [8, 4]), ("blk.0.ffn_down.weight", [4, 8])]
    write(p("deepseek2_two_pools"), "deepseek2", hparams("deepseek2", 3, 2, 1, "u64"),
          common + dense + moe_layer(1, 256, 1, 2, Q.Q4_K, aux=False)
          + moe_layer(2, 8, 4, 2, Q.F32, roles=("up", "down"), probs_bias=True)
          + [("blk.1.ffn_gate_shexp.weight", [8, 4]), ("blk.2.ffn_down_shexp.weight", [4, 8])])
    # accepted: counts as i32, no router or norm tensors, no block_count
    write(p("i32_counts_no_aux"), "mixtral", [("mixtral.expert_count", 4, "i32"), ("mixtral.expert_used_count", 2, "i32"),
                                              ("general.name", "seed", "str")],
          moe_layer(0, 8, 4, 4, Q.F32, aux=False))
    # accepted: a dense model, no experts at all
    write(p("dense"), "llama", hparams("llama", 1, None, None), common + dense)
    # accepted: no tensors
    write(p("empty"), "llama", hparams("llama", 1, 8, 2), [])

    # refused: layer beyond block_count
    write(p("bad_layer"), "qwen3moe", hparams("qwen3moe", 1, 4, 2), moe_layer(3, 8, 4, 4))
    # refused: experts disagree on the count
    write(p("bad_expert_mismatch"), "qwen3moe", hparams("qwen3moe", 2, 4, 2),
          moe_layer(0, 8, 4, 4, Q.F32) + moe_layer(1, 8, 4, 2, Q.F32))
    # refused: expert_count key disagrees with the tensors
    write(p("bad_expert_count_key"), "qwen3moe", hparams("qwen3moe", 1, 8, 2), moe_layer(0, 8, 4, 4, Q.F32))
    # refused: expert_used_count missing / larger than expert_count
    write(p("bad_no_used"), "qwen3moe", hparams("qwen3moe", 1, 4, None), moe_layer(0, 8, 4, 4, Q.F32))
    write(p("bad_used_too_big"), "qwen3moe", hparams("qwen3moe", 1, 4, 9), moe_layer(0, 8, 4, 4, Q.F32))
    # refused: a block without its down experts
    write(p("bad_incomplete"), "qwen3moe", hparams("qwen3moe", 1, 4, 2),
          moe_layer(0, 8, 4, 4, Q.F32, roles=("gate", "up")))
    # refused: tensor data cut short
    write(p("bad_truncated"), "qwen3moe", hparams("qwen3moe", 1, 4, 2), moe_layer(0, 8, 4, 4, Q.F32), truncate=40)

    if len(sys.argv) <= 1:
        handmade_regressions(HERE / "regressions" / "model_layout")

    total = sum(f.stat().st_size for f in out.glob("*.gguf"))
    print(f"{len(list(out.glob('*.gguf')))} seeds, {total} bytes, largest "
          f"{max(f.stat().st_size for f in out.glob('*.gguf'))} bytes in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
