"""edgemoe.convert.writer: tensors produced on threads ahead of the writes come out in order,
within the memory bound, and a producer's error stops the write."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as QType

from edgemoe.convert.writer import TensorPlan, _produced, write_gguf


class _Producers:
    """Producers of 1 KiB f32 tensors whose values are their index; they record which have
    started, and the last one fails when asked to."""

    def __init__(self, n: int, fail_at: int = -1):
        self.lock = threading.Lock()
        self.started = []
        self.fail_at = fail_at
        self.plans = [TensorPlan(f"t{i}", (256,), QType.F32, self._make(i)) for i in range(n)]

    def _make(self, i: int):
        def produce() -> np.ndarray:
            with self.lock:
                self.started.append(i)
            time.sleep(0.01 * ((7 * i) % 3))  # finish out of order
            if i == self.fail_at:
                raise RuntimeError(f"producer {i} failed")
            return np.full(256, i, dtype=np.float32)
        return produce


@pytest.mark.parametrize("workers", [1, 3])
def test_tensors_are_written_in_order_whatever_the_threads(tmp_path, workers):
    p = _Producers(12)
    path = tmp_path / "x.gguf"
    write_gguf(str(path), "llama", [], p.plans, 32, workers=workers, ahead_bytes=2048)
    r = gguf.GGUFReader(str(path))
    assert [t.name for t in r.tensors] == [f"t{i}" for i in range(12)]
    for i, t in enumerate(r.tensors):
        assert np.all(np.asarray(t.data) == i), t.name
    assert sorted(p.started) == list(range(12))


def test_production_ahead_stays_within_the_bound():
    """1 KiB tensors, a 2 KiB bound, 4 threads: when the writer takes tensor k, at most one
    tensor after it has been started (the bound counts the one in hand)."""
    p = _Producers(10)
    for k, data in enumerate(_produced(p.plans, 4, 2048)):
        assert data[0] == k
        with p.lock:
            assert len(p.started) <= k + 2, (k, p.started)


def _producer_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("edgemoe-produce")]


def test_a_failing_producer_stops_the_write(tmp_path):
    p = _Producers(12, fail_at=4)
    with pytest.raises(RuntimeError, match="producer 4 failed"):
        write_gguf(str(tmp_path / "x.gguf"), "llama", [], p.plans, 32, workers=3, ahead_bytes=1 << 20)
    assert max(p.started) <= 4 + 2  # at most the 3 in flight when tensor 4 was taken
    assert not _producer_threads()  # the pool was shut down, its threads joined


def test_a_reader_that_stops_early_leaves_no_thread():
    p = _Producers(10)
    gen = _produced(p.plans, 3, 1 << 20)
    assert next(gen)[0] == 0
    gen.close()
    assert not _producer_threads()
    assert len(p.started) <= 1 + 3
