"""`edgemoe convert` from Hugging Face checkpoints: logits against transformers, tokenizer,
checkpoint layouts, requantization, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, assert_one_line_error, needs_cache
from hf_checkpoints import ARCHS, TEXT, write_checkpoint

pytestmark = needs_cache

# token ids inside every tiny tokenizer's range
PROMPT = [5, 17, 42, 99, 123, 7, 250, 3, 64, 201, 11, 12, 180, 33, 2, 90]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: write_checkpoint(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    from edgemoe.convert import convert

    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, d in checkpoints.items():
        out[arch] = root / f"{arch}.gguf"
        convert(d, out[arch], outtype="f32")
    return out


def _torch_logits(directory, tokens):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _logits(path, tokens, **kw):
    from edgemoe.engine import Engine

    with Engine(path, n_threads=N_THREADS, n_ctx=128, kv_type="f32", **kw) as e:
        return e.eval(tokens)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(arch, checkpoints, converted):
    ref = _torch_logits(checkpoints[arch], PROMPT)
    got = _logits(converted[arch], PROMPT)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 0.5  # logits spread: the comparison means something
    assert float(np.abs(got - ref).max()) < 1e-3 * scale
    # the converted model also runs under the expert cache, bit-identically
    assert np.array_equal(_logits(converted[arch], PROMPT, expert_cache="50%"), got)


def test_tokenizer_matches_reference(checkpoints, converted):
    from tokenizers import Tokenizer

    from edgemoe.engine import Engine

    ref = Tokenizer.from_file(str(checkpoints["qwen3_moe"] / "tokenizer.json"))
    text = TEXT + "  Spaces,\n\nnew lines; 'quoted' it's ünïcödé 3.14159!"
    with Engine(converted["qwen3_moe"], n_ctx=128) as e:
        assert e.tokenize(text, add_special=False) == ref.encode(text).ids


def _tensors(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: (int(t.tensor_type), bytes(np.asarray(t.data).tobytes())) for t in r.tensors}


def test_fused_expert_layout_gives_the_same_file_contents(tmp_path, checkpoints, converted):
    from edgemoe.convert import convert

    fused = write_checkpoint(tmp_path / "fused", "qwen3_moe", seed=0, fused=True)
    out = tmp_path / "fused.gguf"
    convert(fused, out, outtype="f32")
    assert _tensors(out) == _tensors(converted["qwen3_moe"])


def test_bf16_checkpoint_keeps_bf16(tmp_path):
    import gguf

    from edgemoe.convert import convert

    d = write_checkpoint(tmp_path / "bf16", "qwen3_moe", seed=3, dtype="bfloat16")
    out = tmp_path / "bf16.gguf"
    convert(d, out)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32  # routing stays exact
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    logits = _logits(out, PROMPT)
    ref = _torch_logits(d, PROMPT)  # bf16 weights widened to f32 in torch too
    assert float(np.abs(logits - ref).max()) < 1e-2 * float(np.abs(ref).max())


def test_quantized_outtype_goes_through_llama_cpp(tmp_path, checkpoints):
    import gguf

    from edgemoe.convert import convert

    out = tmp_path / "q8.gguf"
    convert(checkpoints["qwen2_moe"], out, outtype="q8_0")
    r = gguf.GGUFReader(str(out))
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in r.tensors}
    assert types["blk.1.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert int(r.fields["general.alignment"].contents()) == 4096
    ref = _torch_logits(checkpoints["qwen2_moe"], PROMPT)
    got = _logits(out, PROMPT)
    # 8-bit weights: close per token (routing may flip where two experts nearly tie)
    assert min(np.corrcoef(g, r)[0, 1] for g, r in zip(got, ref)) > 0.99
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9
    assert np.array_equal(_logits(out, PROMPT, expert_cache="50%"), got)


def test_sharded_checkpoint_with_index(tmp_path, checkpoints, converted):
    """Shards listed in model.safetensors.index.json are read as one checkpoint."""
    from safetensors.numpy import load_file, save_file

    from edgemoe.convert import convert

    src = checkpoints["olmoe"]
    d = tmp_path / "sharded"
    d.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (d / name).write_bytes((src / name).read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, str(d / shard))
        weight_map.update({n: shard for n in ns})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "sharded.gguf"
    convert(d, out, outtype="f32")
    assert _tensors(out) == _tensors(converted["olmoe"])


# --- refusals, through the CLI --------------------------------------------------------------

def _convert_cli(args, env):
    return subprocess.run([sys.executable, "-m", "edgemoe", "convert", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _assert_refused(proc, out_dir, needle):
    assert_one_line_error(proc, needle)
    assert not [p for p in os.listdir(out_dir) if p.endswith(".gguf") or p.endswith(".tmp")], os.listdir(out_dir)


def _copy_checkpoint(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_unsupported_architecture(tmp_path, checkpoints, edgemoe_env):
    d = _copy_checkpoint(checkpoints["qwen3_moe"], tmp_path / "src")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_refused(_convert_cli([str(d), "-o", str(out_dir / "m.gguf")], edgemoe_env), out_dir,
                    "unsupported architecture")


def test_missing_shard(tmp_path, checkpoints, edgemoe_env):
    d = _copy_checkpoint(checkpoints["qwen3_moe"], tmp_path / "src")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    from safetensors.numpy import load_file

    names = load_file(str(d / "model-00001-of-00002.safetensors"))
    wm = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
          for i, n in enumerate(sorted(names))}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_refused(_convert_cli([str(d), "-o", str(out_dir / "m.gguf")], edgemoe_env), out_dir, "missing")


def test_corrupt_safetensors_header(tmp_path, checkpoints, edgemoe_env):
    d = _copy_checkpoint(checkpoints["qwen3_moe"], tmp_path / "src")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"{{{{ not json at all ]]]]]]]]]]]"
    (d / "model.safetensors").write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_refused(_convert_cli([str(d), "-o", str(out_dir / "m.gguf")], edgemoe_env), out_dir, "corrupt")


def test_interrupted_conversion_leaves_nothing(tmp_path, checkpoints, monkeypatch):
    """Ctrl-C (or any failure) midway: no OUT, no temporary file."""
    from edgemoe.convert import convert
    from edgemoe.convert import writer

    real = writer.encode
    calls = {"n": 0}

    def interrupted(data, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(data, qtype)

    monkeypatch.setattr(writer, "encode", interrupted)
    import edgemoe.convert.hf as hf

    monkeypatch.setattr(hf, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoints["qwen3_moe"], tmp_path / "m.gguf", outtype="f32")
    assert os.listdir(tmp_path) == []
