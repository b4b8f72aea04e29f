"""Output files that appear whole or not at all: written under a temporary name beside the
target (same file system, so the final rename is atomic), then renamed; and the fingerprint
that outputs record of their inputs."""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Tuple, Union

PathLike = Union[str, os.PathLike]


def temp_beside(path: PathLike) -> Tuple[int, str]:
    """An open descriptor and the name of a new hidden temporary file next to `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    return tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")


def publish(tmp: str, path: PathLike) -> None:
    """Gives `tmp` the permissions of a normally created file (mkstemp makes 0600) and renames
    it to `path`."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def check_model_file(path: PathLike) -> None:
    """Fails with a one-line reason (EdgemoeIOError, ModelFormatError) before llama.cpp or a
    child process sees the file."""
    from edgemoe.errors import EdgemoeIOError, ModelFormatError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise EdgemoeIOError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise EdgemoeIOError(f"model path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise EdgemoeIOError(f"cannot read model file {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelFormatError(f"not a GGUF file: {path}")


def probe_beside(path: PathLike) -> None:
    """Creates and removes a temporary file beside `path`: a long job fails before it starts,
    not at its end, when its output cannot be written (raises OSError)."""
    fd, probe = temp_beside(path)
    os.close(fd)
    discard(probe)


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (raises OSError)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
