"""One tune-router run from start to end: every refusal that needs no model comes first
(paths, source, text), then the model is loaded, measured, trained, measured again and
written. Nothing appears at OUT unless the run completes."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional

import numpy as np

from edgemoe.errors import EdgemoeError
from edgemoe.files import discard, probe_beside, temp_beside
from edgemoe.tune.options import Measure, TuneError, TuneOptions, TuneResult

# config.json fields that give a routed-expert count, across the architectures transformers knows
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Source:
    path: str
    kind: str                      # "gguf" or "hf"
    gate_names: Dict[int, str]     # MoE layer -> its gate tensor in the source's own names


def _same(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_checkpoint(directory: str) -> Dict[int, str]:
    """The checkpoint's gate tensor per MoE layer, after the refusals a config tells."""
    from edgemoe.convert.hf import is_checkpoint_dir, load_config
    from edgemoe.convert.hf_archs import ARCHS, arch_for
    from edgemoe.convert.readme_ckpt import is_readme_config
    from edgemoe.tune.write import checkpoint_files, safetensors_table

    name = os.path.basename(os.path.abspath(directory))
    if not is_checkpoint_dir(directory):
        raise TuneError(f"{directory} is a directory without config.json: not a Hugging Face checkpoint")
    try:
        cfg = load_config(directory)
        if is_readme_config(cfg):
            raise TuneError(f"{name} is routed by its separate router (a Read-ME checkpoint): "
                            f"it has no per-layer gates to tune")
        if cfg.get("model_type") not in ARCHS and not any(cfg.get(k) for k in _EXPERT_KEYS):
            raise TuneError(f"{name} is a dense model (no routed experts): tune-router tunes MoE routers")
        spec = arch_for(cfg)
        spec.hparams(cfg)  # convert's refusals now, not after training: OUT must convert
        if spec.check is not None:
            from edgemoe.convert.safetensors import Checkpoint

            ckpt = Checkpoint(directory)
            try:
                spec.check(cfg, ckpt)
            finally:
                ckpt.close()
    except EdgemoeError as e:
        raise TuneError(f"{name}: {e}") from None
    names = set()
    for rel in checkpoint_files(directory):
        if rel.endswith(".safetensors"):
            names.update(safetensors_table(os.path.join(directory, rel))[1])
    if not names:
        raise TuneError(f"{directory} has no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    gates = {}
    for i in range(int(cfg.get("num_hidden_layers", 0))):
        for router in (spec.router, "mlp.gate"):
            if f"model.layers.{i}.{router}.weight" in names:
                gates[i] = f"model.layers.{i}.{router}.weight"
                break
    if not gates:
        raise TuneError(f"{name} has no router tensors ({spec.router}.weight): nothing to tune")
    return gates


def check_source(src: str) -> Source:
    if not os.path.exists(src):
        raise TuneError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        return Source(src, "hf", check_checkpoint(src))
    from edgemoe.tune.gguf_model import describe

    return Source(src, "gguf", describe(src).gates)


def _probe(path: str) -> None:
    """Fails now, not after training, when nothing can be written beside `path`."""
    try:
        probe_beside(path)
    except OSError as e:
        raise TuneError(f"cannot write {path}: {e.strerror or e}") from None


def check_outputs(src: Source, out: str, gguf_out: Optional[str]) -> None:
    if _same(src.path, out) or os.path.abspath(src.path) == os.path.abspath(out):
        raise TuneError(f"output {out} is the source: tune-router never overwrites its input")
    if src.kind == "gguf":
        if os.path.isdir(out):
            raise TuneError(f"output {out} is a directory; a GGUF source gives a GGUF file")
        if gguf_out is not None:
            raise TuneError("--gguf is for checkpoint sources: a GGUF source's OUT is already the tuned GGUF")
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            raise TuneError(f"output {out} is a file; a checkpoint source gives a checkpoint directory")
        if os.path.isdir(out) and os.listdir(out):
            raise TuneError(f"output directory {out} is not empty; remove it or choose another")
    _probe(out)
    if gguf_out is not None:
        if os.path.isdir(gguf_out):
            raise TuneError(f"--gguf {gguf_out} is a directory")
        if _same(src.path, gguf_out) or os.path.abspath(gguf_out) == os.path.abspath(out):
            raise TuneError(f"--gguf {gguf_out} is the source or OUT")
        _probe(gguf_out)


def tokenize(src: Source, text: str) -> np.ndarray:
    from edgemoe.tune.text import tokenize_checkpoint, tokenize_gguf

    ids = tokenize_gguf(src.path, text) if src.kind == "gguf" else tokenize_checkpoint(src.path, text)
    if len(ids) < 2:
        raise TuneError(f"the text has {len(ids)} token(s): nothing to predict")
    return ids


def _record(src: Source, text_path: str, n_tokens: int, opts: TuneOptions, before: Measure, after: Measure):
    from edgemoe.tune.text import sha256_of
    from edgemoe.tune.write import Record, checkpoint_sha256

    source_sha = sha256_of(src.path) if src.kind == "gguf" else checkpoint_sha256(src.path)
    return Record(alpha=opts.alpha, lam=opts.lam, window=opts.window, steps=opts.steps, lr=opts.lr,
                  warmup=opts.warmup, ctx=opts.ctx, batch=opts.batch, seed=opts.seed,
                  text_name=os.path.basename(text_path), text_sha256=sha256_of(text_path), text_tokens=int(n_tokens),
                  source_name=os.path.basename(os.path.abspath(src.path)), source_sha256=source_sha,
                  eor_before=float(before.eor), eor_after=float(after.eor))


def tune_router(src: str, out: str, text: str, opts: TuneOptions = TuneOptions(), gguf_out: Optional[str] = None,
                progress: Optional[Callable] = None, notice: Callable[[str], None] = lambda s: None) -> TuneResult:
    """Tunes the routers of `src` (a GGUF file or an HF checkpoint directory) on `text` and
    writes OUT (and, for a checkpoint, optionally `gguf_out`); docs/remoe.md.

    Args:
        progress: called with each training Step.
        notice: called with one-line notes on the phases (loading, measuring, writing).

    Raises:
        TuneError: a one-line reason; OUT is then untouched.
    """
    import time

    from edgemoe.tune.model import load
    from edgemoe.tune.text import read_text
    from edgemoe.tune.train import eval_windows, measure, train, window_len

    t0 = time.monotonic()
    opts.validate()
    source = check_source(src)
    check_outputs(source, out, gguf_out)
    tokens = tokenize(source, read_text(text))
    ctx = window_len(len(tokens), opts.ctx)
    if ctx < opts.ctx:
        notice(f"note: the text has {len(tokens)} tokens; windows of {ctx} instead of --ctx {opts.ctx}")
        opts = replace(opts, ctx=ctx)
    notice(f"loading {src} ({source.kind}) in {opts.dtype} on {opts.device}")
    fm = load(source.path, source.kind, opts.device, opts.dtype, opts.threads)
    if sorted(t.layer for t in fm.taps) != sorted(source.gate_names):
        raise TuneError(f"{src}: transformers' model routes in layers {sorted(t.layer for t in fm.taps)}, "
                        f"the file has gates in {sorted(source.gate_names)}")
    windows = eval_windows(tokens, ctx, opts.eval_windows)
    before = measure(fm, windows, opts.window, opts.batch)
    notice(f"before: EOR {before.eor:.3f}, hit rate (window {opts.window}) {before.hit:.3f}, "
           f"perplexity {before.ppl:.2f} on {before.tokens} tokens of the text")
    result = train(fm, tokens, opts, progress)
    after = measure(fm, windows, opts.window, opts.batch)
    record = _record(source, text, len(tokens), opts, before, after)
    gates = fm.gate_weights()
    notice(f"writing {out}")
    if source.kind == "gguf":
        from edgemoe.tune.write import write_gguf

        write_gguf(source.path, out, gates, record)
    else:
        from edgemoe.tune.write import write_checkpoint

        write_checkpoint(source.path, out, source.gate_names, gates, record)
        if gguf_out is not None:
            _convert(out, gguf_out, record, notice)
    return TuneResult(out=out, gguf_out=gguf_out, source=source.kind, arch=fm.model_type, n_moe_layers=len(fm.taps),
                      n_expert=fm.n_expert, top_k=fm.top_k, text_tokens=int(len(tokens)), steps=result.steps,
                      trained_tokens=result.tokens, seconds=time.monotonic() - t0, device=str(fm.device),
                      before=before, after=after)


def _convert(checkpoint: str, gguf_out: str, record, notice) -> None:
    """`edgemoe convert` of the tuned checkpoint, re-emitted with the record keys."""
    from edgemoe.convert import convert
    from edgemoe.tune.write import write_gguf

    notice(f"converting {checkpoint} to {gguf_out}")
    fd, tmp = temp_beside(gguf_out)
    os.close(fd)
    try:
        try:
            convert(checkpoint, tmp)
        except EdgemoeError as e:
            raise TuneError(f"converting {checkpoint}: {e}") from None
        write_gguf(tmp, gguf_out, None, record)
    finally:
        discard(tmp)
