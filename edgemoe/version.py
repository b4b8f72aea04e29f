"""edgemoe's version and what its native build is made of: the one place these facts live.

setup.py reads this file without importing the package (it executes it), so it must stay free
of imports beyond the standard library. The build adds `lib/build_info.json` beside the
libraries it compiled: the patch hash and the llama.cpp source it patched.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__version__ = "0.2.0"

# llama.cpp's source: the vendor/llama.cpp tree of this llama-cpp-python sdist, at this commit
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# sha256 of that tree's include/llama.h, unpatched: the API llama-cpp-python's bindings declare.
# setup.py refuses an EDGEMOE_LLAMA_CPP_DIR tree whose llama.h differs.
LLAMA_H_SHA256 = "d5cf9203bea63b575e76cba4881f29cfd1b611451578b01582b75b72ecbb04bc"

# the GGUF key that every file edgemoe writes carries (convert, inflate, synth, tune-router, routers)
VERSION_KEY = "edgemoe.version"

BUILD_INFO = "build_info.json"


def stamp_gguf(writer, kv=()) -> list:
    """Adds VERSION_KEY to a gguf.GGUFWriter; returns `kv` (key, ...) tuples without an older
    VERSION_KEY, which a file re-emitted from one edgemoe wrote carries."""
    writer.add_string(VERSION_KEY, __version__)
    return [item for item in kv if item[0] != VERSION_KEY]


def patch_sha256(patch_dir: Path) -> str:
    """sha256 over the sorted patch files' names and bytes (the build's stamp of what it applied)."""
    h = hashlib.sha256()
    for p in sorted(Path(patch_dir).glob("*.patch")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class BuildInfo:
    """What the installed native libraries were built from (lib/build_info.json)."""

    version: str
    llama_cpp_source: str      # "sdist:<sha256>" for the pinned sdist, or "dir:<path>" (EDGEMOE_LLAMA_CPP_DIR)
    llama_cpp_commit: str      # LLAMA_CPP_COMMIT for the sdist; "unknown" for a user's tree
    patch_sha256: str
    cuda: bool
    fault_injection: bool = False  # the read-fault test hook is compiled in (a test build)


def build_info(lib_dir: Optional[os.PathLike] = None) -> Optional[BuildInfo]:
    """The build's record, or None where no native build is installed."""
    path = Path(lib_dir or Path(__file__).resolve().parent / "lib") / BUILD_INFO
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return BuildInfo(**{k: data[k] for k in BuildInfo.__dataclass_fields__
                            if k in data or k != "fault_injection"})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe() -> str:
    """One line for `edgemoe --version`."""
    info = build_info()
    if info is None:
        return f"edgemoe {__version__} (no native build)"
    commit = info.llama_cpp_commit[:9] if info.llama_cpp_source.startswith("sdist:") else info.llama_cpp_source
    return (f"edgemoe {__version__} (llama.cpp {commit} from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, "
            f"patches {info.patch_sha256[:12]}, {'CUDA' if info.cuda else 'CPU'}"
            f"{', fault injection' if info.fault_injection else ''})")


def version_fields() -> dict:
    """The version facts a bench row or a record carries."""
    info = build_info()
    return dict(edgemoe_version=__version__,
                llama_cpp_commit=info.llama_cpp_commit if info else LLAMA_CPP_COMMIT,
                patch_sha256=info.patch_sha256 if info else None)
