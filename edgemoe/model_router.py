"""The router a model GGUF carries (docs/router-format.md), read for the runtime.

Only the header is parsed (edgemoe.gguf_header) and only the router's own tensors are read,
so opening a multi-gigabyte model costs milliseconds more than before, router or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from edgemoe.errors import RouterFormatError
from edgemoe.gguf_header import GGUFHeader, read_header
from edgemoe.router_format import PREFIX, Backbone, Router, _from_parts

DECOUPLED_KEY = "edgemoe.router_decoupled"

# ggml type id -> numpy dtype of the router tensors the format allows
_DTYPES = {0: np.float32, 1: np.float16, 26: np.int32}


@dataclass(frozen=True)
class ModelRouter:
    router: Optional[Router]
    decoupled: bool  # the backbone's own gates were never trained: it needs a readme router

    @property
    def readme(self) -> Optional[Router]:
        """The router whose choices are the model's routes, or None."""
        return self.router if self.router is not None and self.router.kind == "readme" else None


def backbone_of_header(h: GGUFHeader) -> Backbone:
    arch = str(h.get("general.architecture", ""))
    tokens = h.get("tokenizer.ggml.tokens")
    n_vocab = tokens if isinstance(tokens, int) else len(tokens or ())
    layers = sorted({int(t.name.split(".")[1]) for t in h.tensors
                     if t.name.startswith("blk.") and t.name.endswith("_exps.weight")})
    return Backbone(n_vocab=int(n_vocab), n_expert=int(h.get(f"{arch}.expert_count", 0) or 0),
                    n_expert_used=int(h.get(f"{arch}.expert_used_count", 0) or 0), moe_layers=tuple(layers))


def _router_tensors(h: GGUFHeader) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    with open(h.path, "rb") as f:
        for t in h.tensors:
            if not t.name.startswith(PREFIX):
                continue
            dtype = _DTYPES.get(t.qtype)
            if dtype is None:
                raise RouterFormatError(f"{h.path}: router tensor {t.name} is {t.type_name}, expected F32, F16 or I32")
            count = int(np.prod(t.ne)) if t.ne else 1
            f.seek(h.data_offset + t.offset)
            raw = f.read(count * np.dtype(dtype).itemsize)
            if len(raw) != count * np.dtype(dtype).itemsize:
                raise RouterFormatError(f"{h.path}: router tensor {t.name} is truncated")
            out[t.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(reversed(t.ne)))
    return out


def read_model_router(path) -> ModelRouter:
    """The router of the model at `path`, checked against the model.

    Raises:
        RouterFormatError: a malformed router, one that does not fit the model, or a
            router-decoupled model without its router.
        ModelFormatError, EdgemoeIOError: the file is not a readable GGUF.
    """
    path = os.fspath(path)
    h = read_header(path, check_data=True, string_arrays=False)
    decoupled = bool(h.get(DECOUPLED_KEY, False))
    keys = {k: v for k, v in h.kv.items() if k.startswith(PREFIX)}
    router = None
    if keys or any(t.name.startswith(PREFIX) for t in h.tensors):
        router = _from_parts(keys, _router_tensors(h), path)
        try:
            router.check_against(backbone_of_header(h))
        except RouterFormatError as e:
            raise RouterFormatError(f"{path}: its router does not fit the model: {e}") from None
    if decoupled and (router is None or router.kind != "readme"):
        raise RouterFormatError(
            f"{os.path.basename(path)} is a router-decoupled (Read-ME) model without its readme router: its own "
            f"gates were never trained to route, so it cannot run; embed the router with "
            f"`edgemoe convert MODEL -o OUT --router ROUTER`")
    return ModelRouter(router=router, decoupled=decoupled)
