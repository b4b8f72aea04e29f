"""Requantization through llama.cpp's own `llama_model_quantize` (the patched libllama)."""

from __future__ import annotations

import ctypes
import os
from typing import Dict, Optional

from edgemoe.errors import ConvertError


def _ftypes() -> Dict[str, int]:
    from edgemoe._native import llama

    out = {"f32": llama.LLAMA_FTYPE_ALL_F32, "f16": llama.LLAMA_FTYPE_MOSTLY_F16,
           "bf16": llama.LLAMA_FTYPE_MOSTLY_BF16}
    for name in dir(llama):
        if name.startswith("LLAMA_FTYPE_MOSTLY_"):
            out.setdefault(name[len("LLAMA_FTYPE_MOSTLY_"):].lower(), getattr(llama, name))
    return out


QUANT_NAMES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
               "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_nl", "iq4_xs")
OUTTYPES = ("f32", "f16", "bf16") + QUANT_NAMES


def quantize(src: str, dst: str, outtype: str, n_threads: Optional[int] = None) -> None:
    """Writes `src` requantized to `outtype` into `dst` (llama.cpp's mixes: q4_k_m etc.)."""
    from edgemoe import log
    from edgemoe._native import llama

    ftypes = _ftypes()
    if outtype not in ftypes:
        raise ConvertError(f"unknown --outtype {outtype}")
    log.install()
    log.take_error()
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftypes[outtype]
    params.nthread = n_threads or os.cpu_count() or 1
    params.allow_requantize = True
    rc = llama.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        reason = log.take_error() or f"status {rc}"
        raise ConvertError(f"llama.cpp could not quantize to {outtype}: {reason}")
