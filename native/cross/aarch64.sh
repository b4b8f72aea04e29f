#!/usr/bin/env bash
# Cross-builds libllama and libedgemoe for aarch64 (Debian's g++-aarch64-linux-gnu) and runs
# under qemu-user, on a CPU with the Jetson Orin's features (Armv8.2-A + dot product, no i8mm):
#   1. the native tests (ctest: policy, backing store, expert cache, C API, stress);
#   2. decode_check on the shipped default model (Q8_0, which ggml repacks on Arm) and on a
#      synthetic Q4_0 model: cache on equals cache off bit for bit at 100 %, 50 % and the
#      minimum budget, with repacking on and off, and the repacked pools really used.
# CI calls this from the repository root after the package install, whose patched llama.cpp
# tree (build/native/llama.cpp) it builds from. Exits non-zero if any step fails.
#
# Caching: compiles go through ccache (installed with the toolchain) with its directory under
# ~/.cache/edgemoe/ccache-aarch64 and paths relative to the checkout, so a fresh clone on the
# same machine recompiles only what changed. The build folder is build/aarch64.
#
# Environment:
#   EDGEMOE_CROSS_JOBS      build jobs (default 2)
#   EDGEMOE_STRESS_STEPS    remap steps of the stress test under qemu (default 20000)
#   EDGEMOE_CCACHE_DIR      ccache directory (default ~/.cache/edgemoe/ccache-aarch64)
#   PYTHON                  the Python with edgemoe installed, to write the Q4_0 model (default python3)
# When the cross compiler or qemu is missing and this runs as root with apt-get, it installs
# g++-aarch64-linux-gnu, qemu-user and ccache.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
build=$root/build/aarch64
jobs=${EDGEMOE_CROSS_JOBS:-2}
python=${PYTHON:-python3}
log() { echo "aarch64: $*" >&2; }
t_start=$SECONDS

if ! command -v aarch64-linux-gnu-g++ > /dev/null || ! command -v qemu-aarch64 > /dev/null || ! command -v ccache > /dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get > /dev/null; then
        log "installing g++-aarch64-linux-gnu, qemu-user and ccache with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq g++-aarch64-linux-gnu qemu-user ccache > /dev/null
    fi
fi
for tool in aarch64-linux-gnu-g++ qemu-aarch64; do
    if ! command -v "$tool" > /dev/null; then
        log "$tool not found: install Debian's g++-aarch64-linux-gnu and qemu-user"
        exit 1
    fi
done
llama=${EDGEMOE_BUILD_DIR:-$root/build/native}/llama.cpp
if [[ ! -f $llama/CMakeLists.txt ]]; then
    log "no patched llama.cpp tree in build/native/llama.cpp: install the package first (pip install .)"
    exit 1
fi

launcher=()
if command -v ccache > /dev/null; then
    export CCACHE_DIR=${EDGEMOE_CCACHE_DIR:-$HOME/.cache/edgemoe/ccache-aarch64}
    export CCACHE_BASEDIR=$root  # relative paths: hits across clones in other folders
    export CCACHE_NOHASHDIR=1
    export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-2G}
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
    ccache -z > /dev/null
fi

log "configure and build in build/aarch64"
cmake -S "$root" -B "$build" --toolchain "$root/native/cross/aarch64-linux-gnu.cmake" \
    -DCMAKE_BUILD_TYPE=Release -DEDGEMOE_LLAMA_CPP_DIR="$llama" \
    -DEDGEMOE_BUILD_TESTS=ON -DEDGEMOE_FAULT_INJECTION=ON \
    -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 \
    -DEDGEMOE_STRESS_STEPS="${EDGEMOE_STRESS_STEPS:-20000}" "${launcher[@]}" > "$build.configure.log" 2>&1 \
    || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$jobs" > "$build.build.log" 2>&1 || { tail -50 "$build.build.log"; exit 1; }
t_built=$SECONDS
if command -v ccache > /dev/null; then
    log "ccache: $(ccache -s 2>/dev/null | grep -iE '^ *(hits|misses)' | tr -s ' ' | tr '\n' ';')"
fi
log "built in $((t_built - t_start)) s"

# the tests' model files go to build/aarch64 (a disk file system: O_DIRECT works there)
unset EDGEMOE_STRESS_STEPS
status=0
log "native tests under qemu-aarch64 -cpu cortex-a76"
ctest --test-dir "$build/native" --no-tests=error --output-on-failure -E '^decode_check' || status=1
t_tests=$SECONDS

qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu cortex-a76)
check=$build/bin/decode_check
q4=$build/decode-q4_0.gguf
if [[ ! -f $q4 ]]; then
    "$python" -m edgemoe synth --shape olmoe-1b-7b --scale 0.1 --expert-type q4_0 --seed 3 -o "$q4" > /dev/null
fi
for model in "$root/models/edgemoe-tiny-q8_0.gguf" "$q4"; do
    log "decode_check $(basename "$model") (cache on and off, repacked)"
    (cd "$build" && "${qemu[@]}" "$check" "$model" --expect-repacked) || status=1
done
log "$([ $status -eq 0 ] && echo passed || echo FAILED) (build $((t_built - t_start)) s, tests $((t_tests - t_built)) s, decode checks $((SECONDS - t_tests)) s)"
exit $status
