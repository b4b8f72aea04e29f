"""The frozen model with trainable gates: a transformers causal LM whose only parameters with
gradients are the routers' gate weights, each watched by a tap that keeps what the router
saw and chose during the last forward pass.

A Hugging Face checkpoint loads through AutoModelForCausalLM; a GGUF through
edgemoe.tune.gguf_model (dequantized, mapped back to HF names). Either way the weights are
held in f32 or bf16; the gates are always f32 master weights, so that small updates are not
rounded away, with the router's input cast up to them and its routing weights cast back.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from edgemoe.tune.options import TuneError

_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate$")
_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class RouterTap:
    """One MoE layer's gate: its trainable weight, the frozen copy, and the last forward's
    router input, logits and chosen experts."""

    layer: int
    module: torch.nn.Module
    frozen: torch.Tensor                 # f32 [E, n_embd], never trained
    renormalize: bool = False            # DeepSeek's norm_topk_prob, which transformers ignores
    inputs: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    topk: Optional[torch.Tensor] = None
    _dtype: Optional[torch.dtype] = field(default=None, repr=False)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.module.weight

    def frozen_logits(self) -> torch.Tensor:
        """The frozen gate applied to the same router input: the anchor costs no second forward."""
        with torch.no_grad():
            return F.linear(self.inputs.detach(), self.frozen)

    def clear(self) -> None:
        self.inputs = self.logits = self.topk = None

    def _before(self, module, args):
        h = args[0]
        self._dtype = h.dtype
        return (h.to(torch.float32),) + tuple(args[1:])

    def _after(self, module, args, output):
        logits, scores, topk = output[0], output[1], output[2]
        self.inputs, self.logits, self.topk = args[0], logits, topk.detach()
        if self.renormalize:
            scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        return (logits, scores.to(self._dtype), topk) + tuple(output[3:])


@dataclass
class FrozenModel:
    model: torch.nn.Module
    taps: List[RouterTap]
    n_expert: int
    top_k: int
    model_type: str
    device: torch.device

    def gate_weights(self) -> Dict[int, np.ndarray]:
        """MoE layer -> its tuned gate, f32 [E, n_embd]."""
        return {t.layer: t.weight.detach().to("cpu", torch.float32).numpy().copy() for t in self.taps}

    def clear(self) -> None:
        for t in self.taps:
            t.clear()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TuneError("--device cuda: this torch has no CUDA device")
    return torch.device(name)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_checkpoint(directory: str, device: torch.device, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    kw = {"device_map": {"": device}} if device.type != "cpu" else {}
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=_DTYPES[dtype], **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise TuneError(f"transformers cannot load {directory}: {' '.join(str(e).split())[:300]}") from None


def load_gguf(path: str, device: torch.device, dtype: str) -> torch.nn.Module:
    """The GGUF's model in transformers, built empty on `device` and filled tensor by tensor,
    so that memory holds the model and one dequantized tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from edgemoe.tune.gguf_model import describe, hf_tensors, open_reader

    _quiet_transformers()
    reader = open_reader(path)
    desc = describe(path, reader)
    fields = dict(desc.config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for name, data in hf_tensors(desc, reader):
            p = params.get(name)
            if p is None:
                raise TuneError(f"{os.path.basename(path)}: {name} has no place in transformers' {desc.spec.model_type}")
            if p.numel() != data.size:
                raise TuneError(f"{os.path.basename(path)}: {name} has {data.size} values, transformers expects "
                                f"{tuple(p.shape)}")
            p.copy_(torch.from_numpy(data).reshape(p.shape))
            filled.add(name)
    if config.tie_word_embeddings:
        model.tie_weights()
        filled.update(n for n, p in params.items() if p is model.get_input_embeddings().weight)
    missing = sorted(set(params) - filled)
    if missing:
        raise TuneError(f"{os.path.basename(path)} has no tensor for transformers' {missing[0]}")
    return model


def prepare(model: torch.nn.Module, device: torch.device) -> FrozenModel:
    """Freezes every parameter, then makes each router's gate an f32 trainable parameter with
    a tap. The model stays in eval mode: no dropout, no router jitter, inference's forward."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    # DeepSeek-V2's gate normalises its top-k weights or scales them, never both, as llama.cpp
    # runs it (edgemoe.convert.deepseek2); transformers always scales
    renormalize = cfg.model_type == "deepseek_v2" and bool(getattr(cfg, "norm_topk_prob", False))
    taps: List[RouterTap] = []
    for name, module in model.named_modules():
        m = _ROUTER.match(name)
        w = getattr(module, "weight", None)
        if m is None or not isinstance(w, torch.nn.Parameter) or w.dim() != 2:
            continue
        master = torch.nn.Parameter(w.detach().to(torch.float32).clone(), requires_grad=True)
        module.weight = master
        tap = RouterTap(layer=int(m.group(1)), module=module, frozen=master.detach().clone(),
                        renormalize=renormalize)
        module.register_forward_pre_hook(tap._before)
        module.register_forward_hook(tap._after)
        taps.append(tap)
    if not taps:
        raise TuneError("the model has no routers (mlp.gate): a dense model has nothing to tune")
    n_expert = int(taps[0].weight.shape[0])
    top_k = int(getattr(cfg, "num_experts_per_tok"))
    return FrozenModel(model=model, taps=taps, n_expert=n_expert, top_k=top_k,
                       model_type=str(cfg.model_type), device=device)


def load(src: str, kind: str, device: str, dtype: str, threads: Optional[int] = None) -> FrozenModel:
    """The frozen model of `src` ("hf" directory or "gguf" file) with trainable gates."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    model = load_checkpoint(src, dev, dtype) if kind == "hf" else load_gguf(src, dev, dtype)
    return prepare(model, dev)
