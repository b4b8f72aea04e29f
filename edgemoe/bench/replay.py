"""Route replay: drive a (large, random-weight) model with routes recorded from another
(small, trained) model, so that a benchmark's expert I/O follows real routing.

A trace (`edgemoe trace`, format_version 1, read by edgemoe.trace.load_trace) holds `experts`
[n_tokens, L, k_t] with ids below `n_expert` (N_t), in the router's top-k order. The benchmarked
model has M MoE layers, N experts and top-k. The mapping, fixed so that the same trace gives the
same I/O on any run:

- layers: the i-th MoE layer of the model (in layer order) takes trace layer i mod L;
- tokens: the model's t-th token takes trace token t mod n_tokens (the trace wraps around);
- experts: each trace id e owns the block of model ids starting at floor(e * N / N_t); with
  r = ceil(k / k_t) copies per trace expert, a token's ids are, copy-major in top-k order,
  (floor(e_j * N / N_t) + c) mod N for c < r and each trace id e_j; repeats are dropped and
  the first k kept; where repeats leave fewer than k (N < N_t, or r copies overlapping), the
  next ids after the last one fill up. So a set of trace experts always maps to the same set
  of model experts, the reuse between tokens (EOR) carries over, and with N = r * N_t (e.g. 32
  experts top-4 onto 64 top-8) every model expert is used, as often as its trace expert.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from edgemoe.errors import InvalidArgumentError
from edgemoe.trace import Trace

def map_ids(trace_ids: np.ndarray, n_trace_expert: int, n_expert: int, k: int) -> np.ndarray:
    """Model expert ids [n, k] for trace ids [n, k_t] (the module docstring's mapping)."""
    if k > n_expert:
        raise InvalidArgumentError(f"top-{k} of {n_expert} experts is impossible")
    n, k_t = trace_ids.shape
    r = -(-k // k_t)
    base = (trace_ids.astype(np.int64) * n_expert) // n_trace_expert  # [n, k_t]
    cand = ((base[:, None, :] + np.arange(r)[None, :, None]) % n_expert).reshape(n, r * k_t)  # copy-major
    # repeats within a row: every occurrence after the first
    order = np.argsort(cand, axis=1, kind="stable")
    ranked = np.take_along_axis(cand, order, axis=1)
    repeat = np.zeros_like(cand, dtype=bool)
    np.put_along_axis(repeat, order, np.concatenate(
        [np.zeros((n, 1), dtype=bool), ranked[:, 1:] == ranked[:, :-1]], axis=1), axis=1)
    keep = np.argsort(repeat, axis=1, kind="stable")  # first occurrences first, in order
    out = np.take_along_axis(cand, keep, axis=1)[:, :k].astype(np.int32)
    for t in np.flatnonzero((~repeat).sum(axis=1) < k):  # too few distinct ids: fill up
        chosen = list(dict.fromkeys(int(e) for e in cand[t]))
        e = chosen[-1]
        while len(chosen) < k:
            e = (e + 1) % n_expert
            if e not in chosen:
                chosen.append(e)
        out[t] = chosen[:k]
    return out


class RouteReplay:
    """Routes of a model's MoE layers from a trace, token by token, wrapping around.

    Args:
        trace: a loaded trace.
        moe_layers: llama.cpp layer indices of the model's MoE layers, ascending.
        n_expert, k: the model's experts per layer and experts per token.
    """

    def __init__(self, trace: Trace, moe_layers: List[int], n_expert: int, k: int):
        if not moe_layers:
            raise InvalidArgumentError("route replay needs a model with routed experts")
        self.trace = trace
        self.moe_layers = list(moe_layers)
        L = trace.experts.shape[1]
        # map each trace layer once: [n_tokens, L, k] of model ids
        self._mapped = np.stack([map_ids(trace.experts[:, j, :], trace.n_expert, n_expert, k) for j in range(L)],
                                axis=1)

    def routes(self, start: int, n: int) -> Dict[int, np.ndarray]:
        """layer -> int32 [n, k] ids of tokens start .. start + n - 1 of the replay."""
        idx = (np.arange(start, start + n) % self.trace.n_tokens)
        L = self._mapped.shape[1]
        return {il: np.ascontiguousarray(self._mapped[idx, i % L, :]) for i, il in enumerate(self.moe_layers)}
