"""llama.cpp's log: silenced by default, its last error line kept for our error messages."""

from __future__ import annotations

import re
import sys

from edgemoe._native import llama

# enum ggml_log_level
_LEVEL_ERROR = 4
_LEVEL_CONT = 5

_verbose = False
_errors: list[str] = []  # error lines since the last take_error()


def _on_log(level: int, text: bytes, user_data) -> None:
    msg = text.decode("utf-8", "replace") if text else ""
    if level == _LEVEL_ERROR:
        _errors.append(msg)
    elif level == _LEVEL_CONT and _errors:
        _errors[-1] += msg
    if _verbose:
        sys.stderr.write(msg)
        sys.stderr.flush()


# kept at module level: llama.cpp holds the pointer for the life of the process
_callback = llama.llama_log_callback(_on_log)
_installed = False


def install(verbose: bool = False) -> None:
    """Routes llama.cpp's log through us; with verbose, it still reaches stderr."""
    global _verbose, _installed
    _verbose = verbose
    if not _installed:
        llama.llama_log_set(_callback, None)
        _installed = True


def take_error() -> str:
    """The most telling error llama.cpp logged since the last call, as one line; clears them.

    The loader logs the cause ("error loading model: <cause>", or a gguf reader's line)
    before a generic "failed to load model", so the cause wins.
    """
    lines = [" ".join(e.split()) for e in _errors if e.strip()]
    _errors.clear()
    if not lines:
        return ""
    for line in lines:
        _, sep, cause = line.partition("error loading model: ")
        if sep and "failed to load model" not in cause:
            return cause
    return re.sub(r"^\w+: ", "", lines[0])
