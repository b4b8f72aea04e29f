"""Build edgemoe: the patched llama.cpp and libedgemoe, compiled once, installed in the package.

llama.cpp's source comes from the pinned llama-cpp-python sdist (its vendor/llama.cpp), fetched
with pip and checked by sha256, or from EDGEMOE_LLAMA_CPP_DIR. Our changes are the patch files
under native/patches/llama.cpp. Environment:

  EDGEMOE_LLAMA_CPP_DIR   an existing llama.cpp tree to use instead of the sdist
  EDGEMOE_CUDA=1          build the CUDA backend (CMAKE_CUDA_ARCHITECTURES, default 87: Orin)
  EDGEMOE_BUILD_DIR       where to build (default: build/native, kept between installs)
  EDGEMOE_JOBS            parallel compile jobs (default: CPU count)
  EDGEMOE_CMAKE_ARGS      extra arguments for CMake
  EDGEMOE_FAULT_INJECTION=1  compile the read-fault test hook into libedgemoe (the test install;
                          never in a release build)
"""

import difflib
import hashlib
import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:  # older setuptools: the wheel package's, if installed (only wheels need it)
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

ROOT = Path(__file__).resolve().parent
# the version and the llama.cpp pin live in edgemoe/version.py, read here without importing edgemoe
VERSION = runpy.run_path(str(ROOT / "edgemoe" / "version.py"))
LLAMA_CPP_PYTHON = f"llama-cpp-python=={VERSION['LLAMA_CPP_PYTHON_VERSION']}"
SDIST_NAME = f"llama_cpp_python-{VERSION['LLAMA_CPP_PYTHON_VERSION']}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCH_DIR = ROOT / "native" / "patches" / "llama.cpp"
VOCABS = ("ggml-vocab-gpt-2.gguf", "ggml-vocab-qwen2.gguf", "ggml-vocab-deepseek-llm.gguf",
          "ggml-vocab-gpt-neox.gguf", "ggml-vocab-llama-spm.gguf")
# the trained default model (models/README.md), shipped inside the package
DEFAULT_MODEL = ROOT / "models" / "edgemoe-tiny-q8_0.gguf"


def log(msg):
    print(f"edgemoe build: {msg}", flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache_dir):
    """The pinned sdist, from a local cache or through pip (which keeps its own HTTP cache)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / SDIST_NAME
    if not sdist.exists() or sha256(sdist) != SDIST_SHA256:
        log(f"fetching the {LLAMA_CPP_PYTHON} sdist for llama.cpp's source")
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            subprocess.check_call([
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                "-q", "-d", tmp, LLAMA_CPP_PYTHON,
            ])
            got = Path(tmp) / SDIST_NAME
            if not got.exists():
                raise SystemExit(f"edgemoe build: pip did not produce {SDIST_NAME}")
            digest = sha256(got)
            if digest != SDIST_SHA256:
                raise SystemExit(f"edgemoe build: sha256 mismatch for {SDIST_NAME}: {digest}")
            os.replace(got, sdist)
    return sdist


def patch_stamp():
    return VERSION["patch_sha256"](PATCH_DIR)


def run_patch(tree, patch_file, *flags):
    """patch(1) with no fuzz (-F0): a hunk applies where its whole context matches, or not at all."""
    return subprocess.call(["patch", "-p1", "-F0", "--silent", *flags, "-i", str(patch_file)], cwd=tree,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def unpatch(tree):
    """Reverts our patches where an EDGEMOE_LLAMA_CPP_DIR tree was patched before, newest first,
    so that the tree is checked and patched from its upstream state."""
    for p in sorted(PATCH_DIR.glob("*.patch"), reverse=True):
        if run_patch(tree, p, "--forward", "--dry-run") != 0 and run_patch(tree, p, "-R", "--dry-run") == 0:
            log(f"{p.name} was applied to the tree before: reverting it first")
            if run_patch(tree, p, "-R") != 0:
                raise SystemExit(f"edgemoe build: cannot revert {p.name} in {tree}")


def apply_patches(tree):
    if shutil.which("patch") is None:
        raise SystemExit("edgemoe build: the 'patch' program is required (apt-get install patch)")
    for p in sorted(PATCH_DIR.glob("*.patch")):
        if run_patch(tree, p, "--forward", "--dry-run") != 0:
            raise SystemExit(f"edgemoe build: {p.name} does not apply to {tree} without fuzz "
                             f"(is it llama.cpp {VERSION['LLAMA_CPP_COMMIT'][:9]}?)")
        log(f"applying {p.name}")
        if run_patch(tree, p, "--forward") != 0:
            raise SystemExit(f"edgemoe build: {p.name} failed to apply to {tree}")


def llama_h_difference(header, sdist_dir):
    """None when `header` is the pinned llama.h; else a one-line account of how it differs: the
    first differing lines against the pinned sdist's copy where that sdist can be had, or the
    digests where it cannot."""
    data = Path(header).read_bytes() if Path(header).is_file() else None
    if data is None:
        return f"{header} is missing"
    if hashlib.sha256(data).hexdigest() == VERSION["LLAMA_H_SHA256"]:
        return None
    try:
        sdist = fetch_sdist(sdist_dir)
        prefix = f"llama_cpp_python-{VERSION['LLAMA_CPP_PYTHON_VERSION']}/vendor/llama.cpp/include/llama.h"
        with tarfile.open(sdist) as tar:
            pinned = tar.extractfile(prefix).read().decode("utf-8", "replace").splitlines()
    except (SystemExit, OSError, KeyError, subprocess.CalledProcessError, tarfile.TarError):
        return f"sha256 {hashlib.sha256(data).hexdigest()[:12]}, expected {VERSION['LLAMA_H_SHA256'][:12]}"
    ours = data.decode("utf-8", "replace").splitlines()
    changed = [line for line in difflib.unified_diff(pinned, ours, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    shown = "; ".join(" ".join(c.split()) for c in changed[:4])
    more = f" (and {len(changed) - 4} more changed lines)" if len(changed) > 4 else ""
    return f"{len(changed)} lines differ, first: {shown}{more}"


def extract_tree(sdist, prefix, dest):
    """The regular files and folders under `prefix` in the sdist, into `dest`, on every Python
    this package supports: tarfile's extraction filters exist only from 3.10.12 and 3.11.4, so
    the members are checked here (no links, devices or paths that leave dest) and the "data"
    filter is added where the running Python has it."""
    dest = Path(dest)
    root = dest.resolve()
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                continue
            name = m.name[len(prefix):]
            target = (root / name).resolve()
            if not name or name.startswith("/") or (target != root and root not in target.parents):
                raise SystemExit(f"edgemoe build: unsafe path {m.name!r} in {Path(sdist).name}")
            m.name = name
            m.mode = 0o755 if m.isdir() or m.mode & 0o111 else 0o644
            members.append(m)
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)


def prepare_tree(build_dir):
    """A patched llama.cpp tree, reused while its source and patches are unchanged."""
    tree = build_dir / "llama.cpp"
    user_tree = os.environ.get("EDGEMOE_LLAMA_CPP_DIR")
    origin = f"dir:{Path(user_tree).resolve()}" if user_tree else f"sdist:{SDIST_SHA256}"
    stamp = f"{origin}\n{patch_stamp()}\n"
    stamp_file = build_dir / "llama.cpp.stamp"
    if tree.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return tree

    if tree.exists():
        shutil.rmtree(tree)
    staging = build_dir / "llama.cpp.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    if user_tree:
        src = Path(user_tree)
        if not (src / "CMakeLists.txt").exists() or not (src / "src" / "llama-graph.cpp").exists():
            raise SystemExit(f"edgemoe build: EDGEMOE_LLAMA_CPP_DIR={user_tree} is not a llama.cpp tree")
        root = str(src.resolve())

        def skip(d, names):
            # VCS data, and build directories at the tree's top (not cmake/build-info.cmake)
            return {n for n in names if n == ".git" or (os.path.realpath(d) == root and n.startswith("build"))}

        shutil.copytree(src.resolve(), staging, ignore=skip)
        unpatch(staging)
        # the Python bindings (llama-cpp-python) declare the pinned llama.h: another API would
        # load and then misread structs at run time
        diff = llama_h_difference(staging / "include" / "llama.h", build_dir.parent / "sdist")
        if diff:
            shutil.rmtree(staging)
            raise SystemExit(f"edgemoe build: EDGEMOE_LLAMA_CPP_DIR={user_tree} is not the llama.cpp that "
                             f"llama-cpp-python {VERSION['LLAMA_CPP_PYTHON_VERSION']}'s bindings were pinned to "
                             f"(commit {VERSION['LLAMA_CPP_COMMIT'][:9]}): include/llama.h differs: {diff}")
    else:
        sdist = fetch_sdist(build_dir.parent / "sdist")
        extract_tree(sdist, f"llama_cpp_python-{VERSION['LLAMA_CPP_PYTHON_VERSION']}/vendor/llama.cpp/", staging)
    apply_patches(staging)
    os.replace(staging, tree)
    stamp_file.write_text(stamp)
    return tree


def fault_injection():
    """EDGEMOE_FAULT_INJECTION=1 compiles the read-fault hook into libedgemoe (the test install)."""
    return os.environ.get("EDGEMOE_FAULT_INJECTION", "0") not in ("", "0", "OFF", "off")


def build_native(build_dir):
    tree = prepare_tree(build_dir)
    cmake_dir = build_dir / "cmake"
    cmake_dir.mkdir(parents=True, exist_ok=True)
    cuda = os.environ.get("EDGEMOE_CUDA", "0") not in ("", "0", "OFF", "off")
    args = [
        "cmake", "-S", str(ROOT), "-B", str(cmake_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DEDGEMOE_LLAMA_CPP_DIR={tree}",
        f"-DEDGEMOE_CUDA={'ON' if cuda else 'OFF'}",
        f"-DEDGEMOE_FAULT_INJECTION={'ON' if fault_injection() else 'OFF'}",
        "-DEDGEMOE_BUILD_TESTS=OFF",
    ]
    if cuda and os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
    args += shlex.split(os.environ.get("EDGEMOE_CMAKE_ARGS", ""))
    if shutil.which("cmake") is None:
        raise SystemExit("edgemoe build: cmake is required (pip install cmake)")
    log("configuring" + (" with CUDA" if cuda else ""))
    subprocess.check_call(args)
    jobs = os.environ.get("EDGEMOE_JOBS") or str(os.cpu_count() or 2)
    log(f"building llama.cpp and libedgemoe ({jobs} jobs)")
    subprocess.check_call(["cmake", "--build", str(cmake_dir), "--target", "edgemoe", "-j", jobs])
    return tree, cmake_dir / "bin"


def shipped_libs(lib_dir):
    """The shared libraries to ship: each once, under its soname. The build has no versioned
    sonames (CMakeLists.txt), so every library is one plain file and a wheel holds no alias
    copies; versioned leftovers of older builds in the same folder are skipped."""
    return [p for p in sorted(Path(lib_dir).iterdir())
            if p.is_file() and not p.is_symlink() and (p.suffix in (".so", ".dylib"))]


def install_libs(lib_dir, tree, pkg_dir):
    """Copies the shared libraries, the build's record (version.BUILD_INFO) and the vocabs."""
    out = pkg_dir / "lib"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in shipped_libs(lib_dir):
        shutil.copyfile(p, out / p.name)
    user_tree = os.environ.get("EDGEMOE_LLAMA_CPP_DIR")
    info = dict(version=VERSION["__version__"],
                llama_cpp_source=f"dir:{Path(user_tree).resolve()}" if user_tree else f"sdist:{SDIST_SHA256}",
                llama_cpp_commit="unknown" if user_tree else VERSION["LLAMA_CPP_COMMIT"],
                patch_sha256=patch_stamp(), cuda=os.environ.get("EDGEMOE_CUDA", "0") not in ("", "0", "OFF", "off"),
                fault_injection=fault_injection())
    (out / VERSION["BUILD_INFO"]).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    vocab_out = pkg_dir / "data" / "vocab"
    vocab_out.mkdir(parents=True, exist_ok=True)
    for name in VOCABS:
        shutil.copyfile(tree / "models" / name, vocab_out / name)
    models_out = pkg_dir / "data" / "models"
    models_out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEFAULT_MODEL, models_out / DEFAULT_MODEL.name)


class BuildWithNative(build_py):
    def run(self):
        build_dir = Path(os.environ.get("EDGEMOE_BUILD_DIR") or ROOT / "build" / "native").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        tree, lib_dir = build_native(build_dir)
        # into the source package too, so that an editable install finds them
        install_libs(lib_dir, tree, ROOT / "edgemoe")
        super().run()
        if not self.editable_mode:
            install_libs(lib_dir, tree, Path(self.build_lib) / "edgemoe")


class BinaryDistribution(Distribution):
    """The package carries compiled libraries: it installs into platlib, and its wheel is not
    pure."""

    def has_ext_modules(self):
        return True


def platform_wheel(base):
    class PlatformWheel(base):
        """py3-none-<platform>: the libraries are loaded with ctypes, not imported as CPython
        extensions, so any Python 3 of this platform can use the wheel and no ABI tag applies;
        pip never hands it to another platform."""

        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    return PlatformWheel


def main():
    setup(
        name="edgemoe",
        version=VERSION["__version__"],
        description="Fast MoE decoding on memory-starved edge devices: an expert cache in llama.cpp",
        long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
        long_description_content_type="text/markdown",
        license="MIT",
        python_requires=">=3.10",
        packages=find_packages(include=["edgemoe", "edgemoe.*"]),
        package_data={"edgemoe": ["lib/*", "data/vocab/*.gguf", "data/models/*.gguf"]},
        license_files=["LICENSE", "THIRD_PARTY_NOTICES.md"],
        include_package_data=False,
        install_requires=[
            # installed without its own native build: see README (CMAKE_ARGS=-DLLAMA_BUILD=OFF)
            LLAMA_CPP_PYTHON,
            "numpy>=1.24",
            "click>=8.1",
            "gguf>=0.17.1",
            "psutil>=5.9",
            "jinja2>=3.1.6",  # chat templates are untrusted code; 3.1.6 fixes a sandbox escape (CVE-2025-27516)
            # edgemoe convert: checkpoints whose tokenizer is a SentencePiece model
            "sentencepiece>=0.2",
            # edgemoe serve: the ASGI toolkit and server (docs/serve.md)
            "starlette>=0.37",
            "uvicorn>=0.29",
        ],
        extras_require={
            # torch/transformers build reference models for the converter and training tests;
            # torch pinned to the CPU wheel (an open range pulls a CUDA build of several GB),
            # tokenizers pinned because a test rebuilds tokenizer.json byte for byte
            # atheris: the Python parsers' coverage-guided fuzzers (tests/fuzz)
            # jetson-stats: tests/test_telemetry.py runs its jtop client against a recorded payload
            "test": ["pytest>=7.4", "torch==2.13.0", "transformers==5.23.0", "tokenizers==0.23.3",
                     "safetensors>=0.4", "openai>=1.0", "httpx>=0.27", "atheris==3.0.0",
                     "jetson-stats==7.2.2"],
            # edgemoe tune-router trains routers in torch (docs/remoe.md); the same pins as "test"
            "tune": ["torch==2.13.0", "transformers==5.23.0", "safetensors>=0.4"],
            "jetson": ["jetson-stats>=4.2"],
            "plot": ["matplotlib>=3.7"],
        },
        entry_points={"console_scripts": ["edgemoe = edgemoe.cli:main"]},
        cmdclass={"build_py": BuildWithNative, **({"bdist_wheel": platform_wheel(bdist_wheel)} if bdist_wheel else {})},
        distclass=BinaryDistribution,
        zip_safe=False,
    )


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests load its helpers
    main()
