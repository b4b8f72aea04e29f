"""Fuzz target: edgemoe.convert.safetensors (SafetensorsFile, and Checkpoint's shard index).

The first input byte picks how the rest is used:
  0: the rest is a whole .safetensors file;
  1: the rest is `header JSON, NUL, data`; the harness adds the 8-byte length prefix, so that
     edits of the JSON keep a well-framed file;
  2: the rest is `index JSON, NUL, shard`: a checkpoint directory holding that
     model.safetensors.index.json and that shard as model-00001-of-00001.safetensors.
Every tensor that opens is read (BF16 widened). Bad input may only raise ConvertError.

    python tests/fuzz/fuzz_safetensors.py -runs=1000000 build/fuzz-py/safetensors tests/fuzz/corpus/safetensors
"""

from __future__ import annotations

import fuzzsupport

TARGET = "safetensors"
INSTRUMENT = ("edgemoe",)
INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00001.safetensors"

_st = None
_np = None
_scratch = None
_dir = None
ALLOWED = ()


def load() -> None:
    global _st, _np, _scratch, _dir, ALLOWED
    import numpy as np

    from edgemoe.convert import safetensors
    from edgemoe.errors import ConvertError

    _st, _np = safetensors, np
    _scratch = fuzzsupport.ScratchFile(TARGET)
    _dir = fuzzsupport.ScratchDir(TARGET)
    ALLOWED = (ConvertError,)


def _read_all(source) -> None:
    for name in source.names():
        _ = source.dtype(name), source.shape(name)
        _np.ascontiguousarray(source.tensor(name))


def TestOneInput(data: bytes) -> None:
    if _st is None:
        load()
    mode, payload = fuzzsupport.split_modes(data, 3)
    try:
        if mode < 2:
            raw = payload if mode == 0 else fuzzsupport.split_safetensors_payload(payload)
            with _st.SafetensorsFile(_scratch.write(raw)) as f:
                _ = dict(f.metadata)
                _read_all(f)
        else:
            index, _, shard = payload.partition(b"\0")
            _dir.write(INDEX, index)
            _dir.write(SHARD, shard)
            ckpt = _st.Checkpoint(_dir.path)
            try:
                _read_all(ckpt)
                for name in ckpt.names():
                    _ = name in ckpt
            finally:
                ckpt.close()
    except ALLOWED:
        pass


if __name__ == "__main__":
    fuzzsupport.fuzz_main(TestOneInput, load, INSTRUMENT)
