"""Inputs of `edgemoe bench` read from files and sizes, checked before anything runs."""

from __future__ import annotations

import json
import os
from typing import List

from edgemoe.files import check_model_file
from edgemoe.budget import parse_budget
from edgemoe.errors import EdgemoeIOError, InvalidArgumentError


def read_prompts(path: str) -> List[str]:
    """Prompts of a JSONL file: one JSON object per line with a "prompt" (or "text") string;
    blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise EdgemoeIOError(f"cannot read --prompts {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"--prompts {path} is not UTF-8 text") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"--prompts {path}:{n}: not JSON ({e.msg})") from None
        text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgumentError(f'--prompts {path}:{n}: needs a non-empty "prompt" string')
        prompts.append(text)
    if not prompts:
        raise InvalidArgumentError(f"--prompts {path} holds no prompts")
    return prompts


def parse_mem_limit(text: str) -> int:
    """A size such as 2GiB or 1500MB, in bytes ("auto" is handled by the caller)."""
    try:
        budget = parse_budget(text)
    except InvalidArgumentError:
        budget = None
    if budget is None or budget.bytes is None:
        raise InvalidArgumentError(f"--mem-limit takes a size (2GiB, 1500MiB) or auto, got {text!r}")
    return budget.bytes


def check_model_path(path: str) -> str:
    check_model_file(path)
    return os.path.abspath(path)
