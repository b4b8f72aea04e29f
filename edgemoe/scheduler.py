"""Which ready sequences go into the next decode step (Read-ME's expert-aware batching).

The BatchGenerator (edgemoe.generator) decodes many sequences in one llama.cpp context. Each
step it hands the ready sequences to a Scheduler as Candidates and decodes the StepPlan's
sequences in one batch.

- `fifo` is llama-server's behaviour: everyone, longest-waiting first, while the tokens fit.
- `expert` keeps the distinct experts a step touches small, so that a small expert cache
  serves the step without splitting it into waves or reloading what it just evicted. Sequences
  that route to the same (or already resident) experts go together; a sequence that has
  waited `max_wait` steps goes regardless, so nobody starves.

Pure Python + numpy: plan() runs once per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple

import numpy as np

from edgemoe.errors import InvalidArgumentError

SCHEDULES = ("fifo", "expert")


@dataclass(frozen=True)
class Candidate:
    seq: int                        # sequence id
    n_tokens: int                   # tokens it adds to the step (1 for a decode token, a chunk's length for a prefill)
    waited: int                     # steps since it last went into a step (0: it stepped in the last step)
    arrival: int                    # increasing with the request's arrival (FIFO order, tie-breaks)
    experts: Optional[np.ndarray]   # int [n_moe_layer, m] expert ids (exact or estimated), -1 padding; None: unknown


@dataclass(frozen=True)
class StepLimits:
    max_tokens: int                             # tokens a step may hold (n_batch)
    slots_per_layer: Optional[np.ndarray] = None  # int [n_moe_layer]: distinct experts a layer's pool holds; None: no limit
    max_wait: int = 4                           # a candidate that has waited this many steps goes into this step
    resident: Optional[np.ndarray] = None       # bool [n_moe_layer, n_expert]: resident (or loading) now; None: unknown
    max_seqs: Optional[int] = None              # sequences a step may hold; None: as many as the tokens allow


@dataclass(frozen=True)
class StepPlan:
    seqs: Tuple[int, ...]           # chosen sequence ids, in batch order
    unique_experts: Optional[float] # distinct experts per MoE layer of the chosen known candidates, mean over layers


class Scheduler(Protocol):
    name: str

    def plan(self, candidates: Sequence[Candidate], limits: StepLimits) -> StepPlan: ...


def make_scheduler(name: str) -> Scheduler:
    if name == "fifo":
        return FifoScheduler()
    if name == "expert":
        return ExpertScheduler()
    raise InvalidArgumentError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


def _check(candidates: Sequence[Candidate], limits: StepLimits) -> Optional[int]:
    """Validates the inputs; returns the MoE layer count of the known experts (None if none)."""
    if limits.max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be at least 1, got {limits.max_tokens}")
    if limits.max_wait < 0:
        raise InvalidArgumentError(f"max_wait must be 0 or more, got {limits.max_wait}")
    if limits.max_seqs is not None and limits.max_seqs < 1:
        raise InvalidArgumentError(f"max_seqs must be at least 1, got {limits.max_seqs}")
    n_layer = None
    seen = set()
    for c in candidates:
        if c.seq in seen:
            raise InvalidArgumentError(f"sequence {c.seq} is a candidate twice")
        seen.add(c.seq)
        # A candidate bigger than a step could never go: the generator must chunk prompts.
        if not 1 <= c.n_tokens <= limits.max_tokens:
            raise InvalidArgumentError(
                f"sequence {c.seq} adds {c.n_tokens} tokens; a step holds 1 to {limits.max_tokens}")
        if c.experts is not None:
            if c.experts.ndim != 2:
                raise InvalidArgumentError(f"sequence {c.seq}: experts must be [n_moe_layer, m], "
                                           f"got shape {c.experts.shape}")
            if n_layer is None:
                n_layer = c.experts.shape[0]
            elif c.experts.shape[0] != n_layer:
                raise InvalidArgumentError(f"sequence {c.seq}: experts cover {c.experts.shape[0]} "
                                           f"MoE layers, others {n_layer}")
    for what, arr, ndim in (("slots_per_layer", limits.slots_per_layer, 1), ("resident", limits.resident, 2)):
        if arr is None:
            continue
        if np.ndim(arr) != ndim or (n_layer is not None and np.shape(arr)[0] != n_layer):
            raise InvalidArgumentError(f"{what} has shape {np.shape(arr)}; the candidates' experts "
                                       f"cover {n_layer} MoE layers")
    return n_layer


def _fifo_order(candidates: Sequence[Candidate]) -> List[int]:
    return sorted(range(len(candidates)), key=lambda i: (-candidates[i].waited, candidates[i].arrival))


def _flat_ids(experts: Sequence[np.ndarray], n_layer: int, n_expert: int) -> np.ndarray:
    """[C, n_layer, m] indices into a flat [n_layer * n_expert + 1] table: layer * n_expert + id,
    each (candidate, layer)'s ids once; padding and repeats point at the last cell, a sentinel
    that is never new, so sums over a gather count distinct experts."""
    m = max(e.shape[1] for e in experts)
    if all(e.shape[1] == m for e in experts):
        ids = np.array(experts, dtype=np.int64)
    else:
        ids = np.full((len(experts), n_layer, m), -1, dtype=np.int64)
        for i, e in enumerate(experts):
            ids[i, :, :e.shape[1]] = e
    ids.sort(axis=2)
    drop = ids < 0
    drop[:, :, 1:] |= ids[:, :, 1:] == ids[:, :, :-1]
    flat = ids + (np.arange(n_layer, dtype=np.int64) * n_expert)[:, None]
    flat[drop] = n_layer * n_expert
    return flat


def _n_expert(experts: Sequence[np.ndarray], resident: Optional[np.ndarray]) -> int:
    n = max((int(e.max(initial=-1)) for e in experts), default=-1) + 1
    return max(n, 1, resident.shape[1] if resident is not None else 0)


def _unique(flat: np.ndarray, n_layer: int, n_expert: int) -> Optional[float]:
    """Mean over layers of the distinct experts in the union of the rows of `flat`."""
    if flat.shape[0] == 0:
        return None
    union = np.zeros(n_layer * n_expert + 1, dtype=bool)
    union[flat] = True
    return float(union[:-1].reshape(n_layer, n_expert).sum(axis=1).mean())


def _plan_unique(candidates: Sequence[Candidate], chosen: Sequence[int], n_layer: Optional[int]) -> Optional[float]:
    known = [candidates[i].experts for i in chosen if candidates[i].experts is not None]
    if not known:
        return None
    n_expert = _n_expert(known, None)
    return _unique(_flat_ids(known, n_layer, n_expert), n_layer, n_expert)


class FifoScheduler:
    """llama-server's behaviour: every candidate, longest-waiting (then earliest) first, while
    the tokens fit; one that does not fit is skipped and a later smaller one may still go."""

    name = "fifo"

    def plan(self, candidates: Sequence[Candidate], limits: StepLimits) -> StepPlan:
        n_layer = _check(candidates, limits)
        chosen, left = [], limits.max_tokens
        room = limits.max_seqs or len(candidates)
        for i in _fifo_order(candidates):
            if len(chosen) == room:
                break
            if candidates[i].n_tokens <= left:
                chosen.append(i)
                left -= candidates[i].n_tokens
        return StepPlan(tuple(candidates[i].seq for i in chosen), _plan_unique(candidates, chosen, n_layer))


class ExpertScheduler:
    """Fewest distinct experts per step, resident ones preferred, under a fairness bound.

    1. Mandatory first, in FIFO order, while the tokens fit: candidates that have waited
       `max_wait` steps, and prompt chunks (unknown experts: a prefill must progress).
    2. Then greedily the known candidate with the least marginal cost: its experts new to the
       step and not resident, plus eps per expert new to the step but resident; ties go to the
       longer-waiting, then the earlier.
    3. A candidate whose tokens do not fit (or past max_seqs), or that would push some layer's distinct experts
       past `slots_per_layer`, is left for a later step (a cheaper-to-pack one may still go).
       The plan is never empty while candidates exist: a first candidate over the slots goes
       alone, and the cache splits the step into waves.
    Without slots_per_layer nothing holds a candidate back but tokens: the cost only orders.
    """

    name = "expert"

    def plan(self, candidates: Sequence[Candidate], limits: StepLimits) -> StepPlan:
        n_layer = _check(candidates, limits)
        order = _fifo_order(candidates)
        chosen, left = [], limits.max_tokens
        room = limits.max_seqs or len(candidates)
        mandatory = [i for i in order
                     if candidates[i].experts is None or candidates[i].waited >= limits.max_wait]
        for i in mandatory:
            if len(chosen) < room and candidates[i].n_tokens <= left:
                chosen.append(i)
                left -= candidates[i].n_tokens
        known = [i for i in order if candidates[i].experts is not None]
        if not known:
            return StepPlan(tuple(candidates[i].seq for i in chosen), None)

        resident = None if limits.resident is None else np.asarray(limits.resident, dtype=bool)
        n_expert = _n_expert([candidates[i].experts for i in known], resident)
        flat = _flat_ids([candidates[i].experts for i in known], n_layer, n_expert)
        # Cost table per flat cell: 0 once in the step's union (and the sentinel), 1 if new
        # but resident, big if it must be loaded. big exceeds any sum of 1s, so this is
        # "misses + eps * resident additions" with eps = 1/big, in exact integers.
        big = flat.shape[1] * flat.shape[2] + 1
        cost = np.full(n_layer * n_expert + 1, big, dtype=np.int64)
        if resident is not None:
            cost[:-1].reshape(n_layer, n_expert)[:, :resident.shape[1]][resident] = 1
        cost[-1] = 0
        slots = None if limits.slots_per_layer is None else np.asarray(limits.slots_per_layer, dtype=np.int64)
        n, m = len(known), flat.shape[2]
        flat = flat.reshape(n, n_layer * m)
        used = np.zeros(n_layer, dtype=np.int64)  # distinct experts per layer in the step so far
        open_ = np.ones(n, dtype=bool)            # rows of `flat` not yet in the plan
        taken = []

        def take(r: int, gathered: np.ndarray) -> None:
            used[:] += (gathered != 0).reshape(n_layer, m).sum(axis=1)
            cost[flat[r]] = 0
            open_[r] = False
            taken.append(r)

        in_plan = set(chosen)
        for r, i in enumerate(known):
            if i in in_plan:
                take(r, cost[flat[r]])
        # A row's position in `known` is its FIFO rank, the tie-break after the cost.
        rank = np.arange(n, dtype=np.int64)
        tokens = np.array([candidates[i].n_tokens for i in known], dtype=np.int64)
        closed = np.iinfo(np.int64).max
        while left > 0 and len(chosen) < room:
            gathered = np.take(cost, flat)  # twice as fast as cost[flat]
            key = gathered.sum(axis=1) * n + rank
            key[~open_] = closed
            misfit = tokens > left
            if slots is not None and chosen:
                new = (gathered != 0).reshape(n, n_layer, m).sum(axis=2)
                misfit |= ((new > 0) & (used + new > slots)).any(axis=1)
            # The cheapest candidate that fits. One that does not fit now never will: `left`
            # only shrinks, and a layer's union could only come to cover its experts by growing
            # past the cap itself.
            key[misfit] = closed
            r = int(key.argmin())
            if key[r] == closed:
                break
            take(r, gathered[r])
            chosen.append(known[r])
            left -= int(tokens[r])

        return StepPlan(tuple(candidates[i].seq for i in chosen), float(used.mean()) if taken else None)
