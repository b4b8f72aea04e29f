"""The wheel a user builds: tagged for its platform, each shared library once under the soname
the loader asks for, the license files inside; and the build's sdist extraction, safe on every
Python the package claims (tarfile's filters exist only from 3.10.12 / 3.11.4)."""

from __future__ import annotations

import io
import os
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

    # the build directory is shared with the installed package: build what it holds (a test
    # install has the fault hook) rather than flip it under the rest of the suite
    info = version.build_info()
    env = dict(os.environ, EDGEMOE_FAULT_INJECTION="1" if info and info.fault_injection else "0")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=1200, env=env)
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


def test_the_fault_hook_is_left_out_unless_asked_for(monkeypatch):
    """A release build (the README's install) has no read-fault hook; EDGEMOE_FAULT_INJECTION=1
    (the test install) compiles it in."""
    ns = _setup_ns()
    monkeypatch.delenv("EDGEMOE_FAULT_INJECTION", raising=False)
    assert ns["fault_injection"]() is False
    monkeypatch.setenv("EDGEMOE_FAULT_INJECTION", "1")
    assert ns["fault_injection"]() is True
    assert 'option(EDGEMOE_FAULT_INJECTION "compile the read-fault test hook into libedgemoe" OFF)' in \
        (REPO / "CMakeLists.txt").read_text()


def _tiny_patch(tmp_path, old_lines, new_lines, name="f.txt"):
    """A patch dir with one unified diff of name from old_lines to new_lines."""
    import difflib

    pdir = tmp_path / "patches"
    pdir.mkdir()
    diff = difflib.unified_diff([l + "\n" for l in old_lines], [l + "\n" for l in new_lines],
                                fromfile=f"a/{name}", tofile=f"b/{name}", n=3)
    (pdir / "0001-x.patch").write_text(f"diff --git a/{name} b/{name}\n" + "".join(diff))
    return pdir


@pytest.mark.skipif(shutil.which("patch") is None, reason="patch(1) is needed")
def test_patches_apply_without_fuzz(tmp_path, monkeypatch):
    """A tree whose context differs from the patch's is refused, not patched at a guess (the
    default fuzz of 2 would apply this hunk one line off)."""
    ns = _setup_ns()
    base = [f"line {i}" for i in range(20)]
    changed = base[:10] + ["ours"] + base[10:]
    pdir = _tiny_patch(tmp_path, base, changed)
    monkeypatch.setitem(ns["apply_patches"].__globals__, "PATCH_DIR", pdir)

    exact = tmp_path / "exact"
    exact.mkdir()
    (exact / "f.txt").write_text("\n".join(base) + "\n")
    ns["apply_patches"](exact)
    assert (exact / "f.txt").read_text().splitlines() == changed

    drifted = tmp_path / "drifted"
    drifted.mkdir()
    other = list(base)
    other[8] = "line 8, edited upstream"  # inside the hunk's context
    (drifted / "f.txt").write_text("\n".join(other) + "\n")
    with pytest.raises(SystemExit, match="does not apply .* without fuzz"):
        ns["apply_patches"](drifted)
    assert (drifted / "f.txt").read_text().splitlines() == other  # untouched

    # a tree patched before is reverted to its upstream state, then checked and patched again
    ns["unpatch"].__globals__["PATCH_DIR"] = pdir
    ns["unpatch"](exact)
    assert (exact / "f.txt").read_text().splitlines() == base


@needs_llama
def test_a_user_tree_with_another_llama_h_is_refused_naming_the_difference(tmp_path):
    ns = _setup_ns()
    sdist_dir = REPO / "build" / "sdist"
    sdists = list(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        pytest.skip("the pinned sdist is not in build/sdist")
    member = f"llama_cpp_python-{ns['VERSION']['LLAMA_CPP_PYTHON_VERSION']}/vendor/llama.cpp/include/llama.h"
    with tarfile.open(sdists[0]) as tar:
        pinned = tar.extractfile(member).read()
    header = tmp_path / "llama.h"
    header.write_bytes(pinned)
    assert ns["llama_h_difference"](header, sdist_dir) is None
    header.write_bytes(pinned.replace(b"LLAMA_API int32_t llama_n_ctx_seq", b"LLAMA_API int64_t llama_n_ctx_seq", 1)
                       if b"LLAMA_API int32_t llama_n_ctx_seq" in pinned else pinned + b"\nint x;\n")
    diff = ns["llama_h_difference"](header, sdist_dir)
    assert diff and "lines differ" in diff and ("int64_t" in diff or "int x;" in diff), diff


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run is the README's second command, character for character, and that command ends
    with every suite: pytest, the native sanitizer tests, the fuzzer and the aarch64 run."""
    blocks = re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]
    for step in ("python -m pytest -q tests", "bash native/tests/run.sh", "bash native/fuzz/run.sh 60",
                 "bash native/cross/aarch64.sh"):
        assert step in test_command
    for script in ("native/tests/run.sh", "native/fuzz/run.sh", "native/cross/aarch64.sh"):
        assert (REPO / script).exists()
