"""Result printers in llama-bench's formats, streaming one row at a time:

- `md`: a table of the columns that say something (llama-bench shows n_batch, n_ubatch and
  ngl only where they differ from the default); t/s as mean ± sample stddev;
- `csv`: every scalar field, a header line, every value quoted;
- `json`: an array of objects with every field and the per-repetition `samples_*` arrays;
- `jsonl`: the same objects, one per line.
"""

from __future__ import annotations

import json
from typing import IO, Callable, List, Optional, Sequence, Tuple

from edgemoe.bench.results import SCALAR_FIELDS, STATUS_OK, Row
from edgemoe.budget import format_bytes

FORMATS = ("md", "csv", "json", "jsonl")
DEFAULT_BATCH, DEFAULT_UBATCH, DEFAULT_NGL = 512, 512, 0


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _params(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _pm(mean: Optional[float], sd: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {sd:.2f}" if sd is not None else f"{mean:.2f}"


def _num(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ts(r: Row) -> str:
    if r.status != STATUS_OK:
        return "OOM" if r.status == "oom" else "error"
    return _pm(r.avg_ts, r.stddev_ts)


def _cache(r: Row) -> str:
    """The budget as given; `auto` with what it chose, where the child got that far."""
    if r.expert_cache != "auto" or r.expert_cache_auto is None:
        return r.expert_cache
    return "auto: off" if r.expert_cache_bytes is None else f"auto: {format_bytes(r.expert_cache_bytes)}"


def _limit(r: Row) -> str:
    if r.mem_limit is None:
        return "-"
    return _gib(r.mem_limit) + ("" if r.mem_limit_cgroup in ("v1", "v2") else " (not enforced)")


# header, right-aligned, minimum width, value
Column = Tuple[str, bool, int, Callable[[Row], str]]


def md_columns(rows_like: Sequence[Row]) -> List[Column]:
    """The markdown columns for rows like these (decided before the first row prints)."""
    cols: List[Column] = [
        ("model", False, 30, lambda r: r.model_type or r.model_filename.rsplit("/", 1)[-1]),
        ("size", True, 10, lambda r: _gib(r.model_size)),
        ("params", True, 10, lambda r: _params(r.model_n_params)),
        ("backend", False, 7, lambda r: r.backends),
        ("threads", True, 7, lambda r: str(r.n_threads)),
    ]
    if any(r.n_batch != DEFAULT_BATCH for r in rows_like):
        cols.append(("n_batch", True, 7, lambda r: str(r.n_batch)))
    if any(r.n_ubatch != DEFAULT_UBATCH for r in rows_like):
        cols.append(("n_ubatch", True, 8, lambda r: str(r.n_ubatch)))
    if any(r.n_gpu_layers != DEFAULT_NGL for r in rows_like):
        cols.append(("ngl", True, 3, lambda r: str(r.n_gpu_layers)))
    cols += [
        ("expert_cache", False, 16 if any(r.expert_cache == "auto" for r in rows_like) else 12, _cache),
        ("policy", False, 7, lambda r: r.policy or "-"),
        ("io", False, 8, lambda r: r.io or "-"),
    ]
    prefetching = any(r.prefetch not in (None, "off") for r in rows_like)
    if prefetching:
        cols.append(("prefetch", False, 9, lambda r: r.prefetch or "-"))
    if any(r.mem_limit is not None for r in rows_like):
        cols.append(("mem_limit", True, 9, _limit))
    if any(r.routes for r in rows_like):
        cols.append(("routes", False, 10, lambda r: r.routes or "-"))
    streams = any(r.schedule for r in rows_like)
    if streams:
        cols += [("n_par", True, 5, lambda r: str(r.n_parallel)), ("schedule", False, 8, lambda r: r.schedule or "-"),
                 ("step", True, 4, lambda r: str(r.step_seqs or r.n_parallel))]
    cols += [
        ("test", False, 10, lambda r: r.test),
        ("t/s", True, 16, _ts),
        ("ttft_ms", True, 14, lambda r: _pm(r.ttft_ms, r.ttft_ms_stddev)),
        ("tpot_ms", True, 14, lambda r: _pm(r.tpot_ms, r.tpot_ms_stddev)),
        ("tpot_p50_ms", True, 11, lambda r: _num(r.tpot_p50_ms)),
        ("tpot_p90_ms", True, 11, lambda r: _num(r.tpot_p90_ms)),
        ("hit_rate", True, 8, lambda r: _num(r.hit_rate, 3)),
        ("bytes_read", True, 12, lambda r: _mib(r.bytes_read)),
        ("stall_ms", True, 9, lambda r: _num(r.stall_ms)),
        ("compute/tok", True, 11, lambda r: _num(r.compute_ms)),
        ("stall/tok", True, 9, lambda r: _num(r.stall_ms_per_token)),
        ("cpu_ms/tok", True, 10, lambda r: _num(r.cpu_s_per_token * 1e3 if r.cpu_s_per_token is not None else None)),
    ]
    if prefetching:
        cols += [
            ("pf_hits", True, 7, lambda r: _num(r.prefetch_hits)),
            ("pf_waste", True, 8, lambda r: _num(r.prefetch_wasted)),
            ("pred_p/r", True, 9, lambda r: "-" if r.pred_precision is None else
             f"{r.pred_precision:.2f}/{r.pred_recall:.2f}"),
        ]
    if streams:
        cols += [
            ("decode t/s", True, 10, lambda r: _num(r.tokens_per_s)),
            ("lat_p50_ms", True, 10, lambda r: _num(r.latency_p50_ms)),
            ("lat_p95_ms", True, 10, lambda r: _num(r.latency_p95_ms)),
            ("experts/step", True, 12, lambda r: _num(r.unique_experts_per_step)),
        ]
    cols.append(("peak_rss_bytes", True, 14, lambda r: _gib(r.peak_rss_bytes)))
    return cols


class Printer:
    """Prints rows as they come: begin() once, row() per row, end() once."""

    def __init__(self, fmt: str, out: IO[str], rows_like: Sequence[Row] = ()):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.fmt, self.out = fmt, out
        self._n = 0
        self._cols = md_columns(rows_like) if fmt == "md" else []

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _md_line(self, cells: List[str]) -> str:
        parts = []
        for (name, right, width, _), cell in zip(self._cols, cells):
            w = max(width, len(name))
            parts.append(cell.rjust(w) if right else cell.ljust(w))
        return "| " + " | ".join(parts) + " |\n"

    def begin(self) -> None:
        if self.fmt == "md":
            self._write(self._md_line([c[0] for c in self._cols]))
            rule = []
            for name, right, width, _ in self._cols:
                w = max(width, len(name))
                rule.append("-" * (w - 1) + ":" if right else "-" * w)
            self._write("| " + " | ".join(rule) + " |\n")
        elif self.fmt == "csv":
            self._write(",".join(SCALAR_FIELDS) + "\n")
        elif self.fmt == "json":
            self._write("[\n")

    def row(self, r: Row) -> None:
        if self.fmt == "md":
            self._write(self._md_line([fn(r) for *_, fn in self._cols]))
        elif self.fmt == "csv":
            d = r.to_dict()
            self._write(",".join(_csv_cell(d[name]) for name in SCALAR_FIELDS) + "\n")
        elif self.fmt == "json":
            text = json.dumps(r.to_dict(), indent=2)
            self._write(("" if self._n == 0 else ",\n") + "\n".join("  " + line for line in text.splitlines()))
        else:
            self._write(json.dumps(r.to_dict(), separators=(",", ":")) + "\n")
        self._n += 1

    def end(self) -> None:
        if self.fmt == "json":
            self._write(("\n" if self._n else "") + "]\n")


def _csv_cell(value) -> str:
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "1" if value else "0"
    else:
        text = str(value)
    return '"' + text.replace('"', '""') + '"'
