"""models/stamp_license.py: the licence, source and (optionally) name keys of a shipped model,
every tensor byte kept."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
from gguf import GGUFReader

from edgemoe.gguf_header import read_header

from conftest import REPO

sys.path.insert(0, str(REPO / "models"))

import stamp_license  # noqa: E402


def test_stamp_sets_license_source_and_name_and_keeps_every_tensor(tiny_models, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_models["qwen3moe"], path)
    old_name = read_header(str(path)).get("general.name")
    before = GGUFReader(str(path))
    old = {t.name: np.asarray(t.data).copy() for t in before.tensors}
    del before

    stamp_license.stamp(str(path), "made here", name="edgemoe-deep")
    keys = read_header(str(path))
    assert keys.get("general.license") == "MIT"
    assert keys.get("general.source") == "made here"
    assert keys.get("general.name") == "edgemoe-deep" != old_name
    after = GGUFReader(str(path))
    assert {t.name: np.asarray(t.data) for t in after.tensors}.keys() == old.keys()
    assert all(np.array_equal(np.asarray(t.data), old[t.name]) for t in after.tensors)


def test_stamp_without_a_name_keeps_the_name(tiny_models, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_models["qwen3moe"], path)
    old_name = read_header(str(path)).get("general.name")
    stamp_license.stamp(str(path), "made here")
    assert read_header(str(path)).get("general.name") == old_name


def test_the_command_passes_name_and_source(tiny_models, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_models["qwen3moe"], path)
    proc = subprocess.run([sys.executable, str(REPO / "models" / "stamp_license.py"), str(path),
                           "--source", "from a test", "--name", "named"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    keys = read_header(str(path))
    assert (keys.get("general.source"), keys.get("general.name")) == ("from a test", "named")
