"""Fuzz target: edgemoe.gguf_header.read_header on arbitrary file contents.

The input is the whole file. Each input is read both ways a caller reads headers: fully
(string arrays decoded, tensor data checked against the file size) and quickly (string arrays
stepped over, no data check). Bad input may only raise ModelFormatError (EdgemoeIOError is
for files that cannot be opened, which the scratch file always can).

    python tests/fuzz/fuzz_gguf_header.py -runs=1000000 build/fuzz-py/gguf_header tests/fuzz/corpus/gguf_header
"""

from __future__ import annotations


import fuzzsupport

TARGET = "gguf_header"
INSTRUMENT = ("edgemoe",)

_gguf_header = None
_scratch = None
ALLOWED = ()


def load() -> None:
    global _gguf_header, _scratch, ALLOWED
    from edgemoe import gguf_header
    from edgemoe.errors import ModelFormatError

    _gguf_header = gguf_header
    _scratch = fuzzsupport.ScratchFile(TARGET)
    ALLOWED = (ModelFormatError,)


def TestOneInput(data: bytes) -> None:
    if _gguf_header is None:
        load()
    path = _scratch.write(data)
    for check_data, string_arrays in ((True, True), (False, False)):
        try:
            header = _gguf_header.read_header(path, check_data=check_data, string_arrays=string_arrays)
        except ALLOWED:
            continue
        # what callers derive from a header must not fail either
        _ = header.data_end
        for t in header.tensors:
            _ = t.type_name


if __name__ == "__main__":
    fuzzsupport.fuzz_main(TestOneInput, load, INSTRUMENT)
