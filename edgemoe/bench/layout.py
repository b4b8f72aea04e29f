"""Where a GGUF's routed experts lie: which llama.cpp layers have them, and the file extent of
every expert's slice of every role (up, gate, down, gate_up), from edgemoe.gguf_header (which
reads the header only: gguf.GGUFReader takes seconds on a large vocabulary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from edgemoe.gguf_header import read_header

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(up|gate|down|gate_up)_exps\.weight$")


@dataclass(frozen=True)
class ExpertLayout:
    """Routed experts of a GGUF, by llama.cpp layer index."""

    moe_layers: List[int]
    n_expert: int
    # (layer, expert) -> [(file offset, bytes)] one per role, in file order
    slices: Dict[Tuple[int, int], List[Tuple[int, int]]] = field(repr=False)

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of `layer`, all roles."""
        return sum(size for _, size in self.slices[(layer, 0)])

    @property
    def mean_expert_bytes(self) -> float:
        return sum(self.expert_bytes(il) for il in self.moe_layers) / len(self.moe_layers)


def expert_layout(path) -> ExpertLayout:
    """The routed experts of a GGUF; a dense model has no MoE layers (an empty layout)."""
    header = read_header(path)
    slices: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    layers, n_expert = set(), 0
    for t in sorted(header.tensors, key=lambda t: t.offset):
        m = _EXPS.match(t.name)
        if not m:
            continue
        layer, n = int(m.group(1)), t.ne[-1]
        per = t.nbytes // n
        layers.add(layer)
        n_expert = max(n_expert, n)
        for e in range(n):
            slices.setdefault((layer, e), []).append((header.data_offset + t.offset + e * per, per))
    return ExpertLayout(moe_layers=sorted(layers), n_expert=n_expert, slices=slices)
