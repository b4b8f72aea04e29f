"""`edgemoe info`: what a GGUF holds, as the expert cache sees it.

Read from the header alone (edgemoe.gguf_header), so it is instant on any model size and
needs no native library. The expert layout follows the cache's own rules (native
model_layout): a layer's routed experts are its `blk.N.ffn_{gate,up,down,gate_up}_exps`
tensors; layers whose expert tensors agree in role, type and shape share one slot pool; the
minimum budget holds one token's experts (n_expert_used) in every pool; a slice is aligned
when its tensor starts on a 4096-byte boundary and one expert's bytes are a multiple of 4096.
The JSON fields are described in docs/info.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import click

from edgemoe.budget import format_bytes
from edgemoe.errors import EdgemoeError, ModelFormatError
from edgemoe.gguf_header import GGUFHeader, TensorInfo, read_header
from edgemoe.version import VERSION_KEY
from edgemoe.errors import CliError

SLICE_ALIGNMENT = 4096  # O_DIRECT's page
ROUTER_PREFIX = "edgemoe.router."
INFLATE_PREFIX = "edgemoe.inflate."  # written by `edgemoe inflate` (edgemoe/inflate.py)
EXPERT_ROLES = ("gate", "up", "down", "gate_up")

# display order of tensor roles
ROLES = ("token_embd", "output", "attention", "router", "experts.gate", "experts.up", "experts.down",
         "experts.gate_up", "shared_experts", "dense_ffn", "norms", "edgemoe_router", "other")

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_EXPS = re.compile(r"^ffn_(gate|up|down|gate_up)_exps$")


@dataclass(frozen=True)
class SliceInfo:
    """One role of one expert: its type, matrix shape (ggml order) and bytes."""

    type: str
    shape: Tuple[int, int]
    slice_bytes: int


@dataclass(frozen=True)
class PoolInfo:
    """Layers whose experts share one slot layout (the cache gives them one slot pool)."""

    layers: List[int]
    roles: Dict[str, SliceInfo]
    slot_bytes: int  # one expert, every role


@dataclass(frozen=True)
class RoleInfo:
    bytes: int
    types: Dict[str, int]  # ggml type -> tensor count


@dataclass(frozen=True)
class RouterInfo:
    kind: Optional[str]
    version: Optional[int]
    n_tensors: int
    bytes: int
    keys: Dict[str, object]
    tensors: List[str]


@dataclass(frozen=True)
class ModelReport:
    path: str
    file_bytes: int
    gguf_version: int
    alignment: int
    architecture: str
    name: Optional[str]
    n_layer: int
    n_tensors: int
    n_params: int
    moe_layers: List[int]
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    shared_expert_width: Optional[int]
    shared_expert_gate: bool
    expert_bytes: int
    non_expert_bytes: int
    pools: List[PoolInfo]
    slice_alignment: int
    slices_aligned: Optional[bool]     # None for a dense model
    misaligned_offsets: List[str]      # expert tensors that start off a page boundary
    odd_slice_sizes: List[str]         # expert tensors whose one-expert slice is not whole pages
    min_budget_bytes: int
    roles: Dict[str, RoleInfo]
    router: Optional[RouterInfo]
    dense: bool = field(default=False)
    inflate: Optional[Dict[str, object]] = None  # the edgemoe.inflate.* keys, prefix dropped
    license: Optional[str] = None      # general.license
    source: Optional[str] = None       # general.source.url, else general.source
    written_by: Optional[str] = None   # edgemoe.version: the edgemoe that wrote the file

    @property
    def n_moe_layer(self) -> int:
        return len(self.moe_layers)

    def to_json(self) -> dict:
        out = asdict(self)
        out["n_moe_layer"] = self.n_moe_layer
        out["expert_fraction"] = self.expert_bytes / (self.expert_bytes + self.non_expert_bytes) \
            if self.expert_bytes + self.non_expert_bytes else 0.0
        for pool in out["pools"]:
            for role in pool["roles"].values():
                role["shape"] = list(role["shape"])
        return out


def _role_of(name: str) -> Tuple[str, Optional[int], Optional[str]]:
    """(display role, layer, expert role) of a tensor name."""
    if name.startswith(ROUTER_PREFIX):
        return "edgemoe_router", None, None
    if name == "token_embd.weight":
        return "token_embd", None, None
    if name == "output.weight":
        return "output", None, None
    if name.endswith("_norm.weight"):
        return "norms", None, None
    m = _BLOCK.match(name)
    if not m:
        return "other", None, None
    layer, part = int(m.group(1)), m.group(2)
    e = _EXPS.match(part)
    if e and m.group(3) == "weight":
        return f"experts.{e.group(1)}", layer, e.group(1)
    if part.endswith("_norm") or part.endswith("_norm_b"):
        return "norms", layer, None
    if part in ("ffn_gate_inp", "exp_probs_b"):
        return "router", layer, None
    if part.endswith("_shexp"):
        return "shared_experts", layer, None
    if part.startswith("attn_"):
        return "attention", layer, None
    if part in ("ffn_gate", "ffn_up", "ffn_down"):
        return "dense_ffn", layer, None
    return "other", layer, None


def _int_key(h: GGUFHeader, key: str) -> Optional[int]:
    value = h.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pools(h: GGUFHeader, experts: Dict[int, Dict[str, TensorInfo]]) -> List[PoolInfo]:
    pools: Dict[tuple, PoolInfo] = {}
    for layer in sorted(experts):
        roles = experts[layer]
        if "down" not in roles or not ("up" in roles or "gate_up" in roles):
            raise ModelFormatError(f"{h.path}: layer {layer} has incomplete expert tensors")
        slices = {r: SliceInfo(t.type_name, (t.ne[0], t.ne[1]), t.nbytes // t.ne[2])
                  for r, t in sorted(roles.items(), key=lambda kv: EXPERT_ROLES.index(kv[0]))}
        key = tuple(sorted(slices.items()))
        if key not in pools:
            pools[key] = PoolInfo(layers=[], roles=slices, slot_bytes=sum(s.slice_bytes for s in slices.values()))
        pools[key].layers.append(layer)
    return list(pools.values())


def describe(path) -> ModelReport:
    """Reads the GGUF at `path` and reports its experts, types and router.

    Raises:
        EdgemoeIOError: the file cannot be opened.
        ModelFormatError: not a GGUF, truncated, or an expert layout the cache cannot use.
    """
    h = read_header(path)
    arch = h.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{h.path}: no general.architecture key")

    roles: Dict[str, RoleInfo] = {}
    experts: Dict[int, Dict[str, TensorInfo]] = {}
    shared_width = None
    shared_gate = False
    router_tensors: List[TensorInfo] = []
    for t in h.tensors:
        role, layer, expert_role = _role_of(t.name)
        if expert_role is not None:
            if len(t.ne) != 3:
                raise ModelFormatError(f"{h.path}: expert tensor {t.name} is not 3-dimensional")
            experts.setdefault(layer, {})[expert_role] = t
        if role == "shared_experts":
            shared_gate |= t.name.endswith("ffn_gate_inp_shexp.weight")
            if t.name.endswith("ffn_up_shexp.weight") and shared_width is None:
                shared_width = t.ne[1]
        if role == "edgemoe_router":
            router_tensors.append(t)
        info = roles.get(role, RoleInfo(0, {}))
        types = dict(info.types)
        types[t.type_name] = types.get(t.type_name, 0) + 1
        roles[role] = RoleInfo(info.bytes + t.nbytes, types)

    n_expert = _int_key(h, f"{arch}.expert_count") or 0
    counts = {t.ne[2] for layer in experts.values() for t in layer.values()}
    if len(counts) > 1:
        raise ModelFormatError(f"{h.path}: expert tensors disagree on the expert count ({sorted(counts)})")
    if counts:
        tensor_count = counts.pop()
        if n_expert and n_expert != tensor_count:
            raise ModelFormatError(f"{h.path}: {arch}.expert_count ({n_expert}) disagrees with the expert "
                                   f"tensors ({tensor_count})")
        n_expert = tensor_count
    n_expert_used = _int_key(h, f"{arch}.expert_used_count") or 0
    if experts and not 0 < n_expert_used <= n_expert:
        raise ModelFormatError(f"{h.path}: missing or invalid {arch}.expert_used_count")
    n_shared = _int_key(h, f"{arch}.expert_shared_count")
    if n_shared is None:
        n_shared = 1 if shared_width is not None else 0

    pools = _pools(h, experts)
    expert_bytes = sum(t.nbytes for layer in experts.values() for t in layer.values())
    expert_tensors = sorted((t for layer in experts.values() for t in layer.values()), key=lambda t: t.offset)
    misaligned = [t.name for t in expert_tensors if (h.data_offset + t.offset) % SLICE_ALIGNMENT]
    odd_sizes = [t.name for t in expert_tensors if (t.nbytes // t.ne[2]) % SLICE_ALIGNMENT]

    router = None
    router_keys = {k: v for k, v in h.kv.items() if k.startswith(ROUTER_PREFIX)}
    if router_keys or router_tensors:
        kind = router_keys.get(ROUTER_PREFIX + "kind")
        version = router_keys.get(ROUTER_PREFIX + "version")
        # arrays can be long; the report keeps scalars and the length of lists
        keys = {k: (v if not isinstance(v, list) else f"[{len(v)} values]") for k, v in router_keys.items()}
        router = RouterInfo(kind=kind if isinstance(kind, str) else None,
                            version=version if isinstance(version, int) else None,
                            n_tensors=len(router_tensors), bytes=sum(t.nbytes for t in router_tensors),
                            keys=keys, tensors=[t.name for t in router_tensors])

    inflate = {k[len(INFLATE_PREFIX):]: v for k, v in h.kv.items() if k.startswith(INFLATE_PREFIX)} or None

    total = sum(t.nbytes for t in h.tensors)
    name = h.get("general.name")

    def text(*keys):
        return next((v for v in (h.get(k) for k in keys) if isinstance(v, str)), None)

    return ModelReport(
        path=h.path, file_bytes=h.file_size, gguf_version=h.version, alignment=h.alignment,
        architecture=arch, name=name if isinstance(name, str) else None,
        n_layer=_int_key(h, f"{arch}.block_count") or 0, n_tensors=len(h.tensors),
        n_params=sum(math.prod(t.ne) for t in h.tensors),
        moe_layers=sorted(experts), n_expert=n_expert if experts else 0,
        n_expert_used=n_expert_used if experts else 0, n_expert_shared=n_shared if experts else 0,
        shared_expert_width=shared_width, shared_expert_gate=shared_gate,
        expert_bytes=expert_bytes, non_expert_bytes=total - expert_bytes, pools=pools,
        slice_alignment=SLICE_ALIGNMENT,
        slices_aligned=not (misaligned or odd_sizes) if experts else None,
        misaligned_offsets=misaligned, odd_slice_sizes=odd_sizes,
        min_budget_bytes=n_expert_used * sum(p.slot_bytes for p in pools) if experts else 0,
        roles={r: roles[r] for r in ROLES if r in roles}, router=router, dense=not experts, inflate=inflate,
        license=text("general.license"), source=text("general.source.url", "general.source"),
        written_by=text(VERSION_KEY),
    )


def _ranges(values: List[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def _bytes(n: int) -> str:
    return f"{n:,} B ({format_bytes(n)})" if n >= 1024 else f"{n} B"


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _inflate_row(keys: Dict[str, object]) -> str:
    """`expert FFN 32 -> 5632 (random fill, seed 0) from SRC (N B, sha256 0123456789ab...)`."""
    text = f"expert FFN {keys.get('source_expert_ff', '?')} -> {keys.get('expert_ff', '?')}"
    how = [f"{keys['fill']} fill" if "fill" in keys else None, f"seed {keys['seed']}" if "seed" in keys else None]
    how = [h for h in how if h]
    if how:
        text += f" ({', '.join(how)})"
    if "source_name" in keys:
        text += f" from {keys['source_name']}"
        about = []
        if isinstance(keys.get("source_bytes"), int):
            about.append(f"{keys['source_bytes']:,} B")
        if isinstance(keys.get("source_sha256"), str):
            about.append(f"sha256 {keys['source_sha256'][:16]}...")
        if about:
            text += f" ({', '.join(about)})"
    return text


def format_report(r: ModelReport) -> str:
    """The human table `edgemoe info` prints."""
    rows: List[Tuple[str, str]] = [
        ("file", f"{r.path} ({_bytes(r.file_bytes)}, GGUF v{r.gguf_version}, data alignment {r.alignment})"),
        ("architecture", r.architecture + (f" ({r.name})" if r.name else "")),
        ("parameters", f"{_params(r.n_params)} in {r.n_tensors} tensors"),
    ]
    if r.license or r.source:
        rows.append(("license", (r.license or "not stated") + (f" (source: {r.source})" if r.source else "")))
    if r.written_by:
        rows.append(("written by", f"edgemoe {r.written_by}"))
    total = r.expert_bytes + r.non_expert_bytes
    if r.dense:
        rows += [("layers", f"{r.n_layer}, none with routed experts"),
                 ("experts", "none: a dense model (the expert cache does not apply)"),
                 ("tensor bytes", _bytes(total))]
    else:
        shared = "no shared experts"
        if r.n_expert_shared:
            shared = f"{r.n_expert_shared} shared"
            if r.shared_expert_width:
                total_width = "width" if r.n_expert_shared == 1 else "total width"
                shared += f" ({total_width} {r.shared_expert_width}{', gated' if r.shared_expert_gate else ''})"
        rows += [
            ("layers", f"{r.n_layer}, {r.n_moe_layer} with routed experts ({_ranges(r.moe_layers)})"),
            ("experts", f"{r.n_expert} routed, {r.n_expert_used} used per token, {shared}"),
            ("expert bytes", f"{_bytes(r.expert_bytes)}, {100.0 * r.expert_bytes / total:.1f} % of tensor bytes"),
            ("non-expert bytes", _bytes(r.non_expert_bytes)),
            ("slot pools", f"{len(r.pools)} (layers whose experts share one layout)"),
        ]
        for i, p in enumerate(r.pools):
            parts = ", ".join(f"{role} {s.type} {s.shape[0]}x{s.shape[1]} {s.slice_bytes:,} B"
                              for role, s in p.roles.items())
            rows.append((f"  pool {i}", f"layers {_ranges(p.layers)}: {parts}; {p.slot_bytes:,} B per expert"))
        if r.slices_aligned:
            aligned = f"yes: every slice starts on a {r.slice_alignment}-byte boundary and spans whole pages"
        else:
            why = []
            if r.misaligned_offsets:
                why.append(f"{len(r.misaligned_offsets)} expert tensors start off a {r.slice_alignment}-byte "
                           f"boundary (`edgemoe convert --align {r.slice_alignment}` fixes that)")
            if r.odd_slice_sizes:
                why.append(f"{len(r.odd_slice_sizes)} have one-expert slices that are not a multiple of "
                           f"{r.slice_alignment} bytes (a property of the shape and type)")
            aligned = "no: " + "; ".join(why) + "; O_DIRECT then reads the pages around each slice"
        rows += [
            ("slices aligned", aligned),
            ("min cache budget", f"{_bytes(r.min_budget_bytes)} = {r.n_expert_used} experts in each pool, "
                                 f"{100.0 * r.min_budget_bytes / r.expert_bytes:.2f} % of expert bytes"),
        ]
    if r.router is None:
        rows.append(("router", "none"))
    else:
        kind = r.router.kind or "unknown kind"
        version = f" v{r.router.version}" if r.router.version is not None else ""
        rows.append(("router", f"{kind}{version}: {r.router.n_tensors} tensors, {_bytes(r.router.bytes)}"))
    if r.inflate is not None:
        rows.append(("inflated", _inflate_row(r.inflate)))
    rows.append(("types", ""))
    for role, info in r.roles.items():
        types = ", ".join(f"{t}" if n == 1 else f"{t} x{n}" for t, n in info.types.items())
        rows.append((f"  {role}", f"{types} ({format_bytes(info.bytes)})"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}".rstrip() for k, v in rows)


@click.command("info")
@click.argument("model", metavar="MODEL")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (fields: docs/info.md).")
def info_command(model: str, as_json: bool) -> None:
    """Describe MODEL (a GGUF): architecture, layers, experts and their bytes, slice
    alignment, quant types per role, router, and the minimum expert-cache budget.

    Only the header is read. With --json: one object whose fields are documented in
    docs/info.md (sizes in bytes, expert shapes in ggml order: row length first).
    """
    try:
        report = describe(model)
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(format_report(report))
