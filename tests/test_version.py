"""One version from one place (edgemoe/version.py): the package metadata, `edgemoe --version`,
the GGUF keys edgemoe writes, bench rows, and the build's record of what it patched."""

from __future__ import annotations

import importlib.metadata
import re
import runpy
import subprocess
import sys

import pytest

from conftest import REPO, needs_llama


def test_setup_reads_the_version_and_pin_from_version_py():
    from edgemoe import version

    ns = runpy.run_path(str(REPO / "setup.py"), run_name="edgemoe_setup")  # not __main__: nothing is built
    assert ns["VERSION"]["__version__"] == version.__version__
    assert ns["LLAMA_CPP_PYTHON"] == f"llama-cpp-python=={version.LLAMA_CPP_PYTHON_VERSION}"
    assert ns["SDIST_NAME"] == f"llama_cpp_python-{version.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    assert ns["patch_stamp"]() == version.patch_sha256(REPO / "native" / "patches" / "llama.cpp")
    assert re.fullmatch(r"[0-9a-f]{40}", version.LLAMA_CPP_COMMIT)


def test_package_exports_the_same_version():
    import edgemoe
    from edgemoe import version

    assert edgemoe.__version__ == version.__version__


def test_installed_metadata_matches():
    from edgemoe import version

    try:
        installed = importlib.metadata.version("edgemoe")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("edgemoe is not installed")
    assert installed == version.__version__


def test_changelog_has_an_entry_for_the_version():
    from edgemoe import version

    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## {re.escape(version.__version__)} - \d{{4}}-\d{{2}}", text, re.M)


@needs_llama
def test_build_info_records_what_was_built():
    from edgemoe import version

    info = version.build_info()
    assert info is not None, "the native build writes edgemoe/lib/build_info.json"
    assert info.version == version.__version__
    assert info.patch_sha256 == version.patch_sha256(REPO / "native" / "patches" / "llama.cpp")
    if info.llama_cpp_source.startswith("sdist:"):
        assert info.llama_cpp_commit == version.LLAMA_CPP_COMMIT


@needs_llama
def test_cli_version_names_the_build(edgemoe_env):
    from edgemoe import version

    proc = subprocess.run([sys.executable, "-m", "edgemoe", "--version"], env=edgemoe_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"edgemoe {version.__version__} (llama.cpp ")
    assert version.build_info().patch_sha256[:12] in line


def test_build_info_is_none_without_a_build(tmp_path):
    from edgemoe import version

    assert version.build_info(tmp_path) is None
    (tmp_path / version.BUILD_INFO).write_text("{not json", encoding="utf-8")
    assert version.build_info(tmp_path) is None


@needs_llama
def test_gguf_files_edgemoe_writes_carry_the_version(tiny_models, tmp_path, edgemoe_env):
    from edgemoe import version
    from edgemoe.gguf_header import read_header

    assert read_header(str(tiny_models["qwen3moe"])).get(version.VERSION_KEY) == version.__version__
    # a file re-emitted from one edgemoe wrote gets one key, not two (the writer would refuse a duplicate)
    out = tmp_path / "inflated.gguf"
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "inflate", str(tiny_models["qwen3moe"]), "-o", str(out),
                           "--expert-ff", "128"], env=edgemoe_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert read_header(str(out)).get(version.VERSION_KEY) == version.__version__


@needs_llama
def test_bench_rows_carry_the_version_and_llama_cpp_commit():
    from edgemoe import version
    from edgemoe.bench.runner import system_fields

    fields = system_fields()
    assert fields["edgemoe_version"] == version.__version__
    assert version.LLAMA_CPP_COMMIT.startswith(fields["build_commit"]) or version.build_info().llama_cpp_commit == "unknown"
    assert fields["patch_sha256"] == version.build_info().patch_sha256


@pytest.mark.parametrize("name", ["edgemoe-tiny-q8_0.gguf", "edgemoe-tiny-remoe-q8_0.gguf",
                                  "edgemoe-tiny-readme-q8_0.gguf", "edgemoe-deep-q8_0.gguf"])
def test_shipped_models_carry_license_and_source(name):
    from edgemoe.info import describe

    report = describe(str(REPO / "models" / name))
    assert report.license == "MIT"
    assert report.source and "models/cards/" in report.source
    assert (REPO / "models" / "cards" / name.replace(".gguf", ".md")).exists()
