"""The model `edgemoe run` uses without -m: the tiny qwen3moe trained on public-domain English
(models/README.md), shipped with the package as `edgemoe/data/models/edgemoe-tiny-q8_0.gguf`.

setup.py copies it there from `models/` at install time (also for editable installs), so a
source checkout that was never installed finds it in `models/` instead.
"""

from __future__ import annotations

import os
import pathlib

from edgemoe.errors import EdgemoeIOError

FILE_NAME = "edgemoe-tiny-q8_0.gguf"
_PACKAGE = pathlib.Path(__file__).resolve().parent


def candidates() -> list:
    override = os.environ.get("EDGEMOE_DEFAULT_MODEL")
    if override:
        return [pathlib.Path(override)]
    return [_PACKAGE / "data" / "models" / FILE_NAME, _PACKAGE.parent / "models" / FILE_NAME]


def default_model_path() -> pathlib.Path:
    """The default model's path; a one-line error when the install lacks it."""
    for path in candidates():
        if path.is_file():
            return path
    raise EdgemoeIOError(f"the default model {FILE_NAME} is not installed (looked in "
                         f"{', '.join(str(p.parent) for p in candidates())}); pass -m MODEL or reinstall edgemoe")
