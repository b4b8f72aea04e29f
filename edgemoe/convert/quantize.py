"""Requantization through llama.cpp's own `llama_model_quantize` (the patched libllama).

The quantizer is one native call that takes minutes on a large model and that Python cannot
interrupt (a signal acts only once it returns), so it runs in a child process,
`python -m edgemoe.convert.quantize SRC DST OUTTYPE THREADS`, which Ctrl-C or SIGTERM kills
at once; the caller removes DST, its temporary file.
"""

from __future__ import annotations

import ctypes
import os
import signal
import site
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

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
    """Writes `src` requantized to `outtype` into `dst` (llama.cpp's mixes: q4_k_m etc.), in a
    child process that an interrupt (KeyboardInterrupt here) kills before it goes up."""
    from edgemoe.interrupt import held, wait_child

    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype}")
    cmd = [sys.executable, "-m", "edgemoe.convert.quantize", os.fspath(src), os.fspath(dst), outtype,
           str(n_threads or os.cpu_count() or 1)]
    env = None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in site.getsitepackages() + [site.getusersitepackages()]:
        # a checkout: the child imports this very edgemoe, not an installed one
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = None
    with tempfile.TemporaryFile() as err:  # not a pipe: reading one would block Ctrl-C out
        try:
            # Ctrl-C and SIGTERM held until Popen returns: an interrupt always finds the child to kill
            with held():
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                        env=env)
            wait_child(proc)
        except BaseException:
            if proc is not None:
                with held():
                    proc.kill()
                    proc.wait()
            raise
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if proc.returncode < 0:
            try:
                reason = f"killed by {signal.Signals(-proc.returncode).name}"
            except ValueError:
                reason = f"killed by signal {-proc.returncode}"
        else:
            reason = lines[-1] if lines else f"exited with status {proc.returncode}"
        raise ConvertError(f"llama.cpp could not quantize to {outtype}: {reason}")


def _quantize_here(src: str, dst: str, outtype: str, n_threads: int) -> None:
    """The native call, in this process; raises ConvertError with llama.cpp's reason."""
    from edgemoe import log
    from edgemoe._native import llama

    ftypes = _ftypes()
    if outtype not in ftypes:
        raise ConvertError(f"unknown --outtype {outtype}")
    log.install()
    log.take_error()
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftypes[outtype]
    params.nthread = n_threads
    params.allow_requantize = True
    rc = llama.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise ConvertError(log.take_error() or f"status {rc}")


def main(argv: List[str]) -> int:
    from edgemoe.errors import EdgemoeError

    src, dst, outtype, n_threads = argv
    try:
        _quantize_here(src, dst, outtype, int(n_threads))
    except EdgemoeError as e:
        print(" ".join(str(e).split()), file=sys.stderr)  # the parent's error message ends with it
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
