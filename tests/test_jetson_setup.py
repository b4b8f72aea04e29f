"""jetson/setup.sh and jetson/build.sh, the real scripts, run in a fake root.

The fake root has a sysfs tree (the NVMe's queue, cpu0's cpufreq) and fake nvpmodel,
jetson_clocks, swapon, swapoff, mkswap and fallocate on PATH that keep their state in files and
log every call, so a test can tell a query from a change. EDGEMOE_SYSFS_ROOT, EDGEMOE_JETSON_STATE
and EDGEMOE_SWAPFILE keep the scripts off the real /sys and /var/lib, also when pytest runs as root.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SETUP = REPO / "jetson" / "setup.sh"
BUILD = REPO / "jetson" / "build.sh"
GIB = 1024 ** 3

FAKE_TOOLS = {
    "nvpmodel": r"""
echo "nvpmodel $*" >> "$FAKE/calls.log"
case "$1" in
    -q) echo "NV Power Mode: MODE_$(cat "$FAKE/mode")"; cat "$FAKE/mode" ;;
    -m) echo "$2" > "$FAKE/mode" ;;
    *) exit 1 ;;
esac
""",
    # jetson_clocks pins cpu0's minimum frequency to its maximum; --store/--restore save and
    # restore the minimum, as the real one does for every clock.
    "jetson_clocks": r"""
echo "jetson_clocks $*" >> "$FAKE/calls.log"
d="$EDGEMOE_SYSFS_ROOT/sys/devices/system/cpu/cpu0/cpufreq"
case "${1:-}" in
    "") cat "$d/scaling_max_freq" > "$d/scaling_min_freq" ;;
    --store) cat "$d/scaling_min_freq" > "$2" ;;
    --restore) cat "$2" > "$d/scaling_min_freq" ;;
    *) exit 1 ;;
esac
""",
    "swapon": r"""
echo "swapon $*" >> "$FAKE/calls.log"
if [ "$1" = --show=NAME,PRIO ]; then cat "$FAKE/swaps"; exit 0; fi
prio=-2
if [ "$1" = -p ]; then prio=$2; shift 2; fi
if grep -q "^$1 " "$FAKE/swaps"; then echo "swapon: $1: busy" >&2; exit 1; fi
if [ -f "$1" ] && ! grep -qx "$1" "$FAKE/signatures"; then echo "swapon: $1: no signature" >&2; exit 1; fi
echo "$1 $prio" >> "$FAKE/swaps"
""",
    "swapoff": r"""
echo "swapoff $*" >> "$FAKE/calls.log"
grep -q "^$1 " "$FAKE/swaps" || { echo "swapoff: $1: not active" >&2; exit 1; }
grep -v "^$1 " "$FAKE/swaps" > "$FAKE/swaps.new" || true
mv "$FAKE/swaps.new" "$FAKE/swaps"
""",
    "mkswap": r"""
echo "mkswap $*" >> "$FAKE/calls.log"
[ -f "$1" ] || exit 1
echo "$1" >> "$FAKE/signatures"
""",
    "fallocate": r"""
echo "fallocate $*" >> "$FAKE/calls.log"
[ "$1" = -l ] || exit 1
truncate -s "$2" "$3"
""",
}

QUERIES = ("nvpmodel -q", "swapon --show")
SCHEDULERS = ("mq-deadline", "kyber", "none")


def write_tool(bindir: pathlib.Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/bash\nset -eu\n" + body)
    path.chmod(0o755)


class FakeJetson:
    """A fake root: sysfs files, tool state and the call log, and the env that points there."""

    def __init__(self, tmp: pathlib.Path):
        self.root = tmp / "root"
        self.fake = tmp / "fake"
        self.bin = tmp / "bin"
        self.state = tmp / "state" / "jetson-setup.state"
        self.swapfile = tmp / "swap" / "edgemoe.swap"
        for d in (self.fake, self.bin):
            d.mkdir()
        self.queue = self.root / "sys/block/nvme0n1/queue"
        self.queue.mkdir(parents=True)
        (self.queue / "read_ahead_kb").write_text("4096\n")
        (self.queue / "scheduler").write_text("[mq-deadline] kyber none\n")
        # A partition: /sys/class/block/<part> is a link into its disk's directory.
        (self.root / "sys/block/nvme0n1/nvme0n1p1").mkdir()
        (self.root / "sys/class/block").mkdir(parents=True)
        (self.root / "sys/class/block/nvme0n1p1").symlink_to("../../block/nvme0n1/nvme0n1p1")
        self.cpufreq = self.root / "sys/devices/system/cpu/cpu0/cpufreq"
        self.cpufreq.mkdir(parents=True)
        (self.cpufreq / "scaling_min_freq").write_text("729600\n")
        (self.cpufreq / "scaling_max_freq").write_text("1984000\n")
        (self.fake / "mode").write_text("2\n")
        (self.fake / "swaps").write_text("/dev/zram0 5\n/dev/zram1 5\n")
        (self.fake / "signatures").write_text("")
        (self.fake / "calls.log").write_text("")
        for name, body in FAKE_TOOLS.items():
            write_tool(self.bin, name, body)
        self.env = {
            # /usr/local/bin left out: a real nvcc or tool there must not stand in for a fake
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(tmp),
            "LC_ALL": "C",
            "FAKE": str(self.fake),
            "EDGEMOE_SYSFS_ROOT": str(self.root),
            "EDGEMOE_JETSON_STATE": str(self.state),
            "EDGEMOE_SWAPFILE": str(self.swapfile),
        }

    def run(self, *args, env=None, script=SETUP):
        proc = subprocess.run(["bash", str(script), *args], env=env or self.env,
                              capture_output=True, text=True, timeout=60)
        self.kernel_selects_scheduler()
        return proc

    def kernel_selects_scheduler(self):
        """sysfs turns a name written to `scheduler` into the list with that name bracketed; a
        plain file keeps the bare name, so redo what the kernel would have shown."""
        f = self.queue / "scheduler"
        name = f.read_text().strip()
        if "[" not in name:
            f.write_text(" ".join(f"[{s}]" if s == name else s for s in SCHEDULERS) + "\n")

    # the fake system's settings
    def mode(self) -> str:
        return (self.fake / "mode").read_text().strip()

    def read_ahead(self) -> str:
        return (self.queue / "read_ahead_kb").read_text().strip()

    def scheduler(self) -> str:
        return re.search(r"\[([^]]+)\]", (self.queue / "scheduler").read_text()).group(1)

    def min_freq(self) -> str:
        return (self.cpufreq / "scaling_min_freq").read_text().strip()

    def swaps(self) -> list[str]:
        return (self.fake / "swaps").read_text().splitlines()

    def calls(self) -> list[str]:
        return (self.fake / "calls.log").read_text().splitlines()

    def changes(self) -> list[str]:
        return [c for c in self.calls() if not c.startswith(QUERIES)]

    def snapshot(self) -> dict:
        """Every file of the fake root and tool state but the call log: content (of small ones;
        the swap file is GiBs, sparse), size, mode and mtime."""
        out = {}
        for top in (self.root, self.fake, self.state.parent, self.swapfile.parent):
            if not top.exists():
                continue
            for p in sorted(top.rglob("*")):
                if p.is_file() and p.name != "calls.log":
                    st = p.stat()
                    small = st.st_size < 1 << 20
                    out[str(p)] = (st.st_size, st.st_mode, st.st_mtime_ns, p.read_bytes() if small else None)
        return out


@pytest.fixture
def jet(tmp_path):
    return FakeJetson(tmp_path)


def assert_ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgemoe: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_apply_sets_each_setting_and_saves_the_previous_state(jet):
    proc = jet.run()
    assert_ok(proc)
    assert jet.mode() == "0"                       # MAXN on an Orin NX
    assert jet.min_freq() == "1984000"             # pinned by jetson_clocks
    assert jet.read_ahead() == "128"
    assert jet.scheduler() == "none"
    assert jet.swaps() == []                       # zram off: the default is no swap
    assert "nvpmodel -m 0" in jet.changes()
    assert f"jetson_clocks --store {jet.state}.clocks" in jet.changes()
    assert (pathlib.Path(f"{jet.state}.clocks")).read_text().strip() == "729600"
    state = jet.state.read_text().splitlines()
    for line in ("device=/dev/nvme0n1", "mode=2", "read_ahead_kb=4096", "scheduler=mq-deadline",
                 "swap=/dev/zram0 5", "swap=/dev/zram1 5"):
        assert line in state, state
    assert "power mode: 2 -> 0" in proc.stdout
    assert "nvme0n1 read_ahead_kb: 4096 -> 128" in proc.stdout


def test_second_apply_changes_nothing_and_says_so(jet):
    assert_ok(jet.run("--swap-gb", "2"))
    changes, state, before = jet.changes(), jet.state.read_text(), jet.snapshot()
    proc = jet.run("--swap-gb", "2")
    assert_ok(proc)
    assert jet.changes() == changes
    assert jet.snapshot() == before
    assert jet.state.read_text() == state
    assert "nothing to change" in proc.stdout


def test_swap_file_is_made_and_the_only_swap(jet):
    assert_ok(jet.run("--swap-gb", "2"))
    assert jet.swaps() == [f"{jet.swapfile} -2"]
    assert jet.swapfile.stat().st_size == 2 * GIB
    assert jet.swapfile.stat().st_mode & 0o777 == 0o600
    assert f"mkswap {jet.swapfile}" in jet.changes()
    # a new size remakes the file setup.sh owns
    assert_ok(jet.run("--swap-gb", "1"))
    assert jet.swaps() == [f"{jet.swapfile} -2"]
    assert jet.swapfile.stat().st_size == GIB


def test_undo_restores_exact_previous_values_and_removes_the_state(jet):
    assert_ok(jet.run("--mode", "3", "--read-ahead-kb", "256", "--scheduler", "kyber", "--swap-gb", "1"))
    assert (jet.mode(), jet.read_ahead(), jet.scheduler()) == ("3", "256", "kyber")
    # a later run with other values keeps the state of before the first one
    assert_ok(jet.run("--mode", "0"))
    proc = jet.run("--undo")
    assert_ok(proc)
    assert jet.mode() == "2"
    assert jet.min_freq() == "729600"
    assert jet.read_ahead() == "4096"
    assert jet.scheduler() == "mq-deadline"
    assert sorted(jet.swaps()) == ["/dev/zram0 5", "/dev/zram1 5"]
    assert "swapon -p 5 /dev/zram0" in jet.changes()
    assert not jet.swapfile.exists()
    assert not jet.state.exists()
    assert not pathlib.Path(f"{jet.state}.clocks").exists()
    assert "undone" in proc.stdout


def test_undo_without_state_says_so_and_exits_0(jet):
    proc = jet.run("--undo")
    assert_ok(proc)
    assert "nothing to undo" in proc.stdout
    assert jet.changes() == []


def test_undo_leaves_what_setup_did_not_change(jet):
    (jet.queue / "read_ahead_kb").write_text("128\n")
    assert_ok(jet.run("--no-clocks", "--mode", "2"))
    assert jet.min_freq() == "729600"
    assert not any(c.startswith("jetson_clocks") for c in jet.calls())
    n = len(jet.changes())
    assert_ok(jet.run("--undo"))
    undo = jet.changes()[n:]
    # only the scheduler (a file write) and the swaps moved; no tool touched mode or clocks
    assert not any(c.startswith(("nvpmodel", "jetson_clocks")) for c in undo), undo
    assert jet.read_ahead() == "128"
    assert jet.scheduler() == "mq-deadline"


def test_dry_run_changes_nothing(jet):
    before = jet.snapshot()
    proc = jet.run("--dry-run", "--swap-gb", "4")
    assert_ok(proc)
    assert jet.snapshot() == before
    assert jet.changes() == []
    assert not jet.state.exists()
    assert "would set power mode: 2 -> 0" in proc.stdout
    assert "would set swap: /dev/zram0 off" in proc.stdout
    assert f"would set swap: {jet.swapfile} on, 4 GiB" in proc.stdout


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["--mode"],
    ["--mode", "maxn"],
    ["--read-ahead-kb", "-1"],
    ["--swap-gb", "0"],
    ["--swap-gb", "x"],
    ["--scheduler", "a;b"],
    ["extra"],
])
def test_bad_options_exit_2_with_one_line(jet, args):
    before = jet.snapshot()
    proc = jet.run(*args)
    assert_one_line_error(proc, 2, "usage: jetson/setup.sh")
    assert proc.stdout == ""
    assert jet.calls() == []
    assert jet.snapshot() == before


def test_missing_device_is_refused_before_any_change(jet):
    before = jet.snapshot()
    proc = jet.run("--device", "/dev/nvme9n9", "--swap-gb", "1")
    assert_one_line_error(proc, 1, "/dev/nvme9n9", "no block queue")
    assert jet.changes() == []
    assert jet.snapshot() == before
    assert not jet.state.exists()


def test_unavailable_scheduler_is_refused_before_any_change(jet):
    before = jet.snapshot()
    proc = jet.run("--scheduler", "bfq")
    assert_one_line_error(proc, 1, "bfq", "not available")
    assert jet.changes() == []
    assert jet.snapshot() == before


def test_foreign_swap_file_is_never_overwritten(jet):
    jet.swapfile.parent.mkdir()
    jet.swapfile.write_text("somebody's data\n")
    proc = jet.run("--swap-gb", "1")
    assert_one_line_error(proc, 1, str(jet.swapfile), "not made by")
    assert jet.swapfile.read_text() == "somebody's data\n"
    assert jet.changes() == []


def test_partition_resolves_to_its_disk(jet):
    assert_ok(jet.run("--device", "/dev/nvme0n1p1", "--read-ahead-kb", "512"))
    assert jet.read_ahead() == "512"


def test_state_of_another_device_is_refused(jet):
    assert_ok(jet.run())
    other = jet.root / "sys/block/mmcblk0/queue"
    other.mkdir(parents=True)
    (other / "read_ahead_kb").write_text("128\n")
    (other / "scheduler").write_text("[mq-deadline] none\n")
    n = len(jet.changes())
    proc = jet.run("--device", "/dev/mmcblk0")
    assert_one_line_error(proc, 1, "--undo")
    assert len(jet.changes()) == n
    assert (other / "scheduler").read_text() == "[mq-deadline] none\n"


def test_real_paths_need_root(jet):
    # `id` says a normal user and no test root is set; the device does not exist, so even a
    # broken root check could not write the real /sys.
    write_tool(jet.bin, "id", 'echo 1000\n')
    env = {k: v for k, v in jet.env.items() if k != "EDGEMOE_SYSFS_ROOT"}
    proc = jet.run("--device", "/dev/edgemoe-test-absent", env=env)
    assert_one_line_error(proc, 1, "root")
    assert jet.changes() == []
    proc = jet.run("--undo", env=env)
    assert_ok(proc)  # no state file: nothing to undo, no root needed to say so


def test_status_prints_current_settings(jet):
    proc = jet.run("--status")
    assert_ok(proc)
    assert "power mode: 2" in proc.stdout
    assert "clocks: dynamic" in proc.stdout
    assert "nvme0n1 read_ahead_kb: 4096" in proc.stdout
    assert "nvme0n1 scheduler: mq-deadline" in proc.stdout
    assert "swap: /dev/zram0,/dev/zram1" in proc.stdout
    assert "state file: none" in proc.stdout
    assert jet.changes() == []


def test_failing_tool_leaves_state_for_undo(jet):
    write_tool(jet.bin, "nvpmodel", FAKE_TOOLS["nvpmodel"].replace('-m) echo "$2" > "$FAKE/mode" ;;', "-m) exit 1 ;;"))
    proc = jet.run()
    assert proc.returncode != 0
    assert "--undo" in proc.stderr
    assert jet.state.exists()
    assert_ok(jet.run("--undo"))
    assert not jet.state.exists()


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SETUP)], check=True)
    subprocess.run(["bash", "-n", str(BUILD)], check=True)


# ---- jetson/build.sh: the JetPack 6 recipe's checks ------------------------------------------

def build_env(jet, arch="aarch64", nvcc="12.6", cmake="3.22.1"):
    write_tool(jet.bin, "uname", f'[ "${{1:-}}" = -m ] && echo {arch} || echo Linux\n')
    cuda = jet.bin.parent / "cuda"
    (cuda / "bin").mkdir(parents=True, exist_ok=True)
    if nvcc:
        write_tool(cuda / "bin", "nvcc",
                   f'echo "Cuda compilation tools, release {nvcc}, V{nvcc}.68"\n')
    write_tool(jet.bin, "cmake", f'echo "cmake version {cmake}"\n')
    write_tool(jet.bin, "python3", "exit 0\n")     # stands for Python >= 3.10 with venv
    write_tool(jet.bin, "patch", "exit 0\n")
    write_tool(jet.bin, "c++", "exit 0\n")
    return {**jet.env, "CUDA_HOME": str(cuda)}


@pytest.mark.parametrize("kw, needles", [
    ({"arch": "x86_64"}, ("aarch64", "x86_64")),
    ({"nvcc": None}, ("no nvcc",)),
    ({"nvcc": "11.4"}, ("11.4", "12.x")),
    ({"cmake": "3.16.3"}, ("3.16", "3.21")),
])
def test_build_refuses_what_jetpack_6_lacks(jet, kw, needles):
    proc = jet.run("--check", env=build_env(jet, **kw), script=BUILD)
    assert_one_line_error(proc, 1, *needles)


def test_build_bad_option_exits_2(jet):
    proc = jet.run("--now", env=build_env(jet), script=BUILD)
    assert_one_line_error(proc, 2, "usage: jetson/build.sh")


def install_command(readme: str) -> str:
    block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    return next(line for line in block.splitlines() if "pip install" in line)


def test_build_runs_the_readme_install_command_with_the_jetson_switches(jet):
    proc = jet.run("--check", env=build_env(jet), script=BUILD)
    assert_ok(proc)
    assert "CUDA 12.6" in proc.stdout
    cmd = proc.stdout.strip().splitlines()[-1]
    # the top-level README's command, up to the install, with the switches and the extra
    top = install_command((REPO / "README.md").read_text())
    top = top[:top.index(" && edgemoe run")]
    expected = top.replace('CMAKE_ARGS="-DLLAMA_BUILD=OFF" ',
                           'CMAKE_ARGS="-DLLAMA_BUILD=OFF" EDGEMOE_CUDA=1 CMAKE_CUDA_ARCHITECTURES=87 ')
    expected = expected[:-len(" .")] + ' ".[jetson]"'
    assert cmd == expected
    # and jetson/README.md's "Build on JetPack 6" shows that same command
    section = (REPO / "jetson" / "README.md").read_text().split("## Build on JetPack 6", 1)[1]
    assert cmd in section.split("\n## ", 1)[0]
