"""`edgemoe inflate`: a small inflation of the default model keeps keys, types, alignment,
routes and logits; --size picks a page-friendly width; bad input is refused whole."""

from __future__ import annotations

import filecmp
import os
import pathlib
import shutil

import gguf
import numpy as np
import pytest

from conftest import N_THREADS, REPO, assert_one_line_error_of, needs_cache
from edgemoe.gguf_header import read_header
from edgemoe.inflate import PREFIX, inflate
from edgemoe.info import describe

DEFAULT = REPO / "models" / "edgemoe-tiny-q8_0.gguf"   # qwen3moe, 64 experts, n_ff 32, Q8_0
HELDOUT = REPO / "models" / "corpus" / "heldout.txt"
N_FF = 128
N_TOKENS = 256   # a held-out snippet: two windows of the context below
N_CTX = 128


@pytest.fixture(scope="module")
def inflated(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("inflate") / "tiny-inflated.gguf"
    result = inflate(DEFAULT, out, expert_ff=N_FF, seed=7)
    assert (result.source_expert_ff, result.expert_ff, result.fill, result.n_widened) == (32, N_FF, "random", 24)
    assert result.size_bytes == os.path.getsize(out)
    return out


def _cli(capsys, *args):
    from edgemoe.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _data(h, t) -> np.ndarray:
    return np.memmap(h.path, dtype=np.uint8, mode="r", offset=h.data_offset + t.offset, shape=(t.nbytes,))


# -- the file -------------------------------------------------------------------------------


def test_keys_types_and_untouched_tensors(inflated):
    src, out = read_header(DEFAULT), read_header(inflated)
    widened = {k: v for k, v in out.kv.items() if k.startswith(PREFIX)}
    assert widened == {PREFIX + "source_expert_ff": 32, PREFIX + "expert_ff": N_FF, PREFIX + "seed": 7,
                       PREFIX + "fill": "random", PREFIX + "source_name": DEFAULT.name,
                       PREFIX + "source_bytes": os.path.getsize(DEFAULT),
                       PREFIX + "source_sha256": widened[PREFIX + "source_sha256"]}
    assert len(widened[PREFIX + "source_sha256"]) == 64
    kept = {k: v for k, v in out.kv.items() if not k.startswith(PREFIX)}
    assert kept == {**src.kv, "qwen3moe.expert_feed_forward_length": N_FF}
    assert kept.keys() == src.kv.keys() and out.kv_types["qwen3moe.expert_feed_forward_length"] == \
        src.kv_types["qwen3moe.expert_feed_forward_length"]
    assert out.alignment == 4096
    assert [(t.name, t.qtype) for t in out.tensors] == [(t.name, t.qtype) for t in src.tensors]
    for s, o in zip(src.tensors, out.tensors):
        if "_exps." in s.name:
            assert o.ne == ((384, N_FF, 64) if "down" not in s.name else (N_FF, 384, 64)), o.name
        else:
            assert o.ne == s.ne and np.array_equal(_data(src, s), _data(out, o)), o.name


def test_expert_rows_kept_new_rows_random_new_columns_zero(inflated):
    src, out = read_header(DEFAULT), read_header(inflated)
    s_t = {t.name: t for t in src.tensors}
    for o in out.tensors:
        if not o.name.startswith("blk.3."):
            continue
        s = s_t[o.name]
        if o.name.endswith("ffn_down_exps.weight"):       # rows of 1 -> 4 Q8_0 blocks
            a, b = _data(src, s).reshape(64, 384, 34), _data(out, o).reshape(64, 384, 4 * 34)
            assert np.array_equal(b[:, :, :34], a) and not b[:, :, 34:].any()
        elif "_exps." in o.name:
            a, b = _data(src, s).reshape(64, 32, 408), _data(out, o).reshape(64, N_FF, 408)
            assert np.array_equal(b[:, :32], a)
            new = gguf.quants.dequantize(np.ascontiguousarray(b[:, 32:]), gguf.GGMLQuantizationType.Q8_0)
            old = gguf.quants.dequantize(np.ascontiguousarray(a), gguf.GGMLQuantizationType.Q8_0)
            assert np.isfinite(new).all() and 0.3 < new.std() / old.std() < 3
            assert not np.array_equal(b[0, 32:], b[1, 32:])   # each expert its own rows


def test_info_shows_the_inflation_and_aligned_tensors(inflated, capsys):
    r = describe(inflated)
    assert r.inflate["expert_ff"] == N_FF and r.inflate["source_expert_ff"] == 32 and r.inflate["seed"] == 7
    assert r.misaligned_offsets == [] and r.pools[0].roles["gate"].shape == (384, N_FF)
    assert describe(DEFAULT).inflate is None
    code, out, _ = _cli(capsys, "info", inflated)
    assert code == 0 and f"expert FFN 32 -> {N_FF} (random fill, seed 7) from {DEFAULT.name}" in out
    code, out, _ = _cli(capsys, "info", inflated, "--json")
    import json

    assert code == 0 and json.loads(out)["inflate"]["expert_ff"] == N_FF


def test_same_seed_same_bytes_other_seed_other_rows(inflated, tmp_path, capsys):
    again = tmp_path / "again.gguf"
    code, _, err = _cli(capsys, "inflate", DEFAULT, "-o", again, "--expert-ff", N_FF, "--seed", 7)
    assert code == 0 and f"expert FFN width {N_FF}" in err and "not whole 4096-byte pages" in err
    assert filecmp.cmp(again, inflated, shallow=False)
    other = tmp_path / "other.gguf"
    inflate(DEFAULT, other, expert_ff=N_FF, seed=8)
    assert not filecmp.cmp(other, inflated, shallow=False)


def test_q8_0_rows_are_gguf_s_own_quantization():
    from gguf import GGMLQuantizationType as QType

    from edgemoe.inflate import _quantize

    x = np.random.default_rng(3).standard_normal((96, 384)).astype(np.float32)
    x[5] = 0.0  # a zero block: scale 0
    x[7, :32] *= 1e4
    assert np.array_equal(_quantize(x, QType.Q8_0), gguf.quants.quantize(x, QType.Q8_0))


@pytest.mark.parametrize("threads", [1, 5])
def test_threads_do_not_change_the_bytes(inflated, tmp_path, capsys, threads):
    """Tensors filled on several threads (the fixture: this machine's CPUs) are the bytes one
    thread writes: each tensor's rows come from its own seeded generator."""
    again = tmp_path / "again.gguf"
    code, _, err = _cli(capsys, "inflate", DEFAULT, "-o", again, "--expert-ff", N_FF, "--seed", 7, "-t", threads)
    assert code == 0, err
    assert filecmp.cmp(again, inflated, shallow=False)


# -- the model ----------------------------------------------------------------------------


def _logits_and_routes(path, tokens, cache=None):
    from edgemoe.engine import Engine
    from edgemoe.routes import RouteRecorder
    from edgemoe.trace import routes_from_rows

    rec = RouteRecorder()
    try:
        logits = []
        with Engine(path, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=N_THREADS, expert_cache=cache,
                    route_recorder=rec) as e:
            for start in range(0, len(tokens), N_CTX):
                e.reset()
                logits.append(np.array(e.eval(tokens[start:start + N_CTX])))
        experts, _ = routes_from_rows(rec.rows(), len(tokens))
    finally:
        rec.close()
    return np.concatenate(logits), experts


@needs_cache
def test_routes_and_logits_are_the_sources(inflated):
    from edgemoe.engine import Engine

    with Engine(DEFAULT, n_ctx=64, n_threads=N_THREADS) as e:
        tokens = e.tokenize(HELDOUT.read_text(encoding="utf-8")[:4000], add_special=False)[:N_TOKENS]
    assert len(tokens) == N_TOKENS
    ref_logits, ref_routes = _logits_and_routes(DEFAULT, tokens)
    logits, routes = _logits_and_routes(inflated, tokens)
    # the added products are exact zeros: the same expert sets, the same logits bit for bit
    same_sets = (np.sort(routes, axis=2) == np.sort(ref_routes, axis=2)).all(axis=2)
    assert same_sets.mean() >= 0.999 and same_sets.all()
    assert np.array_equal(logits, ref_logits)
    cached, cached_routes = _logits_and_routes(inflated, tokens, cache="25%")
    assert np.array_equal(cached, ref_logits) and np.array_equal(cached_routes, ref_routes)


# -- --size, other layouts ----------------------------------------------------------------------


class _Stop(Exception):
    pass


def _choice(src, out, size):
    """(N, bytes) that --size picks, without writing."""
    seen = []

    def stop(n_ff, nbytes, page_step):
        seen.append((n_ff, nbytes, page_step))
        raise _Stop

    with pytest.raises(_Stop):
        inflate(src, out, size=size, on_choice=stop)
    assert os.listdir(os.path.dirname(out)) == []   # not even the header's dry run is left
    return seen[0]


def test_size_picks_the_smallest_page_whole_width(tmp_path):
    out = str(tmp_path / "out.gguf")
    n_ff, nbytes, step = _choice(DEFAULT, out, 3_500_000_000)
    # Q8_0 rows of 384 (408 B): multiples of 512 make every slice whole 4 KiB pages
    assert step == 512 and n_ff == 5632 and nbytes >= 3_500_000_000
    bigger = _choice(DEFAULT, out, nbytes + 1)
    assert bigger[0] == n_ff + step
    grow = bigger[1] - nbytes       # bytes per step of the width: n_ff - step gives nbytes - grow
    assert _choice(DEFAULT, out, nbytes - grow + 1)[:2] == (n_ff, nbytes)
    assert _choice(DEFAULT, out, 1)[0] == step     # below the source: the smallest width above it


def _gguf(path, arch, keys, tensors):
    """A GGUF by hand: only inflated and described here, never loaded."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        w.add_uint32(f"{arch}.{key}", value)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_size_on_a_float_olmoe_writes_what_it_says(tmp_path, capsys):
    # olmoe keeps the expert width in feed_forward_length; F32 experts with rows of 64
    rng = np.random.default_rng(1)
    src = tmp_path / "olmoe.gguf"
    layers = {}
    for il in range(2):
        layers[f"blk.{il}.attn_q.weight"] = rng.standard_normal((64, 64)).astype(np.float32)
        for role in ("gate", "up", "down"):
            layers[f"blk.{il}.ffn_{role}_exps.weight"] = rng.standard_normal((8, 64, 64)).astype(np.float32)
    _gguf(src, "olmoe", {"feed_forward_length": 64, "expert_count": 8, "expert_used_count": 2}, layers)
    out = tmp_path / "olmoe-big.gguf"
    code, _, err = _cli(capsys, "inflate", src, "-o", out, "--size", "3MiB")
    assert code == 0, err
    assert os.path.getsize(out) >= 3 << 20 and f"{os.path.getsize(out):,} bytes" in err
    r = describe(out)
    n_ff = r.inflate["expert_ff"]
    # slices of 256 B per row: widths in steps of 16 make whole pages
    assert n_ff % 16 == 0 and r.slices_aligned and read_header(out).kv["olmoe.feed_forward_length"] == n_ff
    assert r.pools[0].roles["down"].shape == (n_ff, 64)
    assert describe(src).file_bytes < 3 << 20 <= r.file_bytes


def _fused_gguf(path):
    """Fused gate_up experts with biases, F16."""
    rng = np.random.default_rng(0)
    tensors = {"blk.0.ffn_gate_up_exps.weight": rng.standard_normal((2, 8, 32)).astype(np.float16),
               "blk.0.ffn_gate_up_exps.bias": rng.standard_normal((2, 8)).astype(np.float32),
               "blk.0.ffn_down_exps.weight": rng.standard_normal((2, 32, 4)).astype(np.float16),
               "blk.0.ffn_down_exps.bias": rng.standard_normal((2, 32)).astype(np.float32)}
    _gguf(path, "qwen3moe", {"expert_feed_forward_length": 4, "expert_count": 2, "expert_used_count": 1}, tensors)
    return tensors


def test_fused_gate_up_widens_both_halves_and_biases(tmp_path):
    src = tmp_path / "fused.gguf"
    before = _fused_gguf(src)
    out = tmp_path / "fused-big.gguf"
    inflate(src, out, expert_ff=10)
    r = gguf.GGUFReader(str(out))
    after = {t.name: np.asarray(t.data) for t in r.tensors}
    gu, gu0 = after["blk.0.ffn_gate_up_exps.weight"].reshape(2, 20, 32), before["blk.0.ffn_gate_up_exps.weight"]
    assert np.array_equal(gu[:, :4], gu0[:, :4]) and np.array_equal(gu[:, 10:14], gu0[:, 4:])
    assert np.isfinite(gu.astype(np.float32)).all() and gu[:, 4:10].any() and gu[:, 14:].any()
    bias = after["blk.0.ffn_gate_up_exps.bias"].reshape(2, 20)
    assert np.array_equal(bias[:, :4], before["blk.0.ffn_gate_up_exps.bias"][:, :4])
    assert np.array_equal(bias[:, 10:14], before["blk.0.ffn_gate_up_exps.bias"][:, 4:])
    assert not bias[:, 4:10].any() and not bias[:, 14:].any()
    down = after["blk.0.ffn_down_exps.weight"].reshape(2, 32, 10)
    assert np.array_equal(down[:, :, :4], before["blk.0.ffn_down_exps.weight"]) and not down[:, :, 4:].any()
    assert np.array_equal(after["blk.0.ffn_down_exps.bias"], before["blk.0.ffn_down_exps.bias"])
    assert r.fields["qwen3moe.expert_feed_forward_length"].contents() == 10


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    ([], ("exactly one of --size and --expert-ff",)),
    (["--size", "1GB", "--expert-ff", "64"], ("exactly one of --size and --expert-ff",)),
    (["--expert-ff", "100"], ("not a multiple of 32", "q8_0")),
    (["--expert-ff", "32"], ("above the source's expert width 32",)),
    (["--size", "25%"], ("must be bytes",)),
    (["--size", "off"], ("must be bytes",)),
    (["--size", "auto"], ("must be bytes",)),
    (["--size", "lots"], ("invalid --size",)),
    (["--expert-ff", "64", "--align", "1000"], ("power of two",)),
    (["--expert-ff", "64", "-t", "-1"], ("-t",)),
])
def test_bad_widths_are_refused_whole(tmp_path, capsys, args, needles):
    code, _, err = _cli(capsys, "inflate", DEFAULT, "-o", tmp_path / "out.gguf", *args)
    assert_one_line_error_of(code, err, *needles)
    assert os.listdir(tmp_path) == []


def test_bad_files_are_refused_whole(tmp_path, capsys):
    src = tmp_path / "src.gguf"
    shutil.copy(DEFAULT, src)
    dense_model = tmp_path / "dense.gguf"
    _gguf(dense_model, "qwen3", {"feed_forward_length": 64},
          {"blk.0.ffn_up.weight": np.zeros((64, 32), dtype=np.float32)})
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 100)
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    before = sorted(os.listdir(tmp_path))
    cases = [([src, "-o", src], ("is the source",)),
             ([src, "-o", link], ("is the source",)),
             ([garbage, "-o", tmp_path / "o1.gguf"], ("not a gguf",)),
             ([tmp_path / "missing.gguf", "-o", tmp_path / "o2.gguf"], ("no such file",)),
             ([dense_model, "-o", tmp_path / "o3.gguf"], ("no routed experts",)),
             ([src, "-o", tmp_path], ("is a directory",))]
    for args, needles in cases:
        code, _, err = _cli(capsys, "inflate", *args, "--expert-ff", 64)
        assert_one_line_error_of(code, err, *needles)
    assert sorted(os.listdir(tmp_path)) == before
    assert filecmp.cmp(src, DEFAULT, shallow=False)


def test_shared_experts_tied_to_the_expert_width_grow_by_zeros(tmp_path, gpt2_vocab):
    """deepseek2 (like bailingmoe, the Read-ME layout) sizes its shared expert as n_ff_exp x
    expert_shared_count: it must grow with the experts, and its zeros change no logit."""
    from edgemoe.engine import Engine
    from edgemoe.gguf_header import read_header
    from edgemoe.synth import SynthConfig, write_model

    src = tmp_path / "ds2.gguf"
    write_model(src, SynthConfig(vocab=str(gpt2_vocab), arch="deepseek2", n_layer=2, n_embd=64, n_ff=128,
                                 n_ff_exp=32, n_expert=8, n_expert_used=2, n_head=4, n_head_kv=4,
                                 n_expert_shared=2, kv_lora_rank=32, head_dim=48, rope_dim=16, seed=9))
    out = tmp_path / "ds2-wide.gguf"
    inflate(str(src), str(out), expert_ff=256)
    h = read_header(out, string_arrays=False)
    shapes = {t.name: t.ne for t in h.tensors}
    # 2 shared experts of 32 fit one of 256: the count shrinks, so the zeros cost 256, not 512
    assert h.get("deepseek2.expert_shared_count") == 1
    assert shapes["blk.1.ffn_up_shexp.weight"] == (64, 256)
    assert shapes["blk.1.ffn_down_shexp.weight"] == (256, 64)
    tokens = np.random.default_rng(0).integers(0, 50257, 16).tolist()
    logits = []
    for path in (src, out):
        with Engine(path, n_ctx=64, n_threads=N_THREADS, kv_type="f32") as e:
            logits.append(e.eval(tokens))
    assert np.array_equal(logits[1], logits[0])


def test_negative_threads_are_refused_before_writing(tmp_path):
    from edgemoe.errors import ConvertError

    with pytest.raises(ConvertError, match="--threads -1"):
        inflate(DEFAULT, tmp_path / "out.gguf", expert_ff=64, threads=-1)
    assert os.listdir(tmp_path) == []
