#!/usr/bin/env bash
# Build and install edgemoe on JetPack 6 (CUDA 12.x, Orin's sm_87): the top-level README's
# install command with EDGEMOE_CUDA=1 CMAKE_CUDA_ARCHITECTURES=87 and the jetson extra (jtop
# telemetry), run from the repository root after checking what it needs, so that a missing
# piece fails in a second with its fix instead of half an hour into the compile.
# --check only checks and prints the command. jetson/README.md has the same recipe by hand.
set -eu

usage="usage: jetson/build.sh [--check]"
die() { echo "edgemoe: error: $*" >&2; exit 1; }

check=0
if [ $# -gt 1 ]; then
    echo "edgemoe: error: too many arguments; $usage" >&2; exit 2
elif [ $# = 1 ]; then
    case "$1" in
        --check) check=1 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "edgemoe: error: unknown option '$1'; $usage" >&2; exit 2 ;;
    esac
fi

cd "$(dirname "$0")/.."

arch=$(uname -m)
[ "$arch" = aarch64 ] || die "this recipe is for a Jetson (aarch64), this machine is $arch: use the top-level README's install command with EDGEMOE_CUDA=1 and its GPU's CMAKE_CUDA_ARCHITECTURES"

# JetPack installs CUDA under /usr/local/cuda but leaves its bin/ off PATH.
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvcc="$CUDA_HOME/bin/nvcc"
[ -x "$nvcc" ] || die "no nvcc at $nvcc: install JetPack 6's CUDA (sudo apt install nvidia-jetpack) or set CUDA_HOME"
release=$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
case "$release" in
    12.*) ;;
    *) die "$nvcc is CUDA ${release:-of an unknown version}; this recipe is for JetPack 6's CUDA 12.x" ;;
esac
export PATH="$CUDA_HOME/bin:$PATH"

command -v python3 >/dev/null 2>&1 || die "python3 not found (sudo apt install python3)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "edgemoe needs Python >= 3.10 (JetPack 6's Ubuntu 22.04 has 3.10)"
# Ubuntu splits venv's pip bootstrap into python3-venv; without it `python3 -m venv` fails late.
python3 -c 'import ensurepip' 2>/dev/null || die "python3-venv is missing (sudo apt install python3-venv)"
command -v cmake >/dev/null 2>&1 || die "cmake not found (sudo apt install cmake; 3.21 or newer)"
cmake_version=$(cmake --version | sed -n 's/^cmake version \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
major=${cmake_version%%.*}
minor=${cmake_version#*.}
{ [ -n "$cmake_version" ] && { [ "$major" -gt 3 ] || { [ "$major" = 3 ] && [ "$minor" -ge 21 ]; }; }; } \
    || die "cmake ${cmake_version:-of an unknown version} is older than 3.21 (pip install 'cmake>=3.21' or a newer apt cmake)"
command -v patch >/dev/null 2>&1 || die "patch not found (sudo apt install patch)"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || die "no C++ compiler (sudo apt install build-essential)"

cmd='python3 -m venv .venv && . .venv/bin/activate && CMAKE_ARGS="-DLLAMA_BUILD=OFF" EDGEMOE_CUDA=1 CMAKE_CUDA_ARCHITECTURES=87 pip install "llama-cpp-python==0.3.36" ".[jetson]"'

if [ "$check" = 1 ]; then
    echo "edgemoe: JetPack 6 build checks passed (aarch64, CUDA $release, cmake $cmake_version); the build command:"
    echo "$cmd"
    exit 0
fi
echo "edgemoe: building with CUDA $release for sm_87: $cmd"
eval "$cmd"
echo "edgemoe: built; . .venv/bin/activate && edgemoe run -ngl 99 --expert-cache 25% --stats -p 'Once upon a time' -n 64"
