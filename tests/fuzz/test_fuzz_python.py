"""The Python parsers under fuzzing (README.md here): a short bounded atheris run of each
harness, the seed corpus, and the inputs that once crashed a parser, as plain regressions.

The fuzz runs need atheris (skipped without it); EDGEMOE_FUZZ_SECONDS sets how long each
target runs (default 8).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from io import BytesIO

import numpy as np
import pytest

import fuzzsupport
import fuzz_gguf_header
import fuzz_router_format
import fuzz_safetensors
import fuzz_trace

from edgemoe.convert.safetensors import Checkpoint, SafetensorsFile
from edgemoe.errors import ConvertError, RouterFormatError
from edgemoe.gguf_header import read_header
from edgemoe.router_format import load_router
from edgemoe.trace import Trace, TraceFormatError, eor_per_layer, load_trace, routing_stats

HARNESSES = {m.TARGET: m for m in (fuzz_gguf_header, fuzz_router_format, fuzz_safetensors, fuzz_trace)}
FUZZ_SECONDS = int(os.environ.get("EDGEMOE_FUZZ_SECONDS", "8"))


# -- the fuzzers, briefly ----------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_fuzzer_finds_no_crash(target, tmp_path):
    """libFuzzer for FUZZ_SECONDS from the seed corpus: no uncaught exception, no input that
    runs 10 s, no allocation past the harness's memory cap (README.md has the long runs)."""
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    found, artifacts = tmp_path / "found", tmp_path / "artifacts"
    found.mkdir()
    artifacts.mkdir()
    cmd = [sys.executable, str(fuzzsupport.HERE / f"fuzz_{target}.py"), f"-max_total_time={FUZZ_SECONDS}",
           "-timeout=10", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
           str(found), str(fuzzsupport.CORPUS / target)]
    env = dict(os.environ, EDGEMOE_FUZZ_TMPDIR=str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=FUZZ_SECONDS + 120)
    out = proc.stdout + proc.stderr
    bad = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not bad, (
        f"fuzz_{target} failed (exit {proc.returncode}); inputs kept: "
        + ", ".join(f"{n} = {(artifacts / n).read_bytes()[:512]!r}" for n in bad) + "\n" + out[-6000:])
    runs = [int(line.split()[-1]) for line in out.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs and runs[0] > 0, out[-2000:]


# -- the seed corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_seeds_pass_the_harness_in_process(target):
    seeds = fuzzsupport.seeds(target)
    assert seeds
    for _name, data in seeds:
        HARNESSES[target].TestOneInput(data)


def test_seeds_are_valid_files(tmp_path):
    """The seeds are files the parsers accept (what make_corpus.py writes), so that the
    fuzzer starts from deep inside each format."""
    f = tmp_path / "seed"
    for name, data in fuzzsupport.seeds("gguf_header"):
        f.write_bytes(data)
        assert read_header(f, check_data=False).tensors, name
    for name, data in fuzzsupport.seeds("router_format"):
        f.write_bytes(fuzz_router_format.file_bytes(data))
        load_router(f).check()
    for name, data in fuzzsupport.seeds("safetensors"):
        mode, payload = fuzzsupport.split_modes(data, 3)
        if mode < 2:
            f.write_bytes(payload if mode == 0 else fuzzsupport.split_safetensors_payload(payload))
            with SafetensorsFile(str(f)) as st:
                assert st.names(), name
    for name, data in fuzzsupport.seeds("trace"):
        f.write_bytes(fuzz_trace.file_bytes(data))
        assert load_trace(str(f)).n_tokens == 3, name


def test_corpus_stays_small():
    total = sum(p.stat().st_size for p in fuzzsupport.CORPUS.rglob("*") if p.is_file())
    assert total < 256 << 10


# -- helpers for the regressions ---------------------------------------------------------------


def _write(tmp_path, data: bytes, name: str = "input") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _isolated(tmp_path, code: str, timeout: int = 60) -> str:
    """Runs `code` in a fresh interpreter capped at 1 GiB more address space than it starts
    with and `timeout` seconds: a regression to a hang or a runaway allocation fails the test
    instead of taking the machine. Returns stdout."""
    prelude = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(fuzzsupport.REPO)!r}, {str(fuzzsupport.HERE)!r}]
        import numpy, gguf, fuzzsupport
        fuzzsupport.limit_memory(1024)
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _peak_mib(fn) -> float:
    """The peak of traced allocations (numpy's included) while fn() runs, in MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


def _gguf(kvs=(), n_tensors: int = 0, tail: bytes = b"") -> bytes:
    """A GGUF v3 header from raw key-values: (key, type id, value bytes)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    for key, vtype, value in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + value
    return out + tail


def _seed_router_safetensors() -> bytes:
    data = dict(fuzzsupport.seeds("router_format"))["raw-predictor.safetensors"]
    return data[1:]


def _with_metadata(st: bytes, **changes) -> bytes:
    """A safetensors router with some `edgemoe.router.*` metadata values replaced (raw JSON text)."""
    (n,) = struct.unpack_from("<Q", st)
    header = json.loads(st[8:8 + n])
    for key, value in changes.items():
        header["__metadata__"]["edgemoe.router." + key] = value
    raw = json.dumps(header).encode()
    return fuzzsupport.safetensors_bytes(raw, st[8 + n:])


def _npz(members: dict) -> bytes:
    """A stored zip of raw members (name -> bytes)."""
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npy_raw(header: str, data: bytes = b"") -> bytes:
    """A .npy (version 1.0) with the header text given as is."""
    text = header.encode("latin-1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def _trace_members(**changes) -> dict:
    members = {"experts.npy": _npy(np.zeros((4, 2, 2), np.int32)), "layers.npy": _npy(np.arange(2, dtype=np.int32)),
               "tokens.npy": _npy(np.zeros(4, np.int32)), "n_expert.npy": _npy(np.int32(8)),
               "model.npy": _npy(np.str_("m")), "format_version.npy": _npy(np.int32(1))}
    for name, raw in changes.items():
        members[name + ".npy"] = raw
    return members


# -- regressions: router files (RouterFormatError only) ----------------------------------------


def test_router_safetensors_with_a_corrupt_header_is_a_router_error(tmp_path):
    # was a bare ConvertError from the safetensors reader (found by fuzz_router_format)
    with pytest.raises(RouterFormatError, match="corrupt safetensors header"):
        load_router(_write(tmp_path, b"\x02\x00\x00\x00\x00\x00\x00\x00{x"))


def test_router_gguf_array_longer_than_the_file_fails_quickly(tmp_path):
    # gguf.GGUFReader looped over 2^40 elements past the end of the file, appending an empty
    # array for each: a hang that grew without bound
    data = _gguf([("edgemoe.router.x", 9, struct.pack("<IQ", 0, 1 << 40))])
    path = _write(tmp_path, data)
    out = _isolated(tmp_path, f"""
        from edgemoe.router_format import load_router
        from edgemoe.errors import RouterFormatError
        try:
            load_router({path!r})
        except RouterFormatError as e:
            print("RouterFormatError", e)
    """, timeout=60)
    assert out.startswith("RouterFormatError") and "truncated or corrupt GGUF header" in out


@pytest.mark.parametrize("opener, error", [("edgemoe.convert.gguf_source:open_gguf", "ConvertError"),
                                           ("edgemoe.tune.gguf_model:open_reader", "TuneError")])
def test_a_model_gguf_array_longer_than_the_file_fails_quickly(tmp_path, opener, error):
    # the same hostile array count through `edgemoe convert`'s and `tune-router`'s readers,
    # which handed the file to gguf.GGUFReader unchecked
    data = _gguf([("general.x", 9, struct.pack("<IQ", 0, 1 << 40))])
    path = _write(tmp_path, data)
    module, name = opener.split(":")
    out = _isolated(tmp_path, f"""
        from {module} import {name} as opener
        from edgemoe.errors import EdgemoeError
        try:
            opener({path!r})
        except EdgemoeError as e:
            print(type(e).__name__, e)
    """, timeout=60)
    assert out.startswith(error) and "truncated or corrupt GGUF header" in out, out


def test_router_gguf_string_that_is_not_utf8(tmp_path):
    # gguf decodes values only when asked: a UnicodeDecodeError escaped load_router
    data = _gguf([("edgemoe.router.kind", 8, struct.pack("<Q", 1) + b"\xff")])
    with pytest.raises(RouterFormatError, match="not UTF-8"):
        load_router(_write(tmp_path, data))


def test_router_block_count_far_beyond_its_tensors(tmp_path):
    # check() listed 8 tensor names per block of a block_count read from the file: 10^12
    # blocks hung and allocated without bound
    data = _with_metadata(_seed_router_safetensors(), block_count="1000000000000")
    path = _write(tmp_path, data)
    out = _isolated(tmp_path, f"""
        from edgemoe.router_format import load_router
        from edgemoe.errors import RouterFormatError
        try:
            load_router({path!r})
        except RouterFormatError as e:
            print("RouterFormatError", e)
    """, timeout=60)
    assert out.startswith("RouterFormatError") and "blk.1.attn_norm.weight is missing" in out


@pytest.mark.parametrize("key, value, needle", [
    ("version", "1e999", "malformed router data"),               # int(inf): OverflowError
    ("embedding_length", "1" * 5000, "is not JSON-encoded"),     # more digits than int() takes: ValueError
    ("rope.freq_base", "1" + "0" * 400, "malformed router data"),  # float(10^400): OverflowError
    ("head_count", "[" * 100000, "is not JSON-encoded"),         # RecursionError in json
])
def test_router_metadata_values_that_broke_the_reader(tmp_path, key, value, needle):
    data = _with_metadata(_seed_router_safetensors(), **{key: value})
    with pytest.raises(RouterFormatError, match=needle):
        load_router(_write(tmp_path, data))


@pytest.mark.parametrize("header", [
    b'{"__metadata__":[1]}',                      # meta.items(): AttributeError
    b'{"__metadata__":{"edgemoe.router.x":1}}',   # json.loads(1): TypeError
])
def test_router_metadata_that_is_not_a_map_of_strings(tmp_path, header):
    st = fuzzsupport.safetensors_bytes(header, b"")
    with pytest.raises(RouterFormatError, match="__metadata__ is not a map of strings"):
        load_router(_write(tmp_path, st))


def test_router_index_tensors_must_be_i32(tmp_path):
    # choice_experts stored as F32 was cast to int32 without a word (NaN to garbage ids;
    # found by fuzz_router_format as numpy's "invalid value encountered in cast")
    st = _seed_router_safetensors()
    (n,) = struct.unpack_from("<Q", st)
    header = json.loads(st[8:8 + n])
    header["edgemoe.router.choice_experts"]["dtype"] = "F32"
    data = fuzzsupport.safetensors_bytes(json.dumps(header).encode(), st[8 + n:])
    with pytest.raises(RouterFormatError, match="choice_experts is float32, expected i32"):
        load_router(_write(tmp_path, data))


# -- regressions: safetensors (ConvertError only) ----------------------------------------------


@pytest.mark.parametrize("header, needle", [
    (b"[" * 100000, "corrupt safetensors header"),                      # RecursionError
    (b'{"a":' + b"1" * 5000 + b"}", "corrupt safetensors header"),      # int digits limit: ValueError
    (b'{"t":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}}', "corrupt entry"),  # str - str: TypeError
    (b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4.0]}}', "corrupt entry"),  # float slice: TypeError
    (b'{"t":{"dtype":"F32","shape":["a"],"data_offsets":[0,4]}}', "corrupt entry"),    # np.prod of str
    (b'{"t":{"dtype":"F32","shape":[' + str(1 << 70).encode() + b'],"data_offsets":[0,4]}}', "outside the file"),
    (b'{"t":{"dtype":"U8","shape":[-2,-2],"data_offsets":[4,8]}}', "corrupt entry"),   # reshape ValueError
    (b'{"t":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', "unsupported dtype"),  # unhashable dtype
    # begin > end with a negative shape passed the size check and read the wrong bytes
    (b'{"t":{"dtype":"F32","shape":[-1],"data_offsets":[4,0]}}', "corrupt entry"),
])
def test_safetensors_headers_that_broke_the_reader(tmp_path, header, needle):
    path = _write(tmp_path, fuzzsupport.safetensors_bytes(header, b"\0" * 16))
    with pytest.raises(ConvertError, match=needle):
        with SafetensorsFile(path) as st:
            for name in st.names():
                st.tensor(name)


@pytest.mark.parametrize("index, needle", [
    (b'{"weight_map":{"t":"\xff.safetensors"}}', "unreadable safetensors index"),  # UnicodeDecodeError
    (b'{"weight_map":["a"]}', "unreadable safetensors index"),                     # list.values()
    (b'{"weight_map":{"t":1}}', "unreadable safetensors index"),                   # os.path.join(dir, 1)
    (b'[' * 100000, "unreadable safetensors index"),                              # RecursionError
])
def test_safetensors_index_that_broke_the_checkpoint(tmp_path, index, needle):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(ConvertError, match=needle):
        Checkpoint(str(ckpt))


@pytest.mark.parametrize("shard", ["/dev/stdin", "../model.safetensors", "sub/model.safetensors", "..", ""])
def test_safetensors_index_names_shards_beside_it_only(tmp_path, shard):
    # a shard name was joined to the directory as given: an index could make the converter
    # read /dev/stdin (and wait on it) or files outside the checkpoint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"t": shard}}))
    with pytest.raises(ConvertError, match="is not a file name"):
        Checkpoint(str(ckpt))


# -- regressions: trace files (TraceFormatError only) ------------------------------------------


def test_trace_zip_that_is_corrupt(tmp_path):
    # np.load saw the zip magic and zipfile's BadZipFile escaped
    with pytest.raises(TraceFormatError, match="not a readable trace file"):
        load_trace(_write(tmp_path, b"PK\x03\x04" + b"\0" * 40))


@pytest.mark.parametrize("field, value", [(6, b"\x63\x00"),   # needs zip version 9.9: on opening the zip
                                          (8, b"\x20\x00")])  # flag bit 5, patched data: on opening a member
def test_trace_zip_features_python_does_not_read(tmp_path, field, value):
    # zipfile's NotImplementedError escaped (found by fuzz_trace); the field is patched in the
    # central directory entry of the first member
    data = bytearray(_npz(_trace_members()))
    at = data.index(b"PK\x01\x02") + field
    data[at:at + 2] = value
    with pytest.raises(TraceFormatError, match="not a readable trace file"):
        load_trace(_write(tmp_path, bytes(data)))


def test_trace_array_header_claiming_more_than_the_file_holds(tmp_path):
    # np.load allocates the array its .npy header describes before reading a byte of it:
    # 2^36 int32 (256 GiB) from a file of a few hundred bytes
    experts = _npy_raw("{'descr': '<i4', 'fortran_order': False, 'shape': (68719476736, 1, 1), }")
    path = _write(tmp_path, _npz(_trace_members(experts=experts)))

    def load():
        with pytest.raises(TraceFormatError, match="experts is truncated"):
            load_trace(path)
    assert _peak_mib(load) < 16


@pytest.mark.parametrize("header", [
    "{'descr': '<i4', 'fortran_order': False, 'shape': (" + "-" * 9000 + "1,), }",  # MemoryError in the parser
    "{'descr': '<i4', 'fortran_order': False, 'shape': (" + "a." * 4000 + "b,), }",  # RecursionError
    "{'descr': '<i4', 'fortran_order': False, 'shape': ((((, }",                     # tokenize.TokenError
])
def test_trace_npy_headers_that_broke_the_reader(tmp_path, header):
    path = _write(tmp_path, _npz(_trace_members(experts=_npy_raw(header, b"\0" * 16))))
    with pytest.raises(TraceFormatError, match="experts"):
        load_trace(path)


@pytest.mark.parametrize("changes, needle", [
    (dict(experts=b"not an npy"), "experts is not a .npy array"),                     # np.load gave bytes: AttributeError
    (dict(n_expert=_npy(np.array([8, 8], np.int32))), "n_expert must be one number"),  # int(array): TypeError
    (dict(model=_npy_raw("{'descr': '<U1', 'fortran_order': False, 'shape': (), }", b"\xff\xff\xff\xff")),
     "model is not valid Unicode"),                                                     # SystemError in numpy
    # loaded, then `trace-stats` failed printing it: UnicodeEncodeError
    (dict(model=_npy_raw("{'descr': '<U1', 'fortran_order': False, 'shape': (), }", b"\x00\xd8\x00\x00")),
     "model is not valid Unicode"),
    # loaded, then `trace-stats` counted 2^40 experts: MemoryError
    (dict(n_expert=_npy(np.array(1 << 40, np.int64))), "outside the int32 range"),
])
def test_trace_members_that_broke_the_reader(tmp_path, changes, needle):
    with pytest.raises(TraceFormatError, match=needle):
        load_trace(_write(tmp_path, _npz(_trace_members(**changes))))


def test_trace_stats_memory_follows_the_trace_not_its_fields():
    # usage entropy counted every id up to n_expert (16 GiB for n_expert 2^31-1), and EOR
    # compared all k x k pairs of ids at once (k = 20000: 400 MB of booleans)
    wide = np.arange(2 * 20000, dtype=np.int32).reshape(2, 1, 20000) % 30000
    t = Trace(experts=wide, layers=np.zeros(1, np.int32), tokens=np.zeros(2, np.int32),
              n_expert=(1 << 31) - 1, model="m")
    t.validate()
    assert _peak_mib(lambda: routing_stats(t)) < 64
    # both EOR paths (all pairs for small k, sorted search for large k) give the same answer
    overlap = 10000 / 20000  # token 1's ids 0..9999 are among token 0's
    assert eor_per_layer(wide).tolist() == [overlap]
    rng = np.random.default_rng(0)
    for k in (2, 17, 40):
        e = np.stack([np.stack([rng.permutation(64)[:k] for _ in range(3)]) for _ in range(50)]).astype(np.int32)
        cube = (e[1:, :, :, None] == e[:-1, :, None, :]).any(axis=3).sum(axis=2).mean(axis=0) / k
        assert np.allclose(eor_per_layer(e), cube), k
