"""The wheel a user builds: tagged for its platform, each shared library once under the soname
the loader asks for, the license files inside; and the build's sdist extraction, safe on every
Python the package claims (tarfile's filters exist only from 3.10.12 / 3.11.4)."""

from __future__ import annotations

import io
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

from conftest import REPO, needs_llama

PREFIX = "pkg-1.0/vendor/llama.cpp/"


def _setup_ns():
    return runpy.run_path(str(REPO / "setup.py"), run_name="edgemoe_setup")


def _sdist(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type = tarfile.SYMTYPE
                info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o4755 if kind == "setuid" else 0o644
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("has_filter", [True, False])
def test_extract_tree_takes_the_tree_on_any_python(tmp_path, monkeypatch, has_filter):
    ns = _setup_ns()
    if not has_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    sdist = tmp_path / "pkg.tar.gz"
    _sdist(sdist, [(PREFIX + "src", "dir", None), (PREFIX + "src/a.c", "file", b"int a;"),
                   (PREFIX + "run.sh", "setuid", b"#!/bin/sh\n"), (PREFIX + "evil", "link", "/etc/passwd"),
                   ("pkg-1.0/other.txt", "file", b"outside the prefix")])
    out = tmp_path / "tree"
    ns["extract_tree"](sdist, PREFIX, out)
    assert (out / "src" / "a.c").read_bytes() == b"int a;"
    assert not (out / "evil").exists() and not (out / "evil").is_symlink()  # links are not taken
    assert not (out / "other.txt").exists()
    assert (out / "run.sh").stat().st_mode & 0o7777 == 0o755  # no setuid bit


def test_extract_tree_refuses_paths_that_leave_the_tree(tmp_path):
    ns = _setup_ns()
    sdist = tmp_path / "pkg.tar.gz"
    _sdist(sdist, [(PREFIX + "../../escape.txt", "file", b"x")])
    with pytest.raises(SystemExit, match="unsafe path"):
        ns["extract_tree"](sdist, PREFIX, tmp_path / "tree")
    assert not (tmp_path / "escape.txt").exists()


def test_shipped_libs_skip_aliases_and_versioned_leftovers(tmp_path):
    ns = _setup_ns()
    (tmp_path / "libllama.so").write_bytes(b"elf")
    (tmp_path / "libllama.so.0").symlink_to("libllama.so")
    (tmp_path / "libggml.so.0.9.4").write_bytes(b"old")  # an older build's versioned file
    (tmp_path / "libedgemoe.so").write_bytes(b"elf")
    assert [p.name for p in ns["shipped_libs"](tmp_path)] == ["libedgemoe.so", "libllama.so"]


def _soname(path) -> str:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", out)
    return m.group(1) if m else ""


@needs_llama
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is needed to read sonames")
def test_pip_wheel_is_tagged_for_its_platform_with_each_library_once(tmp_path):
    from edgemoe import version

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list(tmp_path.glob("edgemoe-*.whl"))
    assert len(wheels) == 1
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheels[0].name == f"edgemoe-{version.__version__}-py3-none-{plat}.whl"
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        dist = f"edgemoe-{version.__version__}.dist-info"
        wheel_meta = z.read(f"{dist}/WHEEL").decode()
        assert "Root-Is-Purelib: false" in wheel_meta
        assert f"Tag: py3-none-{plat}" in wheel_meta
        assert f"Version: {version.__version__}" in z.read(f"{dist}/METADATA").decode()
        assert {f"{dist}/licenses/LICENSE", f"{dist}/licenses/THIRD_PARTY_NOTICES.md"} <= set(names)
        libs = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("edgemoe/lib/") and ".so" in n)
        assert not [n for n in libs if re.search(r"\.so\.\d", n)], libs  # no alias or versioned copies
        assert {"libedgemoe.so", "libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"} <= set(libs)
        assert len(libs) == len(set(libs))
        assert "edgemoe/lib/build_info.json" in names
        z.extractall(tmp_path / "x", members=[f"edgemoe/lib/{n}" for n in libs])
    for n in libs:  # the loader finds each by the name the others were linked against
        assert _soname(tmp_path / "x" / "edgemoe" / "lib" / n) == n
