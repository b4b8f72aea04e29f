#!/usr/bin/env bash
# Build the libFuzzer targets with clang and run each for a bounded time: first every input of
# its seed corpus and regression folder once, then fuzzing for SECONDS. Exits non-zero on any
# crash, sanitizer report, hang (>10 s an input) or allocation over 2 GiB. CI calls this.
#
#   native/fuzz/run.sh [SECONDS]      # default 60 per target; 0 replays the inputs only
#
# Environment:
#   EDGEMOE_LLAMA_CPP_DIR   llama.cpp tree with ggml's sources (default build/native/llama.cpp,
#                           where setup.py unpacks it)
#   FUZZ_BUILD_DIR          build folder (default build/fuzz); new corpus entries and crash
#                           artifacts go to its corpus/<target>/ and artifacts/<target>/
#   FUZZ_JOBS               parallel compile jobs (default 2)
#   FUZZ_TARGETS            targets to run (default: all, i.e. "model_layout")
#   CC, CXX                 clang to use (default clang-14 / clang++-14, else clang / clang++);
#                           when none is found and this runs as root with apt-get, clang-14 and
#                           libclang-rt-14-dev are installed
set -euo pipefail

SECONDS_PER_TARGET=${1:-60}
if ! [[ $SECONDS_PER_TARGET =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [seconds per target]" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build/fuzz}
llama=${EDGEMOE_LLAMA_CPP_DIR:-$root/build/native/llama.cpp}
jobs=${FUZZ_JOBS:-2}
targets=${FUZZ_TARGETS:-model_layout}

log() { echo "fuzz: $*" >&2; }

# per-target libFuzzer options: inputs up to 8 KiB (the seeds are at most 6 KiB)
target_args() {
    case "$1" in
        model_layout) echo "-max_len=8192 -dict=$here/model_layout.dict" ;;
        *) log "unknown target $1"; exit 2 ;;
    esac
}

# --- a clang with libFuzzer ---------------------------------------------------------------
probe_fuzzer() { # $1: clang++; true when it links a libFuzzer program
    local dir
    dir=$(mktemp -d)
    printf '%s\n' 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char *, unsigned long) { return 0; }' >"$dir/p.cpp"
    local rc=0
    "$1" -fsanitize=fuzzer,address,undefined "$dir/p.cpp" -o "$dir/p" >/dev/null 2>&1 || rc=1
    rm -rf "$dir"
    return $rc
}

pick_clang() {
    if [[ -n ${CXX:-} ]]; then
        CC=${CC:-${CXX/clang++/clang}}
        return 0
    fi
    local v
    for v in -14 ""; do
        if command -v "clang++$v" >/dev/null && command -v "clang$v" >/dev/null && probe_fuzzer "clang++$v"; then
            CXX=clang++$v CC=clang$v
            return 0
        fi
    done
    return 1
}

if ! pick_clang; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "no clang with libFuzzer: installing clang-14 and libclang-rt-14-dev with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq clang-14 libclang-rt-14-dev >/dev/null
        pick_clang || { log "clang-14 installed, but it cannot link a libFuzzer program"; exit 1; }
    else
        log "no clang with libFuzzer found; install clang-14 and libclang-rt-14-dev (Debian), or set CC/CXX"
        exit 1
    fi
fi
probe_fuzzer "$CXX" || { log "$CXX cannot link a libFuzzer program (-fsanitize=fuzzer,address,undefined)"; exit 1; }
command -v cmake >/dev/null || { log "cmake not found"; exit 1; }
log "compiler: $("$CXX" --version | head -n1)"

# --- build ----------------------------------------------------------------------------------
mkdir -p "$build"
cmake -S "$here" -B "$build" -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
      -DEDGEMOE_LLAMA_CPP_DIR="$llama" >"$build/configure.log" 2>&1 \
    || { cat "$build/configure.log" >&2; log "configure failed"; exit 1; }
cmake --build "$build" -j "$jobs" >"$build/build.log" 2>&1 \
    || { tail -n 40 "$build/build.log" >&2; log "build failed"; exit 1; }

# --- run ------------------------------------------------------------------------------------
export GGML_NO_BACKTRACE=1
status=0
for t in $targets; do
    bin=$build/fuzz_$t
    seeds=$here/corpus/$t
    regressions=$here/regressions/$t
    work=$build/corpus/$t
    artifacts=$build/artifacts/$t/
    mkdir -p "$work" "$artifacts" "$regressions"
    # shellcheck disable=SC2046
    common=(-rss_limit_mb=2048 -timeout=10 -artifact_prefix="$artifacts" -print_final_stats=1 $(target_args "$t"))

    log "$t: replaying $(ls "$seeds" | wc -l) seeds and $(ls "$regressions" | wc -l) regression inputs"
    # libFuzzer writes to the first folder it is given: always the scratch one
    if ! "$bin" "${common[@]}" -runs=0 "$work" "$seeds" "$regressions" >"$build/$t.replay.log" 2>&1; then
        tail -n 60 "$build/$t.replay.log" >&2
        log "$t: FAILED on a seed or regression input (log: $build/$t.replay.log)"
        status=1
        continue
    fi

    if [[ $SECONDS_PER_TARGET -gt 0 ]]; then
        log "$t: fuzzing for ${SECONDS_PER_TARGET} s"
        # new entries go to the scratch corpus in the build folder, never into the repository
        if ! "$bin" "${common[@]}" -max_total_time="$SECONDS_PER_TARGET" "$work" "$seeds" "$regressions" \
                >"$build/$t.fuzz.log" 2>&1; then
            grep -v -E '^#[0-9]+ +(NEW|REDUCE|pulse|RELOAD)' "$build/$t.fuzz.log" | tail -n 80 >&2
            log "$t: FAILED; the input is in $artifacts (keep it under native/fuzz/regressions/$t/ once fixed)"
            status=1
            continue
        fi
        grep -E '^(Done [0-9]+ runs|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb))' \
            "$build/$t.fuzz.log" | sed "s/^/fuzz: $t: /" >&2 || true
    fi
    log "$t: ok"
done
exit $status
