"""python_requires=">=3.10" is true: under the oldest Python it claims, the package compiles, the
build's sdist extraction works, and `edgemoe run` decodes. Skipped where no Python 3.10 is found;
the interpreter is found on PATH or under pyenv (this machine's kind has one)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tarfile

import pytest

from conftest import REPO, needs_llama

MINIMUM = (3, 10)


def _python_310():
    candidates = [shutil.which("python3.10")] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python3.10")))
    candidates += ["/usr/bin/python3.10", "/usr/local/bin/python3.10"]
    for c in candidates:
        if c and os.path.exists(c):
            ok = subprocess.run([c, "-c", "import sys, venv; assert sys.version_info[:2] == (3, 10)"],
                                capture_output=True)
            if ok.returncode == 0:
                return c
    return None


def test_setup_claims_the_minimum():
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    assert f'python_requires=">={MINIMUM[0]}.{MINIMUM[1]}"' in text


@needs_llama
def test_the_oldest_claimed_python_runs_edgemoe(tmp_path):
    python = _python_310()
    if python is None:
        pytest.skip("no Python 3.10 interpreter here")
    env_dir = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(env_dir)], check=True, timeout=120)
    py = str(env_dir / "bin" / "python")
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF", PYTHONPATH=str(REPO))
    env.pop("VIRTUAL_ENV", None)
    pin = (REPO / "edgemoe" / "version.py").read_text()
    version = next(line.split('"')[1] for line in pin.splitlines() if line.startswith("LLAMA_CPP_PYTHON_VERSION"))
    proc = subprocess.run([py, "-m", "pip", "install", "-q", f"llama-cpp-python=={version}", "numpy", "click",
                           "gguf", "psutil", "jinja2", "sentencepiece"], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"cannot install the runtime dependencies for Python 3.10: {proc.stderr.strip()[-300:]}")
    compiled = subprocess.run([py, "-m", "compileall", "-q", "-x", "__pycache__", str(REPO / "edgemoe"),
                               str(REPO / "setup.py")], env=dict(env, PYTHONDONTWRITEBYTECODE="1",
                                                                    PYTHONPYCACHEPREFIX=str(tmp_path / "pyc")),
                              capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    # the build's extraction, run by 3.10 (with or without tarfile's filters)
    sdist = tmp_path / "t.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        src = tmp_path / "a.c"
        src.write_text("int a;\n")
        tar.add(src, arcname="p/vendor/llama.cpp/a.c")
    code = ("import runpy, sys, tarfile\n"
            "ns = runpy.run_path(sys.argv[1], run_name='edgemoe_setup')\n"
            "ns['extract_tree'](sys.argv[2], 'p/vendor/llama.cpp/', sys.argv[3])\n")
    proc = subprocess.run([py, "-c", code, str(REPO / "setup.py"), str(sdist), str(tmp_path / "tree")], env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No module named 'setuptools'" in proc.stderr:
        subprocess.run([py, "-m", "pip", "install", "-q", "setuptools"], env=env, check=True, timeout=300)
        proc = subprocess.run([py, "-c", code, str(REPO / "setup.py"), str(sdist), str(tmp_path / "tree")], env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tree" / "a.c").read_text() == "int a;\n"
    run = subprocess.run([py, "-m", "edgemoe", "run", "-n", "8", "--temp", "0", "--expert-cache", "25%"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
