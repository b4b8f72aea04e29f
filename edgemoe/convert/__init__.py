"""`edgemoe convert`: a GGUF or a Hugging Face MoE checkpoint to a GGUF laid out for the cache.

Stages, each into a temporary file beside OUT (same file system, removed on any failure):
HF checkpoint -> float GGUF (our writer) -> requantized GGUF (llama.cpp, for quantized
--outtype) -> final GGUF re-emitted with the requested alignment and router. OUT appears
only when complete, by rename; SRC is only ever read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Union

from gguf import GGUF_DEFAULT_ALIGNMENT

from edgemoe.convert.gguf_source import plan_gguf
from edgemoe.convert.hf import FLOAT_TYPES, is_checkpoint_dir, plan_checkpoint
from edgemoe.convert.quantize import OUTTYPES, quantize
from edgemoe.convert.safetensors import Checkpoint
from edgemoe.convert.writer import TensorPlan, write_gguf
from edgemoe.errors import ConvertError
from edgemoe.files import discard, publish, temp_beside
from edgemoe.router_format import Backbone, Router, load_router

PathLike = Union[str, os.PathLike]
DEFAULT_ALIGN = 4096

__all__ = ["ConvertResult", "convert", "OUTTYPES", "DEFAULT_ALIGN"]


@dataclass
class ConvertResult:
    path: str
    source: str            # "gguf" or "hf"
    arch: str
    n_tensors: int
    outtype: Optional[str]
    alignment: int
    router_kind: Optional[str]
    size_bytes: int


def _router_plans(router: Router) -> List[TensorPlan]:
    import gguf
    import numpy as np

    plans = []
    for name, arr in router.tensor_items():
        qtype = {np.dtype(np.float32): gguf.GGMLQuantizationType.F32,
                 np.dtype(np.float16): gguf.GGMLQuantizationType.F16,
                 np.dtype(np.int32): gguf.GGMLQuantizationType.I32}[arr.dtype]
        plans.append(TensorPlan(name, tuple(arr.shape), qtype, lambda a=arr: np.ascontiguousarray(a)))
    return plans


def _check_paths(src: str, out: str) -> None:
    if not os.path.exists(src):
        raise ConvertError(f"{src}: no such file or directory")
    if os.path.isdir(out):
        raise ConvertError(f"output {out} is a directory")
    if os.path.exists(out) and os.path.samefile(src, out):  # also hard links and symlinks
        raise ConvertError(f"output {out} is the source: edgemoe convert never overwrites its input")


def convert(src: PathLike, out: PathLike, router: Optional[PathLike] = None, outtype: Optional[str] = None,
            align: int = DEFAULT_ALIGN, n_threads: Optional[int] = None) -> ConvertResult:
    """Converts `src` (a GGUF file or an HF checkpoint directory) to the GGUF `out`."""
    src, out = os.fspath(src), os.fspath(out)
    _check_paths(src, out)
    if outtype is not None and outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype}; choose from {', '.join(OUTTYPES)}")
    if align < 32 or align & (align - 1):
        raise ConvertError(f"--align {align} must be a power of two of at least 32")
    new_router = load_router(router) if router is not None else None
    temps: List[str] = []

    def temp() -> str:
        fd, path = temp_beside(out)
        os.close(fd)
        temps.append(path)
        return path

    try:
        if os.path.isdir(src):
            if not is_checkpoint_dir(src):
                raise ConvertError(f"{src} is a directory without config.json: not a Hugging Face checkpoint")
            result = _from_checkpoint(src, out, new_router, outtype, align, n_threads, temp)
        else:
            result = _from_gguf(src, out, new_router, outtype, align, n_threads, temp)
        return result
    finally:
        for t in temps:
            discard(t)


def _finish(plan_arch: str, kv, tensors: List[TensorPlan], router: Optional[Router], backbone: Backbone,
            out: str, align: int, temp) -> tuple:
    """Writes the final file and renames it to `out`; returns (size, number of tensors)."""
    if router is not None:
        router.check_against(backbone)
        kv = list(kv) + [(k, v, t, None) for k, v, t in router.kv_items()]
        tensors = list(tensors) + _router_plans(router)
    path = temp()
    size = write_gguf(path, plan_arch, kv, tensors, align, label=f"writing {os.path.basename(out)}")
    publish(path, out)
    return size, len(tensors)


def _from_gguf(src: str, out: str, new_router, outtype, align, n_threads, temp) -> ConvertResult:
    plan = plan_gguf(src)
    router = new_router
    if outtype is not None:
        base = src
        if plan.router is not None or plan.alignment != GGUF_DEFAULT_ALIGNMENT:
            # llama.cpp's quantizer does not know router tensors, and pads its output to the
            # default alignment whatever general.alignment says: hand it a plain backbone
            stripped = plan.without_router()
            base = temp()
            write_gguf(base, stripped.arch, stripped.kv, stripped.tensors, GGUF_DEFAULT_ALIGNMENT,
                       label="preparing")
            router = router or plan.router
        quantized = temp()
        quantize(base, quantized, outtype, n_threads)
        plan = plan_gguf(quantized)
    elif router is not None:
        plan = plan.without_router()
    kept = router or plan.router
    size, n = _finish(plan.arch, plan.kv, plan.tensors, router, plan.backbone, out, align, temp)
    return ConvertResult(out, "gguf", plan.arch, n, outtype, align, kept.kind if kept else None, size)


def _from_checkpoint(src: str, out: str, router, outtype, align, n_threads, temp) -> ConvertResult:
    ckpt = Checkpoint(src)
    try:
        float_type = outtype if outtype in FLOAT_TYPES else None
        if outtype is not None and float_type is None:
            # quantized output: write the checkpoint's own float type, then let llama.cpp quantize
            plan = plan_checkpoint(src, ckpt, None)
        else:
            plan = plan_checkpoint(src, ckpt, float_type)
        backbone = Backbone(plan.n_vocab, plan.n_expert, plan.n_expert_used, plan.moe_layers)
        router = router or plan.router  # --router replaces the one a checkpoint carries
        if router is not None:
            router.check_against(backbone)
        if outtype is not None and float_type is None:
            base = temp()
            write_gguf(base, plan.arch, plan.kv, plan.tensors, GGUF_DEFAULT_ALIGNMENT, label="converting")
            quantized = temp()
            quantize(base, quantized, outtype, n_threads)
            q = plan_gguf(quantized)
            size, n = _finish(q.arch, q.kv, q.tensors, router, q.backbone, out, align, temp)
        else:
            size, n = _finish(plan.arch, plan.kv, plan.tensors, router, backbone, out, align, temp)
    finally:
        ckpt.close()
    return ConvertResult(out, "hf", plan.arch, n, outtype, align, router.kind if router else None, size)
