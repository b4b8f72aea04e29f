"""Fuzz target: edgemoe.trace.load_trace (trace.npz files), then the statistics
`edgemoe trace-stats` computes from a trace that loads.

The first input byte picks how the rest becomes the file:
  even: the rest is the whole file (a zip of .npy members, or anything else);
  odd:  the rest is a list of members, each `name LF content`, joined by MEMBER_SEP; the
        harness zips them (stored, with right CRCs), so that edits of the .npy headers and
        arrays get past the zip checksums.
Bad input may only raise TraceFormatError (EdgemoeIOError is for a missing file).

    python tests/fuzz/fuzz_trace.py -runs=1000000 build/fuzz-py/trace tests/fuzz/corpus/trace
"""

from __future__ import annotations

import io

import fuzzsupport

TARGET = "trace"
INSTRUMENT = ("edgemoe", "zipfile")
MEMBER_SEP = b"\n--member--\n"

_trace = None
_scratch = None
ALLOWED = ()


def load() -> None:
    global _trace, _scratch, ALLOWED
    import warnings
    import zipfile  # noqa: F401  (imported here, under instrumentation)

    from edgemoe import trace

    # zip_members writes the duplicate names an input asks for: that is the point
    warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
    _trace = trace
    _scratch = fuzzsupport.ScratchFile(TARGET)
    ALLOWED = (trace.TraceFormatError,)


def zip_members(payload: bytes) -> bytes:
    """A stored zip of the members in `payload` (see the module doc)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for chunk in payload.split(MEMBER_SEP):
            name, _, content = chunk.partition(b"\n")
            z.writestr(zipfile.ZipInfo(name.decode("latin-1") or "-"), content)
    return buf.getvalue()


def members_payload(npz: bytes) -> bytes:
    """The inverse of zip_members for an existing .npz (to make seeds)."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(npz)) as z:
        return MEMBER_SEP.join(n.encode("latin-1") + b"\n" + z.read(n) for n in z.namelist())


def file_bytes(data: bytes) -> bytes:
    mode, payload = fuzzsupport.split_modes(data, 2)
    return payload if mode == 0 else zip_members(payload)


def TestOneInput(data: bytes) -> None:
    if _trace is None:
        load()
    path = _scratch.write(file_bytes(data))
    try:
        t = _trace.load_trace(path)
    except ALLOWED:
        return
    # what `edgemoe trace-stats` does with a trace that loads
    _trace.format_table(_trace.routing_stats(t))


if __name__ == "__main__":
    fuzzsupport.fuzz_main(TestOneInput, load, INSTRUMENT)
