"""Plumbing shared by the fuzz harnesses in this folder (README.md says how to run them).

Each harness `fuzz_<target>.py` defines TestOneInput(data) and, run as a script, hands it to
atheris (libFuzzer): `python tests/fuzz/fuzz_<target>.py [libFuzzer flags] DIR...`. Imported,
it is plain Python: the pytest module feeds it the seed corpus and the regression inputs
without atheris. TestOneInput lets through only what its parser may raise on bad input; any
other exception reaches atheris, which reports it as a crash and saves the input.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from typing import Callable, Iterable, Sequence

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
CORPUS = HERE / "corpus"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# one thread in numpy's BLAS: libFuzzer ends the process with exit(), and BLAS worker threads
# still running then can crash it after the last input (a false "crash" of the last input)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# libFuzzer flags a harness adds unless the command line gives them: inputs up to 64 KiB,
# and an input that runs for 10 s is reported as a hang
DEFAULT_FLAGS = {"-max_len": "65536", "-timeout": "10"}
# address space a process may grow by past its size after the imports: an allocation sized by
# a length field of a 64 KiB input, not by the input, fails with MemoryError (a crash)
MEMORY_HEADROOM_MB = int(os.environ.get("EDGEMOE_FUZZ_MEMORY_MB", "768"))


def scratch_dir() -> str:
    """Where scratch files go: $EDGEMOE_FUZZ_TMPDIR, else /dev/shm (RAM), else the temp dir."""
    where = os.environ.get("EDGEMOE_FUZZ_TMPDIR")
    if where:
        return where
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class ScratchFile:
    """One file rewritten with every input of the process (never a new file per input).

    A memfd where Linux has them (`path` is then /proc/self/fd/N, nothing to clean up), else a
    file in scratch_dir() (see _own_scratch_path).
    """

    def __init__(self, name: str):
        self.fd = -1
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            try:
                self.fd = os.memfd_create(f"edgemoe-fuzz-{name}")
                self.path = f"/proc/self/fd/{self.fd}"
            except OSError:
                self.fd = -1
        if self.fd < 0:
            self.path = _own_scratch_path(name)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def write(self, data: bytes) -> str:
        """Makes the file hold exactly `data`; returns its path."""
        os.ftruncate(self.fd, 0)
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], done)
        return self.path


class ScratchDir:
    """One directory reused by every input of the process (see _own_scratch_path)."""

    def __init__(self, name: str):
        self.path = _own_scratch_path(name + "-dir")
        os.makedirs(self.path, exist_ok=True)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.path, name)
        with open(path, "wb") as f:
            f.write(data)
        return path


def _own_scratch_path(name: str) -> str:
    """scratch_dir()/edgemoe-fuzz-NAME-PID, removed at exit; first removes those of processes
    no longer alive (libFuzzer ends with exit(), which skips Python's atexit)."""
    import atexit

    where = scratch_dir()
    prefix = f"edgemoe-fuzz-{name}-"
    for old in os.listdir(where):
        pid = old[len(prefix):]
        if old.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            _remove(os.path.join(where, old))
    path = os.path.join(where, f"{prefix}{os.getpid()}")
    atexit.register(_remove, path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def split_modes(data: bytes, n_modes: int):
    """(mode, payload): the first byte picks one of n_modes ways to read the rest."""
    if not data:
        return 0, b""
    return data[0] % n_modes, data[1:]


def limit_memory(headroom_mb: int = MEMORY_HEADROOM_MB) -> None:
    """Caps the address space at its current size plus headroom_mb (0: no cap)."""
    if headroom_mb <= 0:
        return
    import resource

    with open("/proc/self/status") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = (vm_kb << 10) + (headroom_mb << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def with_default_flags(argv: Sequence[str]) -> list:
    argv = list(argv)
    for flag, value in DEFAULT_FLAGS.items():
        if not any(a.startswith(flag + "=") for a in argv[1:]):
            argv.insert(1, f"{flag}={value}")
    return argv


def fuzz_main(test_one_input: Callable[[bytes], None], load: Callable[[], None],
              instrument: Iterable[str]) -> None:
    """Runs a harness under atheris: imports its targets with coverage instrumentation of the
    packages named in `instrument` (atheris instruments whole top-level packages: "edgemoe",
    not "edgemoe.trace"), caps memory, then fuzzes."""
    import atheris

    with atheris.instrument_imports(include=list(instrument)):
        load()
    limit_memory()
    atheris.Setup(with_default_flags(sys.argv), test_one_input)
    atheris.Fuzz()


def seeds(target: str) -> list:
    """The seed corpus of a target: (name, bytes), sorted by name."""
    folder = CORPUS / target
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]


def safetensors_bytes(header: bytes, data: bytes) -> bytes:
    """A safetensors file: the 8-byte length of `header` (its JSON), the header, the data."""
    import struct

    return struct.pack("<Q", len(header)) + header + data


def split_safetensors_payload(payload: bytes) -> bytes:
    """A safetensors file from `header JSON, NUL, data` (JSON has no raw NUL), so that the
    fuzzer edits the JSON without having to keep the length prefix in step."""
    header, _, data = payload.partition(b"\0")
    return safetensors_bytes(header, data)


def safetensors_payload(file_bytes: bytes) -> bytes:
    """The inverse of split_safetensors_payload for a well-formed file (to make seeds)."""
    import struct

    (n,) = struct.unpack_from("<Q", file_bytes)
    return file_bytes[8:8 + n] + b"\0" + file_bytes[8 + n:]
