"""Fuzz target: edgemoe.router_format.load_router (router files, GGUF or safetensors form).

The first input byte picks how the rest becomes the file:
  even: the rest is the whole file (GGUF or safetensors, told apart by content);
  odd:  the rest is `header JSON, NUL, data` of a safetensors router, and the harness adds the
        length prefix, so that edits of the JSON keep a well-framed file.
Bad input may only raise RouterFormatError.

    python tests/fuzz/fuzz_router_format.py -runs=1000000 build/fuzz-py/router_format tests/fuzz/corpus/router_format
"""

from __future__ import annotations

import fuzzsupport

TARGET = "router_format"
INSTRUMENT = ("edgemoe", "gguf")  # gguf: its GGUFReader reads GGUF routers

_router_format = None
_scratch = None
ALLOWED = ()


def load() -> None:
    global _router_format, _scratch, ALLOWED
    from edgemoe import router_format
    from edgemoe.errors import RouterFormatError

    _router_format = router_format
    _scratch = fuzzsupport.ScratchFile(TARGET)
    ALLOWED = (RouterFormatError,)


def file_bytes(data: bytes) -> bytes:
    mode, payload = fuzzsupport.split_modes(data, 2)
    return payload if mode == 0 else fuzzsupport.split_safetensors_payload(payload)


def TestOneInput(data: bytes) -> None:
    if _router_format is None:
        load()
    path = _scratch.write(file_bytes(data))
    try:
        router = _router_format.load_router(path)
    except ALLOWED:
        return
    # a router that loads is one the converter and the runtime can use
    _ = router.experts_per_token
    _ = router.kv_items()
    for _name, arr in router.tensor_items():
        _ = arr.nbytes


if __name__ == "__main__":
    fuzzsupport.fuzz_main(TestOneInput, load, INSTRUMENT)
