"""An existing GGUF as a plan for re-emitting it: every key and every tensor byte unchanged,
only the data alignment (and, on request, the router) different."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import numpy as np

import gguf
from gguf import GGUFValueType as VT

from edgemoe.convert.writer import KV, TensorPlan
from edgemoe.errors import ConvertError
from edgemoe.files import check_model_file
from edgemoe.router_format import PREFIX as ROUTER_PREFIX
from edgemoe.router_format import Backbone, Router, read_gguf_router

# keys the writer sets itself
_WRITER_KEYS = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT}


def open_gguf(path: str) -> "gguf.GGUFReader":
    from edgemoe.errors import EdgemoeIOError, ModelFormatError
    from edgemoe.gguf_header import read_header

    check_model_file(path)
    # gguf's reader trusts the file's counts (an array claiming 2^40 elements past the end of
    # the file makes it loop and allocate without end): the bounds-checked header parse first
    try:
        read_header(path)
    except (ModelFormatError, EdgemoeIOError) as e:
        raise ConvertError(str(e)) from None
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on damaged headers
        raise ConvertError(f"{path}: corrupt or truncated GGUF ({' '.join(str(e).split())})") from None


@dataclass
class GGUFPlan:
    arch: str
    kv: List[KV]
    tensors: List[TensorPlan]
    router: Optional[Router]        # the router the file already carries
    backbone: Backbone
    alignment: int

    def without_router(self) -> "GGUFPlan":
        """The same file less its `edgemoe.router.*` keys and tensors."""
        return replace(self, router=None,
                       kv=[item for item in self.kv if not item[0].startswith(ROUTER_PREFIX)],
                       tensors=[t for t in self.tensors if not t.name.startswith(ROUTER_PREFIX)])


def _value(field) -> Tuple[object, VT, Optional[VT]]:
    vtype = VT(field.types[0])
    if vtype == VT.ARRAY:
        if len(field.types) > 2:
            raise ConvertError(f"key {field.name}: nested arrays are not supported")
        sub = VT(field.types[1]) if len(field.types) > 1 else VT.UINT8
        return list(field.contents()), vtype, sub
    return field.contents(), vtype, None


def backbone_of(reader: "gguf.GGUFReader", arch: str) -> Backbone:
    def get(key: str, default=0):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    tokens = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    n_vocab = len(tokens.data) if tokens is not None else 0
    layers = sorted({int(t.name.split(".")[1]) for t in reader.tensors
                     if t.name.startswith("blk.") and t.name.endswith("_exps.weight")})
    return Backbone(n_vocab=n_vocab, n_expert=int(get(f"{arch}.expert_count")),
                    n_expert_used=int(get(f"{arch}.expert_used_count")), moe_layers=tuple(layers))


def plan_gguf(path: str) -> GGUFPlan:
    reader = open_gguf(path)
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ConvertError(f"{path} has no general.architecture key")
    arch = str(arch_field.contents())
    router = read_gguf_router(reader, path)
    kv: List[KV] = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in _WRITER_KEYS:
            continue
        value, vtype, sub = _value(field)
        kv.append((name, value, vtype, sub))
    tensors: List[TensorPlan] = []
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        tensors.append(TensorPlan(t.name, shape, qtype, lambda t=t: np.asarray(t.data)))
    align = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    return GGUFPlan(arch=arch, kv=kv, tensors=tensors, router=router, backbone=backbone_of(reader, arch),
                    alignment=int(align.contents()) if align is not None else gguf.GGUF_DEFAULT_ALIGNMENT)
