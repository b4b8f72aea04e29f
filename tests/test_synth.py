import hashlib
import os

import gguf
import numpy as np
import pytest

from conftest import N_THREADS, TINY, needs_cache, needs_llama
from edgemoe.synth import SynthConfig, write_model


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small(vocab, **kw):
    base = dict(arch="qwen3moe", vocab=str(vocab), n_layer=1, n_embd=64, n_ff=64, n_ff_exp=32,
                n_expert=4, n_expert_used=2, n_head=4, n_head_kv=2)
    base.update(kw)
    return SynthConfig(**base)


def test_deterministic(tmp_path, gpt2_vocab):
    a = write_model(tmp_path / "a.gguf", _small(gpt2_vocab, seed=7))
    b = write_model(tmp_path / "b.gguf", _small(gpt2_vocab, seed=7))
    c = write_model(tmp_path / "c.gguf", _small(gpt2_vocab, seed=8))
    assert _sha(a.path) == _sha(b.path) != _sha(c.path)
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf", "c.gguf"]  # no temp files left


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "olmoe", "qwen3", "llama"])
def test_layout(tmp_path, gpt2_vocab, arch):
    kw = dict(n_head_kv=4) if arch == "olmoe" else {}
    res = write_model(tmp_path / "m.gguf", _small(gpt2_vocab, arch=arch, **kw))
    r = gguf.GGUFReader(res.path)
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields[f"{arch}.block_count"].contents() == 1
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == res.n_vocab == 50257
    names = {t.name for t in r.tensors}
    assert names == set(res.tensors)
    exps = {n for n in names if n.endswith("_exps.weight")}
    if arch in ("qwen3", "llama"):
        assert not exps and res.expert_bytes == 0
    else:
        assert exps == {f"blk.0.ffn_{r}_exps.weight" for r in ("gate", "up", "down")}
        assert r.fields[f"{arch}.expert_count"].contents() == 4
        assert res.expert_bytes == sum(t.n_bytes for t in r.tensors if t.name in exps)
    if arch == "qwen2moe":
        assert {"blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_up_shexp.weight"} <= names


def test_alignment_and_quantized_experts(tmp_path, gpt2_vocab):
    res = write_model(tmp_path / "q.gguf", _small(gpt2_vocab, expert_type="Q8_0", alignment=4096))
    r = gguf.GGUFReader(res.path)
    assert r.alignment == 4096
    for t in r.tensors:
        assert t.data_offset % 4096 == 0, t.name
    gate = next(t for t in r.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert gate.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(gate.shape) == [64, 32, 4]  # ggml order: n_embd, n_ff_exp, n_expert


def test_invalid_config_writes_nothing(tmp_path, gpt2_vocab):
    with pytest.raises(ValueError):
        write_model(tmp_path / "x.gguf", _small(gpt2_vocab, arch="olmoe", n_head_kv=2))
    with pytest.raises(ValueError):
        write_model(tmp_path / "x.gguf", _small(gpt2_vocab, expert_type="Q8_0", n_embd=48, n_head=4))
    assert os.listdir(tmp_path) == []


@needs_llama
@pytest.mark.parametrize("arch", sorted(TINY))
def test_loads_with_finite_distinct_logits(tiny_models, arch):
    from edgemoe.engine import Engine

    with Engine(tiny_models[arch], n_ctx=128, n_threads=N_THREADS) as e:
        logits = e.eval(e.tokenize("The quick brown fox jumps over the lazy dog"))
    assert np.isfinite(logits).all()
    assert 0.5 < logits.std() < 10
    assert len(set(logits.argmax(axis=1).tolist())) > 3  # not one token everywhere


@needs_cache
@pytest.mark.parametrize("arch", sorted(TINY))
def test_routes_vary(tiny_models, arch):
    """Random weights must still spread the tokens over the experts, or cache tests mean little."""
    from edgemoe.engine import Engine
    from edgemoe.routes import RouteRecorder

    rec = RouteRecorder()
    with Engine(tiny_models[arch], n_ctx=128, n_threads=N_THREADS, route_recorder=rec) as e:
        e.eval(list(range(100, 164)))
    rows = rec.rows()
    k, n_expert = TINY[arch]["n_expert_used"], TINY[arch]["n_expert"]
    assert rec.k == k and rows.shape == (64 * TINY[arch]["n_layer"], 2 + k)
    for layer in range(TINY[arch]["n_layer"]):
        ids = rows[rows[:, 0] == layer, 2:]
        counts = np.bincount(ids.ravel(), minlength=n_expert)
        assert (counts > 0).sum() >= n_expert - 1, counts
        assert len({tuple(sorted(r)) for r in ids.tolist()}) >= 5
