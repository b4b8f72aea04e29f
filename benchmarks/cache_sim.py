"""Replays recorded routes through a model of edgemoe's cache: one pool of `slots` slots shared by
all MoE layers, one step per layer per ubatch (the prompt is one ubatch), a step's experts pinned
while it loads its misses, and the native policies' victim rules (ties: lowest slot index).

routes: int32 rows (layer, token index, k expert ids), as the route recorder writes them.
"""

from __future__ import annotations

import bisect
import math

import numpy as np


def steps_of(routes: np.ndarray, prompt_tokens: int):
    """(token index of the ubatch's first token, layer, distinct experts in order of first use,
    uses per expert, pairs) per layer per ubatch.

    A prompt evaluated for its last token's logits only computes that token's row in the last
    layer (llama.cpp drops the other rows before that layer's FFN), so a layer may hold fewer
    prompt rows than prompt_tokens: the rows after its prompt rows are the decode tokens'."""
    layers = sorted(set(int(x) for x in routes[:, 0]))
    by_layer = {il: routes[routes[:, 0] == il] for il in layers}
    n_tokens = max(len(r) for r in by_layer.values())
    n_decode = n_tokens - prompt_tokens
    n_prompt_rows = {il: len(r) - n_decode for il, r in by_layer.items()}
    spans = [(0, prompt_tokens)] + [(t, t + 1) for t in range(prompt_tokens, n_tokens)]
    for t0, t1 in spans:
        for il in layers:
            if t0 < prompt_tokens:
                rows = by_layer[il][:n_prompt_rows[il]]
            else:
                i = n_prompt_rows[il] + t0 - prompt_tokens
                rows = by_layer[il][i:i + 1]
            ids = rows[:, 2:].ravel()
            if ids.size == 0:
                continue
            experts, first, uses = np.unique(ids, return_index=True, return_counts=True)
            order = np.argsort(first, kind="stable")
            yield t0, il, experts[order], uses[order], len(ids)


def simulate(routes: np.ndarray, slots: int, policy: str, prompt_tokens: int, count_from_token: int = 0,
             stop_token: int | None = None, n_expert: int | None = None, half_life_tokens: float = 16.0) -> dict:
    """Misses and hits of one policy over the routes, counted for tokens in [count_from, stop)."""
    steps = list(steps_of(routes, prompt_tokens))
    layers = sorted(set(st[1] for st in steps))
    block = {il: i for i, il in enumerate(layers)}
    n_expert = n_expert or int(routes[:, 2:].max()) + 1
    n_keys = len(layers) * n_expert
    half_life = half_life_tokens * len(layers)  # the native default ages over 16 tokens' steps
    lam = math.log(2.0) / half_life

    slot_key = np.full(slots, -1, dtype=np.int64)
    last = np.zeros(slots, dtype=np.float64)
    pin = np.zeros(slots, dtype=np.int64)
    where = {}                                  # key -> slot
    count = np.zeros(n_keys, dtype=np.float64)  # lfu: uses over the whole history
    score = np.zeros(n_keys, dtype=np.float64)  # default: decayed uses
    at = np.zeros(n_keys, dtype=np.float64)

    # belady: the steps at which each key is used, to find the next use after any step
    future = None
    if policy == "belady":
        future = {}
        for i, (_, il, experts, _, _) in enumerate(steps):
            for e in experts:
                future.setdefault(block[il] * n_expert + int(e), []).append(i)

    hits = misses = 0
    now = 1  # the native clock advances before each wave
    for i, (t0, il, experts, uses, n_pairs) in enumerate(steps):
        counted = t0 >= count_from_token and (stop_token is None or t0 < stop_token)
        keys = [block[il] * n_expert + int(e) for e in experts]
        n_waves = -(-min(n_pairs, n_expert) // slots)
        if n_waves > 1:
            # a split ubatch takes the resident experts first, then by id
            order = sorted(range(len(keys)), key=lambda j: (keys[j] not in where, int(experts[j])))
            keys = [keys[j] for j in order]
            uses = [uses[j] for j in order]
        for w in range(n_waves):
            now += 1
            wave = list(zip(keys[w * slots:(w + 1) * slots], uses[w * slots:(w + 1) * slots]))
            for key, _ in wave:
                if key in where:
                    pin[where[key]] = now
            for key, u in wave:
                s = where.get(key)
                if s is None:
                    free = np.flatnonzero(slot_key < 0)
                    if len(free):
                        s = int(free[0])
                    else:
                        cand = np.flatnonzero(pin < now)
                        s = int(cand[victim(policy, cand, slot_key, last, count, score, at, lam, now, future, i)])
                        del where[int(slot_key[s])]
                    slot_key[s] = key
                    where[key] = s
                    pin[s] = now
                    if counted:
                        misses += 1
                        hits += int(u) - 1
                elif counted:
                    hits += int(u)
                last[s] = now
                count[key] += int(u)  # a use per token, as the native policies count
                score[key] = score[key] * math.exp(-lam * (now - at[key])) + float(u)
                at[key] = now
    total = hits + misses
    return {"policy": policy, "slots": slots, "hits": hits, "misses": misses,
            "hit_rate": hits / total if total else None}


def victim(policy, cand, slot_key, last, count, score, at, lam, now, future, i):
    keys = slot_key[cand]
    if policy == "lru":
        return int(np.argmin(last[cand]))  # argmin: first of equals, the lowest slot index
    if policy == "lfu":
        return lexmin(count[keys], last[cand])
    decayed = score[keys] * np.exp(-lam * (now - at[keys]))
    if policy == "default":
        return lexmin(decayed, last[cand])
    if policy == "belady":
        nxt = np.array([future_of(future, i, int(k)) for k in keys], dtype=np.float64)
        never = np.isinf(nxt)
        if never.any():
            idx = np.flatnonzero(never)
            return int(idx[lexmin(decayed[idx], last[cand][idx])])
        return int(np.argmax(nxt))
    raise ValueError(policy)


def future_of(future, i, key):
    at = future.get(key, [])
    j = bisect.bisect_right(at, i)
    return at[j] if j < len(at) else math.inf


def lexmin(primary: np.ndarray, secondary: np.ndarray) -> int:
    order = np.lexsort((secondary, primary))
    return int(order[0])
