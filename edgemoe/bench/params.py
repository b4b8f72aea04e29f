"""Benchmark parameters: list-valued flags as llama-bench takes them, and their expansion into
one configuration per combination, each run in its own child process.

A cache-off baseline (`--baseline`) shares the memory limit of the configurations it is
compared with: under `--mem-limit auto` one baseline per budget, placed after that budget's
rows, so that each stock row stands beside the edgemoe rows of the same limit.

A budget of `auto` is sized in the child, from the limit it runs under (edgemoe.auto_budget).
Under `--mem-limit auto` it gets stock's limit, room for every expert: the same memory as the
stock row beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, List, Optional, Sequence, Tuple

from edgemoe.budget import Budget, format_bytes, parse_budget
from edgemoe.errors import InvalidArgumentError

# What `--mem-limit auto` adds to non-expert bytes + budget: the interpreter, numpy,
# llama-cpp-python, compute and KV buffers (issue 2 measured about 150 MiB on small models).
AUTO_OVERHEAD = 300 << 20
AUTO = "auto"


def split_list(values: Iterable[str]) -> List[str]:
    """`-t 1,2 -t 4` -> ['1', '2', '4'], as llama-bench reads a repeated or comma-listed flag."""
    out = []
    for v in values:
        out += [x.strip() for x in str(v).split(",") if x.strip()]
    return out


def int_list(values: Iterable[str], flag: str, minimum: int = 0) -> List[int]:
    out = []
    for x in split_list(values):
        try:
            n = int(x)
        except ValueError:
            raise InvalidArgumentError(f"{flag} takes integers, got {x!r}") from None
        if n < minimum:
            raise InvalidArgumentError(f"{flag} must be at least {minimum}, got {n}")
        out.append(n)
    return unique(out)


def unique(items: Sequence) -> list:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class BenchTest:
    """One timed test: `pp` (a prompt of n_prompt random tokens in one call), `tg` (n_gen
    single-token decodes of random tokens from an empty context), `prompt` (a prompt from
    --prompts, then n_gen greedy decodes continuing it), or `streams` (--parallel: one such
    request per sequence, all at once, decoded together by edgemoe.generator; prompts from
    --prompts, else n_prompt random tokens)."""

    kind: str
    n_prompt: int = 0
    n_gen: int = 0

    @property
    def name(self) -> str:
        if self.kind == "pp":
            return f"pp{self.n_prompt}"
        if self.kind == "tg":
            return f"tg{self.n_gen}"
        if self.kind == "streams":
            return f"streams pp{self.n_prompt}+tg{self.n_gen}" if self.n_prompt else f"streams tg{self.n_gen}"
        return f"prompt+tg{self.n_gen}"


@dataclass(frozen=True)
class ModelFacts:
    """What expansion needs to know about a model (from edgemoe.cache.inspect_model)."""

    path: str
    expert_bytes: int
    non_expert_bytes: int
    min_budget_bytes: int
    n_moe_layer: int


@dataclass(frozen=True)
class Config:
    """One child process: a model with one cache setting under one memory limit."""

    model: str
    n_threads: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    expert_cache: Optional[str]  # as the user wrote it ("25%", "800MiB"); None: cache off
    policy: Optional[str]        # None with the cache off
    io: Optional[str]
    mem_limit: Optional[int] = None
    tests: Tuple[BenchTest, ...] = field(default_factory=tuple)
    prefetch: Optional[str] = None     # None with the cache off; "off" or "lookahead"
    lookahead: int = 1
    prefetch_top: int = 0
    n_parallel: int = 1                # sequences decoded together (streams tests)
    schedule: Optional[str] = None     # their step scheduler: fifo or expert; None: one sequence
    step_seqs: Optional[int] = None    # sequences a step decodes; None: every ready one

    @property
    def prefetch_label(self) -> str:
        """`off`, `auto`, `lookahead` (one layer ahead, half of top-k), or `lookahead:D` /
        `lookahead:D:M`."""
        if self.prefetch not in ("lookahead", "auto"):
            return self.prefetch or "-"
        if self.prefetch_top:
            return f"{self.prefetch}:{self.lookahead}:{self.prefetch_top}"
        return self.prefetch if self.lookahead == 1 else f"{self.prefetch}:{self.lookahead}"

    @property
    def label(self) -> str:
        cache = f"{self.expert_cache} {self.policy} {self.io}" if self.expert_cache else "cache off"
        if self.expert_cache and self.prefetch not in (None, "off"):
            cache += f" prefetch {self.prefetch_label}"
        limit = f", limit {format_bytes(self.mem_limit)}" if self.mem_limit else ""
        streams = f" x{self.n_parallel} {self.schedule}" if self.schedule else ""
        streams += f" step {self.step_seqs}" if self.step_seqs else ""
        return f"{self.model.rsplit('/', 1)[-1]} t={self.n_threads} {cache}{limit}{streams}"


def budget_bytes(budget: Budget, facts: ModelFacts) -> int:
    if budget.bytes is not None:
        return budget.bytes
    return math.ceil(budget.fraction * facts.expert_bytes)


def check_budget(text: str, facts: ModelFacts) -> None:
    """A budget below the model's minimum fails here, before any child runs."""
    budget = parse_budget(text)
    if budget is None or budget.auto or facts.n_moe_layer == 0:
        return  # dense models run without a cache (the engine says so); auto is never below it
    if budget_bytes(budget, facts) < facts.min_budget_bytes:
        raise InvalidArgumentError(
            f"expert-cache budget {text} of {facts.path} is {format_bytes(budget_bytes(budget, facts))}, "
            f"below the minimum of {format_bytes(facts.min_budget_bytes)} ({facts.min_budget_bytes} bytes)")


def check_limit(limit: int, facts: ModelFacts) -> None:
    """A fixed limit must at least hold the non-expert weights and the smallest cache."""
    need = facts.non_expert_bytes + facts.min_budget_bytes
    if limit < need:
        raise InvalidArgumentError(
            f"--mem-limit {format_bytes(limit)} is too small for {facts.path}: the non-expert weights "
            f"({format_bytes(facts.non_expert_bytes)}) and the minimum expert-cache budget "
            f"({format_bytes(facts.min_budget_bytes)}) alone need {format_bytes(need)}")


def auto_limit(expert_cache: Optional[str], facts: ModelFacts) -> int:
    """non-expert bytes + budget + AUTO_OVERHEAD; a cache-off or `auto` run gets room for every expert."""
    budget = parse_budget(expert_cache)
    held = facts.expert_bytes if budget is None or budget.auto else min(budget_bytes(budget, facts),
                                                                         facts.expert_bytes)
    return facts.non_expert_bytes + held + AUTO_OVERHEAD


def expand(facts: Sequence[ModelFacts], threads: Sequence[int], n_batch: Sequence[int], n_ubatch: Sequence[int],
           n_gpu_layers: Sequence[int], caches: Sequence[str], policies: Sequence[str], ios: Sequence[str],
           baseline: bool, mem_limit: Optional[str], tests: Sequence[BenchTest],
           prefetches: Sequence[str] = ("off",), lookaheads: Sequence[int] = (1,),
           prefetch_tops: Sequence[int] = (0,), parallels: Sequence[int] = (),
           schedules: Sequence[str] = ("fifo",), step_seqs: Optional[int] = None) -> List[Config]:
    """Every combination, in llama-bench's order (model outermost), duplicates dropped.

    Args:
        caches: budgets as written, "off" for the cache off.
        mem_limit: None, AUTO, or a size already checked and given in bytes as a string.
        prefetches: "off", "lookahead"; lookaheads and prefetch_tops vary the lookahead ones.
        parallels, schedules: with parallels, every configuration runs once per (n_parallel,
            schedule); stock llama.cpp (the cache off) only with fifo, what llama-server does.
    """
    variants = []
    for p in prefetches:
        if p == "off":
            variants.append(dict(prefetch="off"))
        else:
            variants += [dict(prefetch=p, lookahead=d, prefetch_top=top) for d in lookaheads for top in prefetch_tops]
    out: List[Config] = []
    for m in facts:
        for t in threads:
            for b in n_batch:
                for ub in n_ubatch:
                    for ngl in n_gpu_layers:
                        base = Config(m.path, t, b, ub, ngl, None, None, None, None, tuple(tests))
                        fixed = int(mem_limit) if mem_limit not in (None, AUTO) else None
                        for cache in caches:
                            off = parse_budget(cache) is None
                            limit = auto_limit(None if off else cache, m) if mem_limit == AUTO else fixed
                            if off:
                                out.append(replace(base, mem_limit=limit))
                                continue
                            for policy in policies:
                                for io in ios:
                                    for v in variants:
                                        out.append(replace(base, expert_cache=cache, policy=policy, io=io,
                                                           mem_limit=limit, **v))
                            if baseline and mem_limit == AUTO:
                                out.append(replace(base, mem_limit=limit))
                        if baseline and mem_limit != AUTO:
                            out.append(replace(base, mem_limit=fixed))
    if parallels:
        out = [replace(c, n_parallel=n, schedule=s, step_seqs=step_seqs if step_seqs and step_seqs < n else None)
               for c in out for n in parallels for s in schedules
               if c.expert_cache is not None or s == "fifo"]
    return unique(out)
