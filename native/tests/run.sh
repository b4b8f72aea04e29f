#!/usr/bin/env bash
# Configures, builds and runs the native tests twice, from the repository root:
#   build/native-sanitize  AddressSanitizer + UBSan (-DEDGEMOE_SANITIZE=ON)
#   build/native-tsan      ThreadSanitizer          (-DEDGEMOE_TSAN=ON)
# The cache tests (expert_cache, the C API, the stress test) need the package build's
# llama.cpp tree and libraries (build/native/...); they are required unless
# EDGEMOE_REQUIRE_CACHE_TESTS=0. Exits non-zero if any configure, build or test fails.
#
#   native/tests/run.sh            both
#   native/tests/run.sh asan       one of them (asan or tsan)
# Environment: EDGEMOE_TEST_JOBS (build jobs, default 2), EDGEMOE_STRESS_STEPS (stress steps
# under ASan, default 100000), EDGEMOE_TSAN_STRESS_STEPS (under TSan, default 30000).
set -u
cd "$(dirname "$0")/../.."

jobs=${EDGEMOE_TEST_JOBS:-2}
require=ON
if [ "${EDGEMOE_REQUIRE_CACHE_TESTS:-1}" = "0" ]; then
    require=OFF
fi
which=${1:-all}
case "$which" in
    all|asan|tsan) ;;
    *) echo "usage: $0 [all|asan|tsan]" >&2; exit 2 ;;
esac
status=0
summary=""

run_build() {
    local name=$1 dir=$2
    shift 2
    local t0=$SECONDS rc=0
    echo "=== $name: configure, build and test in $dir"
    cmake -S native/tests -B "$dir" -DEDGEMOE_REQUIRE_CACHE_TESTS=$require "$@" || rc=$?
    if [ $rc -eq 0 ]; then
        cmake --build "$dir" -j "$jobs" || rc=$?
    fi
    local t1=$SECONDS
    if [ $rc -eq 0 ]; then
        local wrap=()
        if [ "$name" = tsan ] && command -v setarch > /dev/null && setarch "$(uname -m)" -R true 2> /dev/null; then
            # gcc's TSan runtime cannot map its shadow under the larger ASLR entropy of newer
            # kernels ("unexpected memory mapping"); without ASLR it always can
            wrap=(setarch "$(uname -m)" -R)
        fi
        "${wrap[@]}" ctest --test-dir "$dir" --output-on-failure || rc=$?
    fi
    local line="$name: $([ $rc -eq 0 ] && echo passed || echo FAILED) (build $((t1 - t0)) s, tests $((SECONDS - t1)) s)"
    echo "=== $line"
    summary="$summary$line"$'\n'
    [ $rc -eq 0 ] || status=1
}

stress_env=${EDGEMOE_STRESS_STEPS:-}
unset EDGEMOE_STRESS_STEPS # passed to CMake below (the test reads the variable over its argument)
export TSAN_OPTIONS="${TSAN_OPTIONS:-second_deadlock_stack=1 history_size=4}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"

case "$which" in
    all|asan) run_build asan build/native-sanitize -DEDGEMOE_SANITIZE=ON -DEDGEMOE_TSAN=OFF \
                  -DEDGEMOE_STRESS_STEPS="${stress_env:-100000}" ;;
esac
case "$which" in
    all|tsan) run_build tsan build/native-tsan -DEDGEMOE_TSAN=ON -DEDGEMOE_SANITIZE=OFF \
                  -DEDGEMOE_STRESS_STEPS="${EDGEMOE_TSAN_STRESS_STEPS:-30000}" ;;
esac
printf '%s' "$summary"
exit $status
