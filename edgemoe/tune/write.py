"""Writing the tuned model: the source with only its gate tensors replaced, everything else
byte for byte, appearing whole or not at all.

- A GGUF source gives a GGUF with the same keys and tensors in the same order, type and
  alignment; each `blk.N.ffn_gate_inp.weight` is re-encoded in its own type, and
  `edgemoe.tune_router.*` keys record the run (an older record is replaced).
- A Hugging Face checkpoint gives a directory with every file of the source under the same
  name; the safetensors files are copied and only the gate tensors' bytes are overwritten in
  place (same dtype and shape, so the header and every other byte stay), and
  `tune_router.json` records the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VT

from edgemoe.files import discard, publish, temp_beside
from edgemoe.tune.options import TuneError

PREFIX = "edgemoe.tune_router."
RECORD_FILE = "tune_router.json"
_FLOATS = (QType.F32, QType.F16, QType.BF16)


@dataclass(frozen=True)
class Record:
    """How a model was tuned: stored as GGUF keys or as tune_router.json."""

    alpha: float
    lam: float
    window: int
    steps: int
    lr: float
    warmup: float
    ctx: int
    batch: int
    seed: int
    text_name: str
    text_sha256: str
    text_tokens: int
    source_name: str
    source_sha256: str        # of the GGUF file; of a checkpoint's safetensors files, in name order
    eor_before: float         # on fixed windows of the text, in torch
    eor_after: float

    def kv(self) -> List[Tuple[str, object, VT, None]]:
        kinds = {int: VT.UINT64, float: VT.FLOAT32, str: VT.STRING}
        return [(PREFIX + k, v, kinds[type(v)], None) for k, v in asdict(self).items()]


# -- GGUF --------------------------------------------------------------------------------


def _encode(data: np.ndarray, qtype: QType, name: str) -> np.ndarray:
    from edgemoe.convert.writer import encode

    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype in _FLOATS:
        return encode(data, qtype)
    try:
        return gguf.quants.quantize(data, qtype)
    except (NotImplementedError, ValueError):
        raise TuneError(f"{name} is {qtype.name}, which gguf cannot quantize: the tuned gate cannot be "
                        f"stored in its own type") from None


def write_gguf(src: str, out: str, gates: Optional[Dict[int, np.ndarray]], record: Record) -> int:
    """Writes `out`: `src` with the gates of `gates` (MoE layer -> f32 [E, n_embd]) replaced
    and `record` added. Returns the size."""
    from edgemoe.convert.gguf_source import plan_gguf
    from edgemoe.convert.writer import TensorPlan
    from edgemoe.convert.writer import write_gguf as stream_gguf
    from edgemoe.errors import EdgemoeError
    from edgemoe.tune.gguf_model import GATE

    try:
        plan = plan_gguf(src)
    except EdgemoeError as e:
        raise TuneError(str(e)) from None
    gates = dict(gates or {})
    tensors = []
    for t in plan.tensors:
        m = GATE.match(t.name)
        if m is not None and int(m.group(1)) in gates:
            data = gates.pop(int(m.group(1)))
            if tuple(data.shape) != tuple(t.np_shape):
                raise TuneError(f"{t.name}: tuned gate {data.shape} differs from the source's {t.np_shape}")
            t = TensorPlan(t.name, t.np_shape, t.qtype, lambda d=data, q=t.qtype, n=t.name: _encode(d, q, n))
        tensors.append(t)
    if gates:
        raise TuneError(f"{os.path.basename(src)} has no ffn_gate_inp tensor for layer {min(gates)}")
    kv = [item for item in plan.kv if not item[0].startswith(PREFIX)]
    if plan.alignment == gguf.GGUF_DEFAULT_ALIGNMENT and _has_alignment_key(src):
        # the writer omits the default alignment; keep the source's explicit key
        kv.append((gguf.Keys.General.ALIGNMENT, plan.alignment, VT.UINT32, None))
    kv += record.kv()
    fd, tmp = temp_beside(out)
    os.close(fd)
    try:
        try:
            size = stream_gguf(tmp, plan.arch, kv, tensors, plan.alignment, label=f"writing {os.path.basename(out)}")
        except EdgemoeError as e:
            raise TuneError(str(e)) from None
        publish(tmp, out)
    finally:
        discard(tmp)
    return size


def _has_alignment_key(path: str) -> bool:
    from edgemoe.tune.gguf_model import open_reader

    return gguf.Keys.General.ALIGNMENT in open_reader(path).fields


# -- Hugging Face checkpoints ------------------------------------------------------------------


def safetensors_table(path: str) -> Tuple[int, Dict[str, Tuple[str, List[int], int, int]]]:
    """(data start, name -> (dtype, shape, begin, end)) from a safetensors file's header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuneError(f"cannot read the safetensors header of {path} ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, {k: (v["dtype"], list(v["shape"]), *v["data_offsets"]) for k, v in header.items()}


def _st_bytes(data: np.ndarray, dtype: str, name: str) -> bytes:
    from edgemoe.convert.writer import encode

    data = np.ascontiguousarray(data, dtype=np.float32)
    if dtype == "F32":
        return data.astype("<f4").tobytes()
    if dtype == "F16":
        return data.astype("<f2").tobytes()
    if dtype == "BF16":
        return encode(data, QType.BF16).tobytes()  # round to nearest even, as torch does
    raise TuneError(f"{name} is stored as {dtype}; tune-router writes F32, F16 and BF16 gates")


def checkpoint_files(directory: str) -> List[str]:
    """Every regular file under `directory` (links followed), relative, sorted."""
    out = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not (d.startswith(".") and d.endswith(".tmp")))
        for f in files:
            path = os.path.join(root, f)
            if os.path.isfile(path):
                out.append(os.path.relpath(path, directory))
    return sorted(out)


def gate_locations(directory: str, gate_names: Dict[int, str]) -> Dict[str, Dict[int, Tuple[str, List[int], int]]]:
    """safetensors file (relative) -> {layer: (dtype, shape, absolute offset)} of each gate."""
    where: Dict[str, Dict[int, Tuple[str, List[int], int]]] = {}
    found = set()
    for rel in checkpoint_files(directory):
        if not rel.endswith(".safetensors"):
            continue
        base, table = safetensors_table(os.path.join(directory, rel))
        for layer, name in gate_names.items():
            if name in table:
                dtype, shape, begin, _ = table[name]
                where.setdefault(rel, {})[layer] = (dtype, shape, base + begin)
                found.add(layer)
    missing = sorted(set(gate_names) - found)
    if missing:
        raise TuneError(f"{directory}: gate tensor {gate_names[missing[0]]} is in no safetensors file")
    return where


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 22)
        fo.flush()
        os.fsync(fo.fileno())


def checkpoint_sha256(directory: str) -> str:
    """The fingerprint recorded for a checkpoint: sha256 of its safetensors files' bytes, in
    name order."""
    h = hashlib.sha256()
    for rel in checkpoint_files(directory):
        if rel.endswith(".safetensors"):
            with open(os.path.join(directory, rel), "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def write_checkpoint(src: str, out: str, gate_names: Dict[int, str], gates: Dict[int, np.ndarray],
                     record: Record) -> None:
    """Writes the directory `out`: every file of `src`, the gates' bytes replaced."""
    where = gate_locations(src, gate_names)
    files = checkpoint_files(src)
    parent = os.path.dirname(os.path.abspath(out))
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp")
    except OSError as e:
        raise TuneError(f"cannot write beside {out}: {e.strerror or e}") from None
    try:
        for rel in files:
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _copy(os.path.join(src, rel), dst)
            for layer, (dtype, shape, offset) in where.get(rel, {}).items():
                data = gates[layer]
                if list(data.shape) != shape:
                    raise TuneError(f"{gate_names[layer]}: tuned gate {data.shape} differs from the source's {shape}")
                with open(dst, "r+b") as f:
                    f.seek(offset)
                    f.write(_st_bytes(data, dtype, gate_names[layer]))
                    f.flush()
                    os.fsync(f.fileno())
        with open(os.path.join(tmp, RECORD_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(record), f, indent=2)
            f.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(out):
            os.rmdir(out)  # an empty directory (checked before training); a full one is refused
        os.rename(tmp, out)
    except OSError as e:
        raise TuneError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
