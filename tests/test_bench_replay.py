"""Route replay (trace -> a larger model's layers and experts) and the GGUF expert layout."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_llama
from edgemoe.bench.replay import RouteReplay, map_ids
from edgemoe.errors import EdgemoeIOError, ModelFormatError
from edgemoe.trace import Trace, load_trace


def _random_ids(n_tokens, n_expert, k, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_expert)[:k] for _ in range(n_tokens)]).astype(np.int32)


@pytest.mark.parametrize("n_t,k_t,n,k", [(32, 4, 64, 8), (64, 8, 64, 8), (8, 2, 64, 8), (60, 4, 64, 6),
                                         (128, 8, 64, 8), (16, 4, 8, 2), (8, 2, 8, 8), (24, 3, 128, 8)])
def test_mapped_ids_are_distinct_and_in_range(n_t, k_t, n, k):
    ids = _random_ids(300, n_t, k_t)
    out = map_ids(ids, n_t, n, k)
    assert out.shape == (300, k) and out.dtype == np.int32
    assert out.min() >= 0 and out.max() < n
    assert all(len(set(row)) == k for row in out.tolist())
    assert np.array_equal(out, map_ids(ids, n_t, n, k))  # deterministic


def test_same_shape_is_identity():
    ids = _random_ids(50, 64, 8)
    assert np.array_equal(map_ids(ids, 64, 64, 8), ids)


def test_half_the_experts_twice_the_k_covers_every_expert_evenly():
    ids = _random_ids(2000, 32, 4, seed=3)
    out = map_ids(ids, 32, 64, 8)
    counts = np.bincount(out.ravel(), minlength=64)
    trace_counts = np.bincount(ids.ravel(), minlength=32)
    # expert 2e and 2e+1 are used exactly as often as trace expert e
    assert np.array_equal(counts[0::2], trace_counts) and np.array_equal(counts[1::2], trace_counts)


def test_locality_carries_over():
    """Tokens that share trace experts share model experts: the same set maps to the same set."""
    a = np.array([[3, 7, 1, 0]], dtype=np.int32)
    b = np.array([[7, 3, 0, 1]], dtype=np.int32)  # same set, other order
    assert set(map_ids(a, 32, 64, 8)[0]) == set(map_ids(b, 32, 64, 8)[0])


def _trace_file(path, ids, n_expert, **over):
    experts = ids
    fields = dict(experts=experts, layers=np.arange(experts.shape[1], dtype=np.int32),
                  tokens=np.arange(experts.shape[0], dtype=np.int32), n_expert=np.int32(n_expert),
                  model="tiny.gguf", format_version=np.int32(1))
    fields.update(over)
    fields = {k: v for k, v in fields.items() if v is not None}
    np.savez(path, **fields)
    return path


def test_replay_layers_wrap_and_tokens_wrap(tmp_path):
    experts = np.stack([_random_ids(10, 16, 2, seed=s) for s in range(3)], axis=1)  # [10, 3, 2]
    trace = load_trace(_trace_file(tmp_path / "t.npz", experts, 16))
    assert isinstance(trace, Trace) and trace.n_tokens == 10 and trace.k == 2 and trace.model == "tiny.gguf"
    replay = RouteReplay(trace, moe_layers=[1, 2, 4, 5, 7], n_expert=16, k=2)
    r = replay.routes(8, 4)  # tokens 8, 9, then 0, 1 of the trace
    assert sorted(r) == [1, 2, 4, 5, 7]
    assert np.array_equal(r[1], experts[[8, 9, 0, 1], 0])
    assert np.array_equal(r[5], experts[[8, 9, 0, 1], 0])  # 4th MoE layer -> trace layer 3 mod 3 = 0
    assert np.array_equal(r[7], experts[[8, 9, 0, 1], 1])
    assert all(v.flags["C_CONTIGUOUS"] and v.dtype == np.int32 for v in r.values())


@pytest.mark.parametrize("case", ["missing_file", "not_npz", "no_experts", "version", "out_of_range",
                                  "layers_mismatch", "flat"])
def test_bad_traces(tmp_path, case):
    path = tmp_path / "t.npz"
    experts = _random_ids(5, 8, 2)[:, None, :]
    if case == "missing_file":
        with pytest.raises(EdgemoeIOError):
            load_trace(tmp_path / "none.npz")
        return
    if case == "not_npz":
        path.write_text("hello")
    elif case == "no_experts":
        _trace_file(path, experts, 8, experts=None)
    elif case == "version":
        _trace_file(path, experts, 8, format_version=np.int32(2))
    elif case == "out_of_range":
        _trace_file(path, experts, 4)
    elif case == "layers_mismatch":
        _trace_file(path, experts, 8, layers=np.arange(3, dtype=np.int32))
    else:
        _trace_file(path, experts[:, 0, :], 8, layers=np.arange(2, dtype=np.int32))
    with pytest.raises(ModelFormatError) as e:
        load_trace(path)
    assert "\n" not in str(e.value)


@needs_llama
def test_layout_matches_the_gguf_reader(tiny_models):
    import gguf

    from edgemoe.bench.layout import expert_layout
    from edgemoe.cache import inspect_model

    for name in ("qwen3moe", "qwen2moe", "olmoe"):
        path = tiny_models[name]
        layout = expert_layout(path)
        info = inspect_model(path)
        assert len(layout.moe_layers) == info.n_moe_layer and layout.n_expert == info.n_expert
        total = sum(size for slices in layout.slices.values() for _, size in slices)
        assert total == info.expert_bytes
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:
            if t.name.endswith("_exps.weight"):
                il = int(t.name.split(".")[1])
                per = int(t.n_bytes) // int(t.shape[-1])
                assert (int(t.data_offset) + 3 * per, per) in layout.slices[(il, 3)]


@needs_llama
def test_layout_of_bad_files(tmp_path, tiny_models, dense_model):
    from edgemoe.bench.layout import expert_layout

    assert expert_layout(dense_model).moe_layers == []
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_models["qwen3moe"].read_bytes()[:100_000])
    with pytest.raises(ModelFormatError):
        expert_layout(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    with pytest.raises(ModelFormatError):
        expert_layout(junk)
