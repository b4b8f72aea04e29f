#!/usr/bin/env bash
# The whole test suite from a fresh clone: install edgemoe (building the patched llama.cpp
# once) into .venv, run pytest, then the native unit tests under AddressSanitizer and UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
# llama-cpp-python brings only its Python bindings; edgemoe builds the patched libllama
CMAKE_ARGS="-DLLAMA_BUILD=OFF" python -m pip install -q "llama-cpp-python==0.3.36" ".[test]"

EDGEMOE_REQUIRE_NATIVE=1 python -m pytest -q tests

cmake -S native/tests -B build/native-sanitize -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" > /dev/null
cmake --build build/native-sanitize -j "$(nproc)" > /dev/null
ctest --test-dir build/native-sanitize --output-on-failure
