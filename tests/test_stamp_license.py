"""models/stamp_license.py: the licence, source and (optionally) name keys of a shipped model,
every tensor byte kept."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from gguf import GGUFReader

REPO = pathlib.Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("stamp_license", REPO / "models" / "stamp_license.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _value(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def test_stamp_sets_license_source_and_name_and_keeps_every_tensor(tiny_models, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_models["qwen3moe"], path)
    before = GGUFReader(str(path))
    old_name = _value(before, "general.name")
    old = {t.name: np.asarray(t.data).copy() for t in before.tensors}
    del before

    _script().stamp(str(path), "made here", name="edgemoe-deep")
    after = GGUFReader(str(path))
    assert _value(after, "general.license") == "MIT"
    assert _value(after, "general.source") == "made here"
    assert _value(after, "general.name") == "edgemoe-deep" != old_name
    assert {t.name: np.asarray(t.data) for t in after.tensors}.keys() == old.keys()
    assert all(np.array_equal(np.asarray(t.data), old[t.name]) for t in after.tensors)


def test_stamp_without_a_name_keeps_the_name(tiny_models, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_models["qwen3moe"], path)
    old_name = _value(GGUFReader(str(path)), "general.name")
    _script().stamp(str(path), "made here")
    assert _value(GGUFReader(str(path)), "general.name") == old_name


def test_the_command_passes_name_and_source(tiny_models, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_models["qwen3moe"], path)
    proc = subprocess.run([sys.executable, str(REPO / "models" / "stamp_license.py"), str(path),
                           "--source", "from a test", "--name", "named"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    reader = GGUFReader(str(path))
    assert (_value(reader, "general.source"), _value(reader, "general.name")) == ("from a test", "named")
