"""benchmarks/llama_server.py's pure parts: the stream chunks, the latency and throughput
arithmetic, and when the stock server is built again (nothing is built or started here)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import llama_server as ls  # noqa: E402


def _chunk(text, n=None, finish=None):
    payload = {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
               "object": "text_completion"}
    if n is not None:
        payload["timings"] = {"predicted_n": n}
    return payload


def test_sse_data_lines():
    assert ls.sse_data('data: {"a": 1}') == '{"a": 1}'
    assert ls.sse_data("data: [DONE]") == "[DONE]"
    for other in ("", ": ping", "event: x", "id: 3"):
        assert ls.sse_data(other) is None


def test_chunk_counts_from_timings_and_without():
    assert ls.chunk_update(_chunk(" the", n=3), 2) == (" the", 3, None)
    # a token whose text is held back still counts; the closing chunk adds none
    assert ls.chunk_update(_chunk("", n=4), 3) == ("", 4, None)
    assert ls.chunk_update(_chunk("", n=4, finish="length"), 4) == ("", 4, "length")
    # no timings: one token per chunk before the closing one
    assert ls.chunk_update(_chunk("a"), 0) == ("a", 1, None)
    assert ls.chunk_update(_chunk("", finish="length"), 1) == ("", 1, "length")
    with pytest.raises(RuntimeError, match="context full"):
        ls.chunk_update({"error": {"code": 400, "message": "context full"}}, 0)


def test_stream_records_token_chunks_only():
    s = ls.Stream("p", sent=10.0)
    for now, payload in ((10.5, _chunk("a", 1)), (10.6, _chunk("", 2)), (10.8, _chunk("bc", 3)),
                         (10.9, _chunk("", 3, "length"))):
        s.add(json.loads(json.dumps(payload)), now)
    assert s.text == "abc" and s.finish_reason == "length"
    assert s.times == [10.5, 10.6, 10.8] and s.counts == [1, 2, 3]


def test_token_gaps_split_over_merged_chunks():
    # first token excluded; a chunk bringing two tokens after 0.4 s gives two 200 ms samples
    assert ls.token_gaps_ms([1.0, 1.1, 1.5], [1, 2, 4]) == pytest.approx([100, 200, 200])
    # tokens after the first in the first chunk have no gap of their own
    assert ls.token_gaps_ms([1.0, 1.3], [2, 3]) == pytest.approx([300])
    assert ls.token_gaps_ms([1.0], [1]) == []


def test_summarize_throughput_latency_ttft():
    a = ls.Stream("a", sent=0.0, times=[0.5, 0.6, 0.7, 0.8], counts=[1, 2, 3, 4])
    b = ls.Stream("b", sent=0.1, times=[0.9, 1.2, 1.5, 2.0], counts=[1, 2, 3, 4])
    got = ls.summarize([a, b])
    assert got["n_tokens"] == 8
    assert got["wall_s"] == pytest.approx(2.0)           # first request sent to last token
    assert got["tokens_per_s"] == pytest.approx(4.0)
    # from 0.9 s, when b has its first token (a has all of its own by then): b's other 3 in 1.1 s
    assert got["decode_tokens_per_s"] == pytest.approx(3 / 1.1)
    # pooled gaps: 100, 100, 100, 300, 300, 500 ms
    assert got["latency_p50_ms"] == pytest.approx(200)
    assert got["latency_p95_ms"] == pytest.approx(450)
    assert got["ttft_ms_mean"] == pytest.approx((500 + 800) / 2)


def test_summarize_nothing_arrived():
    got = ls.summarize([ls.Stream("a", sent=0.0)])
    assert got["n_tokens"] == 0 and got["tokens_per_s"] is None and got["latency_p50_ms"] is None
    assert got["decode_tokens_per_s"] is None


def test_build_stamp(tmp_path):
    binary, stamp_file = tmp_path / "llama-server", tmp_path / "stamp.json"
    stamp = ls.build_stamp("abc", ["-DX=ON"], "wrapper")
    assert not ls.stamp_matches(stamp_file, binary, stamp)  # nothing built
    stamp_file.write_text(stamp)
    assert not ls.stamp_matches(stamp_file, binary, stamp)  # stamp without a binary
    binary.write_bytes(b"")
    assert ls.stamp_matches(stamp_file, binary, stamp)
    for other in (ls.build_stamp("abd", ["-DX=ON"], "wrapper"), ls.build_stamp("abc", ["-DX=OFF"], "wrapper"),
                  ls.build_stamp("abc", ["-DX=ON"], "wrapper2")):
        assert not ls.stamp_matches(stamp_file, binary, other)


def test_build_inputs_come_from_the_repo():
    name, sha = ls.sdist_pin()
    assert name.endswith(".tar.gz") and len(sha) == 64
    flags = ls.ggml_cpu_flags()
    assert "-mno-amx-tile" in flags  # edgemoe's CMakeLists.txt turns AMX off for ggml-cpu
    wrapper = ls.wrapper_cmakelists(flags)
    assert "target_compile_options(ggml-cpu PRIVATE " + " ".join(flags) + ")" in wrapper
