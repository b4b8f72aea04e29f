#!/usr/bin/env bash
# Prepare a Jetson for edgemoe runs and benchmarks: power mode, pinned clocks, the model disk's
# read-ahead and I/O scheduler, swap. Idempotent (a second run changes nothing and says so) and
# reversible: the state before the first change goes into a state file that --undo restores.
# jetson/README.md documents every switch and its default.
set -eu

usage="usage: jetson/setup.sh [--mode N] [--clocks|--no-clocks] [--device DEV] [--read-ahead-kb KB] [--scheduler NAME] [--swap-gb N|--no-swap] [--dry-run] | --status | --undo"

changing=0  # set once the state is saved: an error from then on says how to go back
die() {
    if [ "$changing" = 1 ]; then
        echo "edgemoe: error: $*; setup stopped part way, jetson/setup.sh --undo restores $STATE" >&2
    else
        echo "edgemoe: error: $*" >&2
    fi
    exit 1
}
usage_error() { echo "edgemoe: error: $*; $usage" >&2; exit 2; }
say() { echo "edgemoe: $*"; }

# Every outside path can be redirected, so that tests run the real script in a fake root.
# EDGEMOE_SYSFS_ROOT also moves the default state and swap files under it: a test never writes
# the real /var/lib, even as root.
TEST_ROOT=${EDGEMOE_SYSFS_ROOT:-}
SYSFS="$TEST_ROOT/sys"
STATE=${EDGEMOE_JETSON_STATE:-$TEST_ROOT/var/lib/edgemoe/jetson-setup.state}
SWAPFILE=${EDGEMOE_SWAPFILE:-$TEST_ROOT/var/lib/edgemoe/swapfile}
CLOCKS_STORE="$STATE.clocks"

action=apply
mode=0
clocks=1
device=/dev/nvme0n1
read_ahead_kb=128
scheduler=none
swap_gb=0   # 0: no swap at all
dry_run=0

is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }

need_value() {
    [ "$2" -ge 2 ] || usage_error "$1 needs a value"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --mode) need_value "$1" $#; mode=$2; shift 2
            is_uint "$mode" || usage_error "--mode takes a number (nvpmodel's mode id), not '$mode'" ;;
        --clocks) clocks=1; shift ;;
        --no-clocks) clocks=0; shift ;;
        --device) need_value "$1" $#; device=$2; shift 2 ;;
        --read-ahead-kb) need_value "$1" $#; read_ahead_kb=$2; shift 2
            is_uint "$read_ahead_kb" || usage_error "--read-ahead-kb takes a number of KiB, not '$read_ahead_kb'" ;;
        --scheduler) need_value "$1" $#; scheduler=$2; shift 2
            case "$scheduler" in ''|*[!a-z0-9_-]*) usage_error "--scheduler takes a scheduler name, not '$scheduler'" ;; esac ;;
        --swap-gb) need_value "$1" $#; swap_gb=$2; shift 2
            { is_uint "$swap_gb" && [ "$swap_gb" -gt 0 ]; } || usage_error "--swap-gb takes a positive number of GiB, not '$swap_gb' (--no-swap for none)" ;;
        --no-swap) swap_gb=0; shift ;;
        --dry-run) dry_run=1; shift ;;
        --status) action=status; shift ;;
        --undo) action=undo; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) usage_error "unknown option '$1'" ;;
    esac
done

# ---- reading the current state ----------------------------------------------------------

# The device's queue dir: a whole disk has block/NAME/queue; a partition's disk is the parent
# of its class/block entry.
queue_dir() {
    local name
    name=$(basename "$1")
    if [ -d "$SYSFS/block/$name/queue" ]; then
        echo "$SYSFS/block/$name/queue"
    elif [ -d "$SYSFS/class/block/$name/../queue" ]; then
        (cd "$SYSFS/class/block/$name/../queue" && pwd -P)
    else
        return 1
    fi
}

# `nvpmodel -q` prints the mode's name, then its id on a line of its own.
current_mode() {
    nvpmodel -q 2>/dev/null | sed -n 's/^[[:space:]]*\([0-9][0-9]*\)[[:space:]]*$/\1/p' | tail -n 1
}

# jetson_clocks pins each CPU's minimum frequency to its maximum (and the GPU's likewise);
# cpu0 pinned means it is in effect. "unknown" where cpufreq is absent.
current_clocks() {
    local d="$SYSFS/devices/system/cpu/cpu0/cpufreq" lo hi
    if [ -r "$d/scaling_min_freq" ] && [ -r "$d/scaling_max_freq" ]; then
        lo=$(cat "$d/scaling_min_freq"); hi=$(cat "$d/scaling_max_freq")
        if [ "$lo" = "$hi" ]; then echo pinned; else echo dynamic; fi
    else
        echo unknown
    fi
}

# sysfs lists every scheduler and brackets the selected one: "[mq-deadline] kyber none".
# A bare name (a plain file standing in for sysfs, after a write) is the selected one.
selected_scheduler() {
    local s
    s=$(cat "$1/scheduler")
    case "$s" in
        *\[*\]*) s=${s#*\[}; echo "${s%%\]*}" ;;
        *) echo "$s" | awk '{print $1}' ;;
    esac
}

# Active swap areas, one "NAME PRIO" per line (zram devices on a stock JetPack).
current_swaps() {
    swapon --show=NAME,PRIO --noheadings --raw 2>/dev/null || true
}

swaps_summary() {
    local s
    s=$(current_swaps | awk '{print $1}' | paste -sd, -)
    echo "${s:-off}"
}

state_get() {  # state_get KEY: the first value of KEY in the state file
    sed -n "s/^$1=//p" "$STATE" | head -n 1
}

require_tool() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH (${2:-is this a Jetson running JetPack?})"
}

require_root() {
    # Real paths need root; a test root (EDGEMOE_SYSFS_ROOT) does not.
    if [ -z "$TEST_ROOT" ] && [ "$(id -u)" != 0 ]; then
        die "jetson/setup.sh changes system settings: run it as root (sudo jetson/setup.sh ...)"
    fi
}

write_sysfs() {  # write_sysfs FILE VALUE
    printf '%s\n' "$2" 2>/dev/null > "$1" || die "cannot write '$2' to $1"
}

# ---- status ------------------------------------------------------------------------------

if [ "$action" = status ]; then
    q=$(queue_dir "$device") || die "$device has no block queue in $SYSFS (no such disk?)"
    echo "power mode: $(command -v nvpmodel >/dev/null 2>&1 && current_mode || echo 'unknown (no nvpmodel)')"
    echo "clocks: $(current_clocks)"
    echo "$(basename "$device") read_ahead_kb: $(cat "$q/read_ahead_kb")"
    echo "$(basename "$device") scheduler: $(selected_scheduler "$q")"
    echo "swap: $(command -v swapon >/dev/null 2>&1 && swaps_summary || echo 'unknown (no swapon)')"
    if [ -f "$STATE" ]; then echo "state file: $STATE (jetson/setup.sh --undo restores it)"; else echo "state file: none"; fi
    exit 0
fi

# ---- undo --------------------------------------------------------------------------------

if [ "$action" = undo ]; then
    if [ ! -f "$STATE" ]; then
        say "no state file at $STATE: nothing to undo"
        exit 0
    fi
    [ "$dry_run" = 0 ] || die "--dry-run applies to setting up, not to --undo"
    require_root
    saved_device=$(state_get device)
    saved_mode=$(state_get mode)
    saved_ra=$(state_get read_ahead_kb)
    saved_sched=$(state_get scheduler)
    saved_swapfile=$(state_get swapfile)
    swapfile_created=$(state_get swapfile_created)
    saved_swaps=$(sed -n 's/^swap=//p' "$STATE")
    { [ -n "$saved_device" ] && is_uint "$saved_mode" && is_uint "$saved_ra" && [ -n "$saved_sched" ]; } \
        || die "state file $STATE is incomplete; remove it by hand after checking the settings"
    # Check everything before the first change.
    q=$(queue_dir "$saved_device") || die "$saved_device has no block queue in $SYSFS (no such disk?)"
    require_tool nvpmodel
    require_tool swapon
    require_tool swapoff
    [ ! -f "$CLOCKS_STORE" ] || require_tool jetson_clocks

    # The mode first: it sets the frequency caps that the stored clocks were taken under.
    now=$(current_mode)
    if [ "$now" != "$saved_mode" ]; then
        nvpmodel -m "$saved_mode" >/dev/null
        say "power mode: $now -> $saved_mode"
    fi
    if [ -f "$CLOCKS_STORE" ]; then
        jetson_clocks --restore "$CLOCKS_STORE"
        rm -f "$CLOCKS_STORE"
        say "clocks: restored from before setup ($(current_clocks))"
    fi
    name=$(basename "$saved_device")
    now=$(cat "$q/read_ahead_kb")
    if [ "$now" != "$saved_ra" ]; then
        write_sysfs "$q/read_ahead_kb" "$saved_ra"
        say "$name read_ahead_kb: $now -> $saved_ra"
    fi
    now=$(selected_scheduler "$q")
    if [ "$now" != "$saved_sched" ]; then
        write_sysfs "$q/scheduler" "$saved_sched"
        say "$name scheduler: $now -> $saved_sched"
    fi
    # Swap: off what setup turned on, on again what it turned off, at the old priorities.
    current_swaps | while read -r sw _; do
        if ! printf '%s\n' "$saved_swaps" | awk -v n="$sw" '$1 == n {f = 1} END {exit !f}'; then
            swapoff "$sw"
            say "swap: $sw off"
        fi
    done
    active=$(current_swaps)
    printf '%s\n' "$saved_swaps" | while read -r sw prio; do
        [ -n "$sw" ] || continue
        if ! printf '%s\n' "$active" | awk -v n="$sw" '$1 == n {f = 1} END {exit !f}'; then
            # Negative priorities are the kernel's own; swapon takes only -1 and above.
            if is_uint "$prio"; then swapon -p "$prio" "$sw"; else swapon "$sw"; fi
            say "swap: $sw on"
        fi
    done
    if [ "$swapfile_created" = 1 ] && [ -f "$saved_swapfile" ]; then
        rm -f "$saved_swapfile"
        say "swap: removed $saved_swapfile"
    fi
    rm -f "$STATE"
    say "jetson setup undone; removed $STATE"
    exit 0
fi

# ---- apply: check everything, then plan, then change ---------------------------------------

[ "$dry_run" = 1 ] || require_root
require_tool nvpmodel
[ "$clocks" = 0 ] || require_tool jetson_clocks
require_tool swapon
require_tool swapoff
q=$(queue_dir "$device") || die "$device has no block queue in $SYSFS (no such disk?)"
name=$(basename "$device")
[ -w "$q/read_ahead_kb" ] || die "$q/read_ahead_kb is not writable"
[ -w "$q/scheduler" ] || die "$q/scheduler is not writable"
available=$(tr -d '[]' < "$q/scheduler")
now_sched=$(selected_scheduler "$q")
if [ "$scheduler" != "$now_sched" ]; then
    # shellcheck disable=SC2086 # split the list into one name a line
    printf '%s\n' $available | grep -qx -- "$scheduler" \
        || die "scheduler '$scheduler' is not available for $name (it offers: $available)"
fi
if [ -f "$STATE" ]; then
    saved_device=$(state_get device)
    [ "$saved_device" = "$device" ] \
        || die "the state file $STATE holds $saved_device's settings: run jetson/setup.sh --undo before setting up $device"
fi
owned_swapfile=0
if [ -f "$STATE" ] && [ "$(state_get swapfile_created)" = 1 ] && [ "$(state_get swapfile)" = "$SWAPFILE" ]; then
    owned_swapfile=1
fi

now_mode=$(current_mode)
is_uint "$now_mode" || die "cannot read the power mode from 'nvpmodel -q'"
now_clocks=$(current_clocks)
now_ra=$(cat "$q/read_ahead_kb")
now_swaps=$(current_swaps)
swap_bytes=$((swap_gb * 1024 * 1024 * 1024))

# The swap wanted: nothing (--no-swap), or the swap file alone at its size.
swap_file_ok=1
swap_others=$(printf '%s\n' "$now_swaps" | awk -v f="$SWAPFILE" 'NF && $1 != f {print $1}')
if [ "$swap_gb" -gt 0 ]; then
    if ! printf '%s\n' "$now_swaps" | awk -v n="$SWAPFILE" '$1 == n {f = 1} END {exit !f}' \
        || [ "$(stat -c %s "$SWAPFILE" 2>/dev/null || echo 0)" != "$swap_bytes" ]; then
        swap_file_ok=0
        # Never overwrite a file this script did not make: it may be somebody's data.
        if [ -e "$SWAPFILE" ] && [ "$owned_swapfile" = 0 ]; then
            die "$SWAPFILE exists and was not made by jetson/setup.sh: remove it or set EDGEMOE_SWAPFILE"
        fi
        require_tool fallocate util-linux
        require_tool mkswap util-linux
    fi
else
    swap_others=$(printf '%s\n' "$now_swaps" | awk 'NF {print $1}')
fi

changes=0
plan() {  # plan WHAT: count a change and say it, as done or as would be done
    changes=$((changes + 1))
    if [ "$dry_run" = 1 ]; then say "would set $1"; else say "$1"; fi
}
[ "$now_mode" = "$mode" ] || plan "power mode: $now_mode -> $mode"
[ "$clocks" = 0 ] || [ "$now_clocks" = pinned ] || plan "clocks: $now_clocks -> pinned (jetson_clocks)"
[ "$now_ra" = "$read_ahead_kb" ] || plan "$name read_ahead_kb: $now_ra -> $read_ahead_kb"
[ "$now_sched" = "$scheduler" ] || plan "$name scheduler: $now_sched -> $scheduler"
for sw in $swap_others; do plan "swap: $sw off"; done
[ "$swap_file_ok" = 1 ] || plan "swap: $SWAPFILE on, $swap_gb GiB"

if [ "$changes" = 0 ]; then
    say "jetson setup: nothing to change (mode $mode, clocks $now_clocks, $name read_ahead_kb $now_ra, scheduler $now_sched, swap $(swaps_summary))"
    exit 0
fi
if [ "$dry_run" = 1 ]; then
    say "dry run: nothing changed"
    exit 0
fi

# Save the state before the first change, once: --undo goes back to before the first run.
if [ ! -f "$STATE" ]; then
    mkdir -p "$(dirname "$STATE")"
    {
        echo "device=$device"
        echo "mode=$now_mode"
        echo "read_ahead_kb=$now_ra"
        echo "scheduler=$now_sched"
        echo "swapfile=$SWAPFILE"
        printf '%s\n' "$now_swaps" | awk 'NF {print "swap=" $1 " " $2}'
    } > "$STATE.tmp"
    mv "$STATE.tmp" "$STATE"
fi
changing=1
trap 'echo "edgemoe: error: setup stopped part way; jetson/setup.sh --undo restores $STATE" >&2' ERR

if [ "$now_mode" != "$mode" ]; then
    nvpmodel -m "$mode" >/dev/null
fi
# After the mode: jetson_clocks pins the clocks at the mode's maxima.
if [ "$clocks" = 1 ] && [ "$now_clocks" != pinned ]; then
    [ -f "$CLOCKS_STORE" ] || jetson_clocks --store "$CLOCKS_STORE" >/dev/null
    jetson_clocks >/dev/null
fi
[ "$now_ra" = "$read_ahead_kb" ] || write_sysfs "$q/read_ahead_kb" "$read_ahead_kb"
[ "$now_sched" = "$scheduler" ] || write_sysfs "$q/scheduler" "$scheduler"
[ "$(cat "$q/read_ahead_kb")" = "$read_ahead_kb" ] || die "$q/read_ahead_kb did not take $read_ahead_kb"
[ "$(selected_scheduler "$q")" = "$scheduler" ] || die "$q/scheduler did not take $scheduler"
for sw in $swap_others; do swapoff "$sw"; done
if [ "$swap_file_ok" = 0 ]; then
    if printf '%s\n' "$(current_swaps)" | awk -v n="$SWAPFILE" '$1 == n {f = 1} END {exit !f}'; then
        swapoff "$SWAPFILE"
    fi
    rm -f "$SWAPFILE"
    mkdir -p "$(dirname "$SWAPFILE")"
    # Record ownership before creating, so that --undo removes even a half-made file.
    grep -qx 'swapfile_created=1' "$STATE" || echo "swapfile_created=1" >> "$STATE"
    fallocate -l "$swap_bytes" "$SWAPFILE"
    chmod 600 "$SWAPFILE"
    mkswap "$SWAPFILE" >/dev/null
    swapon "$SWAPFILE"
fi
say "jetson setup: applied; jetson/setup.sh --undo restores the previous settings (state in $STATE)"
