"""Finds the native libraries and loads them.

This is the one place that knows where `libllama.so`, `libggml*.so` and `libedgemoe.so`
live. It sets `LLAMA_CPP_LIB_PATH` before llama-cpp-python is imported, so that
llama-cpp-python (installed without its own native build) loads our patched libllama.
Every other module gets llama.cpp's bindings as `from edgemoe._native import llama`.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
from typing import Optional

from edgemoe.errors import NativeLibraryError

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def lib_dir() -> pathlib.Path:
    """The directory of the shared libraries: `EDGEMOE_LIB_DIR`, else `edgemoe/lib/`."""
    override = os.environ.get("EDGEMOE_LIB_DIR")
    return pathlib.Path(override) if override else _PACKAGE_DIR / "lib"


def vocab_dir() -> pathlib.Path:
    """The directory of the vocab GGUFs: `EDGEMOE_VOCAB_DIR`, else `edgemoe/data/vocab/`."""
    override = os.environ.get("EDGEMOE_VOCAB_DIR")
    return pathlib.Path(override) if override else _PACKAGE_DIR / "data" / "vocab"


def _import_llama():
    if "llama_cpp" in sys.modules and os.environ.get("LLAMA_CPP_LIB_PATH") != str(lib_dir()):
        # Imported before us: it may have loaded another libllama than ours.
        loaded = os.environ.get("LLAMA_CPP_LIB_PATH", "its own lib/ directory")
        raise NativeLibraryError(
            f"llama_cpp was imported before edgemoe and loaded libllama from {loaded}; "
            f"import edgemoe first"
        )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir())
    try:
        from llama_cpp import llama_cpp as module
    except (OSError, RuntimeError) as e:  # FileNotFoundError is an OSError
        raise NativeLibraryError(
            f"cannot load libllama from {lib_dir()} ({e}); set EDGEMOE_LIB_DIR or reinstall edgemoe"
        ) from None
    return module


llama = _import_llama()

_edgemoe_lib: Optional[ctypes.CDLL] = None


def edgemoe_library() -> ctypes.CDLL:
    """libedgemoe, loaded on first use; raises NativeLibraryError when absent."""
    global _edgemoe_lib
    if _edgemoe_lib is None:
        path = lib_dir() / "libedgemoe.so"
        if not path.exists():
            raise NativeLibraryError(f"libedgemoe.so not found in {lib_dir()}")
        try:
            # libllama is already loaded (above), so libedgemoe's dependency on it
            # resolves to the same copy.
            _edgemoe_lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise NativeLibraryError(f"cannot load {path}: {e}") from None
    return _edgemoe_lib


def has_edgemoe_library() -> bool:
    try:
        edgemoe_library()
    except NativeLibraryError:
        return False
    return True
