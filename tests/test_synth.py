import hashlib
import os

import gguf
import numpy as np
import pytest

from conftest import N_THREADS, TINY, needs_cache, needs_llama
from edgemoe.shapes import SHAPES, synth_config
from edgemoe.synth import SynthConfig, write_model
from edgemoe.synth_fill import RANDOM_TYPES


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


# -- fast random data -----------------------------------------------------------------


@pytest.mark.parametrize("qtype", sorted(RANDOM_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_random_rows_have_the_asked_spread(qtype):
    """Blocks built from random bits must dequantize to mean 0 and the requested std."""
    from edgemoe.synth_fill import random_rows, row_bytes

    rows = random_rows(qtype, 32, 1024, 0.02, np.random.PCG64(3))
    assert rows.flags.c_contiguous and rows.nbytes == 32 * row_bytes(qtype, 1024)
    raw = rows.view(np.uint8).reshape(32, -1)
    if qtype == gguf.GGMLQuantizationType.F32:
        values = rows
    elif qtype == gguf.GGMLQuantizationType.F16:
        values = rows.astype(np.float32)
    else:
        values = gguf.quants.dequantize(raw, qtype)
    assert values.shape == (32, 1024)
    assert abs(float(values.mean())) < 0.02 * 0.02
    assert 0.019 < float(values.std()) < 0.021
    # the same generator state gives the same bytes
    assert np.array_equal(random_rows(qtype, 32, 1024, 0.02, np.random.PCG64(3)), rows)


def test_same_bytes_whatever_the_thread_count(tmp_path, gpt2_vocab):
    cfg = _small(gpt2_vocab, n_layer=2, n_embd=256, n_ff_exp=512, n_expert=8, expert_type="Q4_0",
                 weight_type="Q8_0", seed=11)
    a = write_model(tmp_path / "a.gguf", cfg, n_threads=1)
    b = write_model(tmp_path / "b.gguf", cfg, n_threads=3)
    assert _sha(a.path) == _sha(b.path)


def test_interrupted_write_leaves_nothing(tmp_path, gpt2_vocab):
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_model(tmp_path / "x.gguf", _small(gpt2_vocab), progress=progress)
    assert os.listdir(tmp_path) == []


def test_rows_must_hold_whole_blocks(tmp_path, gpt2_vocab):
    with pytest.raises(ValueError, match="Q4_K"):
        write_model(tmp_path / "x.gguf", _small(gpt2_vocab, expert_type="Q4_K"))  # rows of 64, blocks of 256
    assert os.listdir(tmp_path) == []


# -- real shapes ----------------------------------------------------------------------

# (n_layer, n_embd, n_head, n_head_kv, n_ff_exp, n_expert, n_expert_used) of the config.json files
REAL = {
    "deepseek-v2-lite": (27, 2048, 16, 16, 1408, 64, 6),
    "qwen1.5-moe-a2.7b": (24, 2048, 16, 16, 1408, 60, 4),
    "qwen3-30b-a3b": (48, 2048, 32, 4, 768, 128, 8),
    "olmoe-1b-7b": (16, 2048, 16, 16, 1024, 64, 8),
    "mixtral-8x7b": (32, 4096, 32, 8, 14336, 8, 2),
}
TEST_SCALE = 0.05  # seconds per shape: 1-2 layers, the real vocabulary


def test_shapes_at_scale_one_are_the_real_models(tmp_path):
    assert set(SHAPES) == set(REAL)
    for name, real in REAL.items():
        cfg = synth_config(SHAPES[name], 1.0, vocab_dir=tmp_path)
        got = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.n_ff_exp, cfg.n_expert, cfg.n_expert_used)
        assert got == real, name
    ds = synth_config(SHAPES["deepseek-v2-lite"], 1.0, vocab_dir=tmp_path)
    assert (ds.n_dense_lead, ds.n_expert_shared, ds.kv_lora_rank, ds.n_embd_head, ds.n_rot, ds.n_embd_head_v,
            ds.n_ff) == (1, 2, 512, 192, 64, 128, 10944)
    assert synth_config(SHAPES["qwen1.5-moe-a2.7b"], 1.0, vocab_dir=tmp_path).n_ff == 5632  # shared expert
    assert synth_config(SHAPES["qwen3-30b-a3b"], 1.0, vocab_dir=tmp_path).n_embd_head == 128
    mix = synth_config(SHAPES["mixtral-8x7b"], 1.0, vocab_dir=tmp_path)
    assert mix.arch == "llama" and mix.is_moe


def test_scale_rule(tmp_path):
    q = synth_config(SHAPES["qwen3-30b-a3b"], 0.5, vocab_dir=tmp_path)
    # layers x 0.5; 16 heads in groups of 8 (kept); n_embd / n_head and head_dim kept
    assert (q.n_layer, q.n_head, q.n_head_kv, q.n_embd, q.n_embd_head, q.n_ff_exp) == (24, 16, 2, 1024, 128, 384)
    assert (q.n_expert, q.n_expert_used) == (128, 8)
    tiny = synth_config(SHAPES["qwen3-30b-a3b"], 0.01, vocab_dir=tmp_path)
    # fewer heads than a group: one KV head; widths at least one quant block
    assert (tiny.n_layer, tiny.n_head, tiny.n_head_kv, tiny.n_embd, tiny.n_ff_exp) == (1, 1, 1, 64, 32)
    ds = synth_config(SHAPES["deepseek-v2-lite"], 0.01, vocab_dir=tmp_path)
    assert ds.n_layer == 2 and ds.n_dense_lead == 1  # the dense layer plus one MoE layer
    assert (ds.n_embd_head, ds.n_rot, ds.n_embd_head_v, ds.kv_lora_rank) == (192, 64, 128, 32)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError):
            synth_config(SHAPES["olmoe-1b-7b"], bad, vocab_dir=tmp_path)


def test_full_size_expert_bytes(tmp_path, qwen2_vocab):
    """At scale 1 the expert tensors have the real models' sizes (Q4_0: 18 bytes per 32 weights)."""
    from edgemoe.synth import plan

    cfg = synth_config(SHAPES["qwen3-30b-a3b"], 1.0, vocab_dir=qwen2_vocab.parent)
    _, specs = plan(cfg)
    experts = sum(s.nbytes for s in specs if s.name.endswith("_exps.weight"))
    assert experts == 48 * 128 * 3 * 2048 * 768 // 32 * 18


@pytest.fixture(scope="module")
def shape_models(tmp_path_factory):
    """(name, expert type) -> path of each shape at TEST_SCALE, with F16 experts and with the
    shape's default type."""
    from conftest import _vocab

    out = {}
    d = tmp_path_factory.mktemp("shapes")
    for name, shape in SHAPES.items():
        vocab = _vocab(shape.vocab)
        for et in ("F16", shape.expert_type):
            cfg = synth_config(shape, TEST_SCALE, vocab_dir=vocab.parent, seed=5, expert_type=et)
            out[name, et] = write_model(d / f"{name}-{et}.gguf", cfg).path
    return out


def _forced_run(path, cache, tokens):
    """Logits of a prefill and of single-token steps over fixed tokens (no sampling, so a
    rounding difference cannot change the path)."""
    from edgemoe.engine import Engine

    with Engine(path, expert_cache=cache, n_ctx=128, n_threads=N_THREADS) as e:
        out = [e.eval(tokens[:24])] + [e.eval([t]) for t in tokens[24:]]
        return np.concatenate(out), e.stats()


@needs_cache
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_runs_bit_identical_with_the_cache(shape_models, name):
    """Every shape loads and runs in the patched llama.cpp; the cache changes no logit."""
    from edgemoe.info import describe

    path = shape_models[name, "F16"]
    report = describe(path)
    assert report.n_expert == SHAPES[name].n_expert and report.n_expert_used == SHAPES[name].n_expert_used
    tokens = np.random.default_rng(1).integers(100, 30000, 40).tolist()
    off, _ = _forced_run(path, None, tokens)
    on, stats = _forced_run(path, "50%", tokens)
    assert np.isfinite(off).all()
    assert 0.5 < off.std() < 10
    assert len(set(off.argmax(axis=1).tolist())) > 5
    assert np.array_equal(off, on)
    assert stats.misses > 0 and stats.hits + stats.misses == len(tokens) * report.n_expert_used * report.n_moe_layer


@needs_cache
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_default_types_run_with_the_cache(shape_models, name):
    """The default (Q4_0) experts: where ggml repacks Q4_0 for its AVX2/NEON kernels, the pools
    hold repacked slots too (tests/test_repack.py), so the logits are bit-identical."""
    path = shape_models[name, SHAPES[name].expert_type]
    tokens = np.random.default_rng(2).integers(100, 30000, 40).tolist()
    off, _ = _forced_run(path, None, tokens)
    on, stats = _forced_run(path, "50%", tokens)
    assert np.isfinite(off).all()
    assert np.array_equal(off, on)
    assert stats.misses > 0


# -- the command ----------------------------------------------------------------------


def _cli(capsys, *args):
    from edgemoe.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_command(tmp_path, capsys, gpt2_vocab):
    from conftest import _vocab

    vocab = _vocab("ggml-vocab-gpt-neox.gguf")
    out = tmp_path / "m.gguf"
    code, stdout, err = _cli(capsys, "synth", "--shape", "olmoe-1b-7b", "--scale", "0.05", "-o", str(out),
                             "--expert-type", "q8_0", "--seed", "3", "--vocab", str(vocab))
    assert code == 0, err
    assert "wrote" in stdout and "olmoe" in stdout
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == "olmoe"
    gate = next(t for t in r.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert gate.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert r.alignment == 4096
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


@pytest.mark.parametrize("args, needle", [
    (["--shape", "gpt-5", "-o", "{out}"], "unknown shape"),
    (["--shape", "olmoe-1b-7b", "--scale", "0", "-o", "{out}"], "scale"),
    (["--shape", "olmoe-1b-7b", "--scale", "1.5", "-o", "{out}"], "scale"),
    (["--shape", "olmoe-1b-7b", "--scale", "0.05", "-o", "{dir}"], "directory"),
    (["--shape", "olmoe-1b-7b", "--scale", "0.05", "-o", "{missing}/m.gguf"], "cannot write"),
    (["--shape", "olmoe-1b-7b", "--scale", "0.05", "--vocab", "{missing}/v.gguf", "-o", "{out}"], "vocab"),
    (["--shape", "qwen3-30b-a3b", "--scale", "0.05", "--expert-type", "Q4_K", "-o", "{out}"], "q4_k"),
    (["--shape", "olmoe-1b-7b", "--expert-type", "Q3_K", "-o", "{out}"], "expert-type"),
    (["-o", "{out}"], "--shape"),
    (["--shape", "olmoe-1b-7b", "--scale", "0.05", "--vocab", "{text}", "-o", "{out}"], "not a gguf"),
    (["--shape", "olmoe-1b-7b", "--scale", "0.05", "--vocab", "{vocab}", "-o", "{vocab}"], "vocab file"),
])
def test_synth_bad_input(tmp_path, capsys, qwen2_vocab, args, needle):
    from conftest import _vocab

    _vocab("ggml-vocab-gpt-neox.gguf")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("not a vocab\n")
    vocab = inputs / "v.gguf"
    vocab.write_bytes(_vocab("ggml-vocab-gpt-neox.gguf").read_bytes())
    before = vocab.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    subs = dict(out=str(out_dir / "m.gguf"), dir=str(out_dir), missing=str(tmp_path / "nope"),
                text=str(inputs / "notes.txt"), vocab=str(vocab))
    code, stdout, err = _cli(capsys, "synth", *[a.format(**subs) for a in args])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error: "), err
    assert needle in lines[0].lower()
    assert os.listdir(out_dir) == [] and sorted(os.listdir(inputs)) == ["notes.txt", "v.gguf"]
    assert vocab.read_bytes() == before


def test_synth_list(capsys):
    from conftest import _vocab

    for shape in SHAPES.values():
        _vocab(shape.vocab)
    code, out, err = _cli(capsys, "synth", "--list", "--scale", "0.05")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(SHAPES)
    assert "deepseek2, 2 layers (1 MoE)" in out and "128 experts (top-8)" in out
