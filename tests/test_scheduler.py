"""edgemoe.scheduler: which sequences go into a decode step (pure Python, no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.errors import InvalidArgumentError
from edgemoe.scheduler import (SCHEDULES, Candidate, ExpertScheduler, FifoScheduler, StepLimits,
                               StepPlan, make_scheduler)


def ex(*rows):
    """Experts [n_layer, m] from one list of ids per layer."""
    return np.array(rows, dtype=np.int32)


def cand(seq, experts=None, *, n_tokens=1, waited=0, arrival=None):
    return Candidate(seq=seq, n_tokens=n_tokens, waited=waited,
                     arrival=seq if arrival is None else arrival, experts=experts)


def limits(max_tokens=64, slots=None, max_wait=4, resident=None):
    return StepLimits(max_tokens=max_tokens,
                      slots_per_layer=None if slots is None else np.asarray(slots),
                      max_wait=max_wait, resident=resident)


# --- the registry --------------------------------------------------------------------------

def test_make_scheduler_names():
    assert SCHEDULES == ("fifo", "expert")
    assert isinstance(make_scheduler("fifo"), FifoScheduler)
    assert isinstance(make_scheduler("expert"), ExpertScheduler)
    assert [make_scheduler(n).name for n in SCHEDULES] == list(SCHEDULES)


def test_unknown_schedule_is_one_line_listing_the_choices():
    with pytest.raises(InvalidArgumentError) as err:
        make_scheduler("lru")
    msg = str(err.value)
    assert "\n" not in msg and "'lru'" in msg and "fifo" in msg and "expert" in msg


def test_invalid_inputs_raise():
    with pytest.raises(InvalidArgumentError, match="tokens"):
        FifoScheduler().plan([cand(0, n_tokens=9)], limits(max_tokens=8))
    with pytest.raises(InvalidArgumentError, match="MoE layers"):
        ExpertScheduler().plan([cand(0, ex([1], [2])), cand(1, ex([1]))], limits())
    with pytest.raises(InvalidArgumentError, match="slots_per_layer"):
        ExpertScheduler().plan([cand(0, ex([1], [2]))], limits(slots=[2, 2, 2]))
    with pytest.raises(InvalidArgumentError, match="twice"):
        ExpertScheduler().plan([cand(0), cand(0)], limits())


def test_no_candidates_gives_an_empty_plan():
    for s in (FifoScheduler(), ExpertScheduler()):
        assert s.plan([], limits()) == StepPlan((), None)


# --- fifo ----------------------------------------------------------------------------------

def test_fifo_orders_by_wait_then_arrival_and_skips_what_does_not_fit():
    cs = [cand(0, n_tokens=3, waited=0, arrival=0),
          cand(1, n_tokens=6, waited=2, arrival=5),
          cand(2, n_tokens=4, waited=2, arrival=3),
          cand(3, n_tokens=1, waited=0, arrival=9)]
    # waited 2 first (arrival 3 before 5): 4 + 6 = 10; seq 0's 3 tokens do not fit, seq 3's 1 does
    plan = FifoScheduler().plan(cs, limits(max_tokens=11))
    assert plan.seqs == (2, 1, 3)
    assert plan.unique_experts is None
    assert FifoScheduler().plan(cs, limits(max_tokens=64)).seqs == (2, 1, 0, 3)


def test_fifo_ignores_experts_and_slots_but_reports_unique_experts():
    cs = [cand(0, ex([0], [1])), cand(1, ex([2], [1])), cand(2, ex([3], [1]))]
    plan = FifoScheduler().plan(cs, limits(slots=[1, 1]))
    assert plan.seqs == (0, 1, 2)
    assert plan.unique_experts == pytest.approx((3 + 1) / 2)


# --- expert --------------------------------------------------------------------------------

def test_expert_groups_sharing_sequences_over_a_disjoint_one():
    # On an empty step every candidate costs the same, so the first goes in FIFO order; after
    # it, seq 2 (same experts) costs nothing and seq 0, earlier in FIFO order, costs 4.
    cs = [cand(1, ex([1, 2], [3, 4]), waited=1, arrival=0),
          cand(0, ex([7, 8], [7, 8]), arrival=1),
          cand(2, ex([2, 1], [4, 3]), arrival=2)]
    plan = ExpertScheduler().plan(cs, limits(max_tokens=2))
    assert plan.seqs == (1, 2)
    assert plan.unique_experts == 2.0
    assert FifoScheduler().plan(cs, limits(max_tokens=2)).seqs == (1, 0)
    # with a slot cap the disjoint one stays out even when the tokens would fit
    plan = ExpertScheduler().plan(cs, limits(slots=[2, 2]))
    assert set(plan.seqs) == {1, 2}


def test_expert_prefers_resident_experts():
    resident = np.zeros((2, 8), dtype=bool)
    resident[0, 5] = resident[1, 6] = True
    # seq 0 wins every tie-break (waited longer, earlier), but seq 1's experts are resident
    cs = [cand(0, ex([1], [2]), waited=2, arrival=0), cand(1, ex([5], [6]), arrival=1)]
    assert ExpertScheduler().plan(cs, limits(slots=[1, 1], resident=resident)).seqs == (1,)
    assert ExpertScheduler().plan(cs, limits(resident=resident)).seqs == (1, 0)
    # without residency information the tie-break decides
    assert ExpertScheduler().plan(cs, limits(slots=[1, 1])).seqs == (0,)


def test_resident_is_only_a_small_preference_against_new_experts():
    # seq 0 adds 2 resident experts, seq 1 one missing one: the miss costs more
    resident = np.zeros((1, 8), dtype=bool)
    resident[0, [1, 2]] = True
    cs = [cand(0, ex([1, 2]), arrival=0), cand(1, ex([3, 3]), arrival=1)]
    assert ExpertScheduler().plan(cs, limits(resident=resident)).seqs == (0, 1)
    # and a resident new expert costs more than none: seq 2 repeats what mandatory seq 0 brought in
    cs = [cand(0, ex([4]), waited=4), cand(1, ex([1])), cand(2, ex([4]))]
    assert ExpertScheduler().plan(cs, limits(resident=resident)).seqs == (0, 2, 1)


def test_resident_narrower_than_the_ids():
    resident = np.zeros((2, 4), dtype=bool)
    resident[1, 3] = True
    cs = [cand(0, ex([9], [9])), cand(1, ex([0], [3]))]
    # seq 1: one miss (layer 0) + one resident; seq 0: two misses
    assert ExpertScheduler().plan(cs, limits(resident=resident)).seqs == (1, 0)


def test_slots_cap_is_respected():
    rng = np.random.default_rng(1)
    cs = [cand(s, rng.integers(0, 16, size=(4, 2)).astype(np.int32)) for s in range(12)]
    slots = np.array([3, 4, 5, 6])
    plan = ExpertScheduler().plan(cs, limits(slots=slots))
    assert 1 <= len(plan.seqs) < len(cs)
    union = np.zeros((4, 16), dtype=bool)
    for c in cs:
        if c.seq in plan.seqs:
            union[np.arange(4)[:, None], c.experts] = True
    assert np.all(union.sum(axis=1) <= slots)
    assert plan.unique_experts == pytest.approx(union.sum(axis=1).mean())


def test_a_candidate_over_the_slots_goes_alone():
    cs = [cand(0, ex([1, 2, 3])), cand(1, ex([4, 5, 6]), arrival=5)]
    assert ExpertScheduler().plan(cs, limits(slots=[2])).seqs == (0,)
    # a mandatory one over the slots goes too, and the greedy adds nothing past the cap
    cs = [cand(0, ex([1, 2, 3]), waited=4), cand(1, ex([4])), cand(2, ex([2]))]
    assert ExpertScheduler().plan(cs, limits(slots=[2])).seqs == (0, 2)


def test_prompt_chunks_always_go_first():
    cs = [cand(0, ex([1]), waited=3, arrival=0),
          cand(1, ex([1]), waited=3, arrival=1),
          cand(5, None, n_tokens=4, waited=0, arrival=7),
          cand(6, None, n_tokens=4, waited=1, arrival=8)]
    plan = ExpertScheduler().plan(cs, limits(max_tokens=10, slots=[1]))
    assert plan.seqs == (6, 5, 0, 1)
    assert plan.unique_experts == 1.0
    # they take the step when it is full, and a plan of only chunks has no expert figure
    plan = ExpertScheduler().plan(cs, limits(max_tokens=8, slots=[1]))
    assert plan == StepPlan((6, 5), None)
    cs = [cand(0, ex([1]), n_tokens=2), cand(5, None, n_tokens=7)]
    assert ExpertScheduler().plan(cs, limits(max_tokens=8)) == StepPlan((5,), None)


def test_waited_max_wait_goes_first_even_if_costly():
    cs = [cand(0, ex([1, 2])), cand(1, ex([1, 2])), cand(2, ex([9, 8]), waited=4, arrival=9)]
    plan = ExpertScheduler().plan(cs, limits(max_tokens=2, slots=[2]))
    assert plan.seqs[0] == 2 and len(plan.seqs) == 1  # 0 and 1 would push the layer to 4 experts
    plan = ExpertScheduler().plan(cs, limits(max_tokens=2, slots=[4]))
    assert plan.seqs == (2, 0)


def test_padding_is_ignored():
    cs = [cand(0, ex([3, -1], [5, -1])), cand(1, ex([3, -1], [-1, 5]))]
    plan = ExpertScheduler().plan(cs, limits(slots=[1, 1]))
    assert plan.seqs == (0, 1)   # -1 counted as an expert would make 2 per layer
    assert plan.unique_experts == 1.0
    assert FifoScheduler().plan(cs, limits()).unique_experts == 1.0
    # a candidate of only padding adds nothing
    assert ExpertScheduler().plan([cand(0, ex([-1], [-1]))], limits()).unique_experts == 0.0


def test_without_cache_pressure_everyone_that_fits_goes_cheapest_first():
    cs = [cand(0, ex([9]), waited=1), cand(1, ex([1])), cand(2, ex([1])), cand(3, ex([1]), n_tokens=3)]
    plan = ExpertScheduler().plan(cs, limits(max_tokens=64))
    assert plan.seqs == (0, 1, 2, 3)            # all fit: the cost only orders (0 first: it waited)
    assert ExpertScheduler().plan(cs, limits(max_tokens=4)).seqs == (0, 1, 2)
    cs[0] = cand(0, ex([9]))
    assert ExpertScheduler().plan(cs, limits(max_tokens=64)).seqs == (0, 1, 2, 3)  # tie: arrival
    cs = [cand(0, ex([9])), cand(1, ex([1]), waited=1), cand(2, ex([1])), cand(3, ex([9]))]
    assert ExpertScheduler().plan(cs, limits(max_tokens=64)).seqs == (1, 2, 0, 3)


# --- against a literal reading of the rules ------------------------------------------------

def reference_plan(cands, lim):
    """The expert rules with Python sets and a float eps, for comparison."""
    order = sorted(cands, key=lambda c: (-c.waited, c.arrival))
    n_layer = next(c.experts.shape[0] for c in cands if c.experts is not None)
    m = max(c.experts.shape[1] for c in cands if c.experts is not None)
    eps = 1.0 / (n_layer * m * 8)
    sets = {c.seq: [set(int(x) for x in row if x >= 0) for row in c.experts]
            for c in cands if c.experts is not None}
    union = [set() for _ in range(n_layer)]
    res = lim.resident
    chosen, left = [], lim.max_tokens

    def take(c):
        nonlocal left
        chosen.append(c.seq)
        left -= c.n_tokens
        for l, s in enumerate(sets.get(c.seq, [])):
            union[l] |= s

    for c in order:
        if (c.experts is None or c.waited >= lim.max_wait) and c.n_tokens <= left:
            take(c)
    pending = [c for c in order if c.experts is not None and c.seq not in chosen]
    while pending and left > 0:
        def cost(c):
            total = 0.0
            for l, s in enumerate(sets[c.seq]):
                for e in s - union[l]:
                    r = res is not None and e < res.shape[1] and res[l, e]
                    total += eps if r else 1.0
            return total
        best = min(pending, key=lambda c: (cost(c), -c.waited, c.arrival))
        pending.remove(best)
        if best.n_tokens > left:
            continue
        if lim.slots_per_layer is not None and chosen:
            if any(len(s - union[l]) and len(union[l] | s) > lim.slots_per_layer[l]
                   for l, s in enumerate(sets[best.seq])):
                continue
        take(best)
    return tuple(chosen)


def random_step(seed):
    """A random step: few layers and experts so that unions overlap and slot caps bind."""
    rng = np.random.default_rng(seed)
    n_layer, n_expert, k = int(rng.integers(1, 5)), int(rng.integers(2, 12)), int(rng.integers(1, 3))
    cs = []
    for s in rng.permutation(int(rng.integers(1, 16))):
        if rng.random() < 0.1:
            experts = None
        else:
            experts = rng.integers(-1, n_expert, size=(n_layer, k * int(rng.integers(1, 3)))).astype(np.int32)
        cs.append(Candidate(seq=int(s), n_tokens=int(rng.integers(1, 4)), waited=int(rng.integers(0, 4)),
                            arrival=int(rng.integers(0, 5)) * 100 + int(s), experts=experts))
    if all(c.experts is None for c in cs):
        cs.append(cand(99, rng.integers(0, n_expert, size=(n_layer, k)).astype(np.int32)))
    resident = rng.random((n_layer, int(rng.integers(1, n_expert + 1)))) < 0.3 if rng.random() < 0.6 else None
    slots = rng.integers(1, 2 * k + 3, size=n_layer) if rng.random() < 0.7 else None
    lim = limits(max_tokens=int(rng.integers(3, 30)), slots=slots, resident=resident,
                 max_wait=int(rng.integers(2, 6)))
    return cs, lim


@pytest.mark.parametrize("seed", range(60))
def test_expert_matches_the_literal_rules(seed):
    cs, lim = random_step(seed)
    assert ExpertScheduler().plan(cs, lim).seqs == reference_plan(cs, lim)


def test_a_candidate_over_the_slots_does_not_end_the_step():
    # seq 1 would add a second expert to layer 0 (1 slot); seq 2, as cheap and later, fits
    cs = [cand(0, ex([1], [1]), waited=1), cand(1, ex([2], [1])), cand(2, ex([1], [2]))]
    assert ExpertScheduler().plan(cs, limits(slots=[1, 2])).seqs == (0, 2)


# --- simulations ---------------------------------------------------------------------------

def simulate(scheduler, steps, n_seq, route, lim, on_step=None):
    """Every sequence always has a decode token; a step's picks reset `waited`, others wait."""
    waited = np.zeros(n_seq, dtype=np.int64)
    stepped = np.zeros(n_seq, dtype=np.int64)
    uniques = []
    for t in range(steps):
        cs = [Candidate(seq=s, n_tokens=1, waited=int(waited[s]), arrival=s, experts=route(t, s))
              for s in range(n_seq)]
        plan = scheduler.plan(cs, lim)
        if on_step is not None:
            on_step(cs, plan)
        picked = np.zeros(n_seq, dtype=bool)
        picked[list(plan.seqs)] = True
        stepped += picked
        waited = np.where(picked, 0, waited + 1)
        uniques.append(plan.unique_experts)
    return stepped, uniques


def test_fairness_over_200_steps():
    rng = np.random.default_rng(7)
    n_seq, n_layer, n_expert, k, max_wait = 8, 4, 16, 2, 4
    routes = rng.integers(0, n_expert, size=(200, n_seq, n_layer, k)).astype(np.int32)
    lim = limits(max_tokens=8, slots=np.full(n_layer, 4), max_wait=max_wait)
    sizes = []

    def check(cs, plan):
        assert all(c.waited <= max_wait for c in cs)
        assert {c.seq for c in cs if c.waited >= max_wait} <= set(plan.seqs)
        sizes.append(len(plan.seqs))

    stepped, _ = simulate(ExpertScheduler(), 200, n_seq, lambda t, s: routes[t, s], lim, check)
    assert np.all(stepped > 0)
    assert min(sizes) >= 1
    assert min(sizes) < n_seq   # the cap did hold sequences back, so the bound was exercised


def test_expert_touches_fewer_experts_than_fifo_under_a_slot_cap():
    # Read-ME-like: 16 experts, top-1, 12 MoE layers, skewed routes (a few hot experts per layer)
    rng = np.random.default_rng(3)
    n_seq, n_layer, n_expert, steps = 16, 12, 16, 300
    p = 1.0 / np.arange(1, n_expert + 1) ** 1.2
    p /= p.sum()
    perms = np.array([rng.permutation(n_expert) for _ in range(n_layer)])
    draws = rng.choice(n_expert, size=(steps, n_seq, n_layer), p=p)
    routes = perms[np.arange(n_layer), draws][..., None].astype(np.int32)  # [steps, seq, layer, 1]
    lim = limits(max_tokens=8, slots=np.full(n_layer, 3))

    _, fifo_u = simulate(FifoScheduler(), steps, n_seq, lambda t, s: routes[t, s], lim)
    expert_sizes = []
    stepped, expert_u = simulate(ExpertScheduler(), steps, n_seq, lambda t, s: routes[t, s], lim,
                                 lambda cs, plan: expert_sizes.append(len(plan.seqs)))
    assert np.mean(expert_u) < 0.8 * np.mean(fifo_u)
    assert np.all(stepped > 0)

    # Not only because it takes fewer sequences: FIFO held to the same batch size touches more.
    same_size_fifo = []

    def fifo_at_size(cs, plan):
        same_size_fifo.append(FifoScheduler().plan(cs, limits(max_tokens=len(plan.seqs))).unique_experts)
    simulate(ExpertScheduler(), steps, n_seq, lambda t, s: routes[t, s], lim, fifo_at_size)
    assert np.mean(expert_u) < np.mean(same_size_fifo)
    assert np.mean(expert_sizes) >= 3
