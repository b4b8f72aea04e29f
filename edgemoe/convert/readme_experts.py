"""The experts of one Read-ME MoE layer, laid out as llama.cpp's bailingmoe wants them.

Read-ME (`LlamaDecoderLayer.convert_masked_dense_to_moe`) saves each layer's experts as
`moe.{gate,up,down}_proj_{e}`, either fused (every expert also holds the always-on residual
channels) or beside a separate residual `moe.{gate,up,down}_proj_residual`. bailingmoe has
routed experts of one width and an always-on shared expert whose width is a multiple of it.

A fused layer is split exactly: a channel is a (gate row, up row, down column) triple, an
expert's output is the sum over its channels, so the channels every expert holds (as a
multiset) can move to the shared expert without changing any expert's output. Zero channels
pad experts and the shared expert to the widths bailingmoe needs; they add exactly zero
(silu(0) * 0 = 0).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Set, Tuple

import numpy as np

from edgemoe.convert.safetensors import Checkpoint
from edgemoe.errors import ConvertError

_PROJ = ("gate", "up", "down")


@dataclass(frozen=True)
class FFNSource:
    """One gated FFN in the checkpoint: its three tensors and which channels of them to take
    (None: all, in order)."""

    gate: str
    up: str
    down: str
    channels: Optional[Tuple[int, ...]] = None

    def width(self, ckpt: Checkpoint) -> int:
        return len(self.channels) if self.channels is not None else int(ckpt.shape(self.gate)[0])

    def rows(self, ckpt: Checkpoint, proj: str, width: int) -> np.ndarray:
        """gate or up as [width, n_embd], down as [n_embd, width]; zero channels fill the rest."""
        w = ckpt.tensor(getattr(self, proj)).astype(np.float32, copy=False)
        axis = 1 if proj == "down" else 0
        if self.channels is not None:
            w = np.take(w, np.asarray(self.channels, dtype=np.int64), axis=axis)
        pad = width - w.shape[axis]
        if pad:
            w = np.concatenate([w, np.zeros((pad, w.shape[1]) if axis == 0 else (w.shape[0], pad), np.float32)],
                               axis=axis)
        return w


@dataclass(frozen=True)
class LayerExperts:
    """One MoE layer's routed experts and always-on residual (None: it has none)."""

    experts: Tuple[FFNSource, ...]
    residual: Optional[FFNSource]
    split_from_fused: bool

    def expert_width(self, ckpt: Checkpoint) -> int:
        return max(e.width(ckpt) for e in self.experts)

    def residual_width(self, ckpt: Checkpoint) -> int:
        return self.residual.width(ckpt) if self.residual is not None else 0


def shared_count(n_residual: int, n_ff_exp: int) -> int:
    """Expert widths the shared expert needs: bailingmoe always has one, zeros where there is
    no residual."""
    return max(1, -(-n_residual // n_ff_exp))


def _names(prefix: str, suffix: str) -> FFNSource:
    return FFNSource(*(f"{prefix}{p}_proj_{suffix}.weight" for p in _PROJ))


def _check_shapes(ckpt: Checkpoint, src: FFNSource, n_embd: int, directory: str) -> None:
    for name in (src.gate, src.up, src.down):
        if name not in ckpt:
            raise ConvertError(f"{directory}: tensor {name} is missing")
    g, u, d = (tuple(ckpt.shape(n)) for n in (src.gate, src.up, src.down))
    if len(g) != 2 or g[1] != n_embd or u != g or d != (n_embd, g[0]):
        raise ConvertError(f"{directory}: {src.gate} {list(g)}, {src.up} {list(u)} and {src.down} {list(d)} "
                           f"are not one gated FFN over hidden size {n_embd}")


def _channel_keys(ckpt: Checkpoint, src: FFNSource) -> List[bytes]:
    """A digest per channel of its gate row, up row and down column: equal digests, equal channels."""
    g, u = ckpt.tensor(src.gate), ckpt.tensor(src.up)
    d = np.ascontiguousarray(ckpt.tensor(src.down).T)
    return [hashlib.blake2b(g[j].tobytes() + u[j].tobytes() + d[j].tobytes(), digest_size=32).digest()
            for j in range(g.shape[0])]


def _split_fused(ckpt: Checkpoint, experts: Sequence[FFNSource]) -> Tuple[Optional[FFNSource], Tuple[FFNSource, ...]]:
    """The channels all experts share (taken from expert 0, in its order) and each expert's own."""
    keys = [_channel_keys(ckpt, e) for e in experts]
    common = Counter(keys[0])
    for k in keys[1:]:
        common &= Counter(k)
    if not common:
        return None, tuple(experts)
    parts = []
    for ks in keys:
        left = Counter(common)
        shared, own = [], []
        for j, k in enumerate(ks):
            if left[k]:
                left[k] -= 1
                shared.append(j)
            else:
                own.append(j)
        parts.append((tuple(shared), tuple(own)))
    if not any(own for _, own in parts):  # identical experts: keep them whole, nothing to move
        return None, tuple(experts)
    residual = replace(experts[0], channels=parts[0][0])
    return residual, tuple(replace(e, channels=own) for e, (_, own) in zip(experts, parts))


def plan_layer(ckpt: Checkpoint, layer: int, n_cluster: int, n_embd: int, used: Set[str],
               directory: str) -> LayerExperts:
    """The experts of `model.layers.{layer}.moe`; marks the tensors it reads in `used`."""
    prefix = f"model.layers.{layer}.moe."
    n_found = 0
    while f"{prefix}gate_proj_{n_found}.weight" in ckpt:
        n_found += 1
    if n_found == 0:
        if f"model.layers.{layer}.mlp.gate_proj.weight" in ckpt:
            raise ConvertError(
                f"{directory}: layer {layer} is a masked dense MLP (Read-ME before convert_masked_dense_to_moe): "
                "its experts live in a separate mask file; convert it to the moe.*_proj_{e} layout first")
        raise ConvertError(f"{directory}: layer {layer} has no experts ({prefix}gate_proj_0.weight)")
    if n_found != n_cluster:
        raise ConvertError(f"{directory}: layer {layer} has {n_found} experts ({prefix}gate_proj_0..{n_found - 1}), "
                           f"config.json N_cluster is {n_cluster}")
    experts = tuple(_names(prefix, str(e)) for e in range(n_found))
    residual = _names(prefix, "residual") if f"{prefix}gate_proj_residual.weight" in ckpt else None
    for src in experts + ((residual,) if residual else ()):
        _check_shapes(ckpt, src, n_embd, directory)
        used.update((src.gate, src.up, src.down))
    split = False
    if residual is None:
        residual, experts = _split_fused(ckpt, experts)
        split = residual is not None
    return LayerExperts(experts, residual, split)
