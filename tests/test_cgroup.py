"""edgemoe.cgroup: finding the memory controller (fake /proc trees for v1, v2 and neither) and,
where this machine allows it (root), real groups: limits, OOM kills, removal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from edgemoe.cgroup import (GROUP_PREFIX, CgroupError, MemoryCgroup, MemoryController, find_memory_controller,
                            leftover_groups)

CONTROLLER, WHY = find_memory_controller()
needs_cgroup = pytest.mark.skipif(CONTROLLER is None, reason=f"no usable cgroup memory controller: {WHY}")


def _fake_proc(tmp_path, mountinfo: str, cgroup: str):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def test_finds_v2_where_the_parent_delegates_memory(tmp_path):
    root = tmp_path / "cg2"
    scope = root / "user.slice" / "session-1.scope"
    scope.mkdir(parents=True)
    (root / "user.slice" / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    (scope / "cgroup.subtree_control").write_text("\n")  # holds processes: enables nothing
    proc = _fake_proc(tmp_path, f"30 20 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
                      "0::/user.slice/session-1.scope\n")
    ctl, why = find_memory_controller(proc)
    assert ctl == MemoryController(2, root / "user.slice"), why
    assert ctl.limit_file == "memory.max" and ctl.name == "v2"


def test_prefers_our_own_v2_group_when_it_delegates(tmp_path):
    root = tmp_path / "cg2"
    own = root / "bench"
    own.mkdir(parents=True)
    (own / "cgroup.subtree_control").write_text("memory\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    proc = _fake_proc(tmp_path, f"30 20 0:26 / {root} rw - cgroup2 cgroup2 rw\n", "0::/bench\n")
    assert find_memory_controller(proc)[0] == MemoryController(2, own)


def test_v2_without_memory_falls_back_to_v1(tmp_path):
    v2, v1 = tmp_path / "unified", tmp_path / "memory"
    v2.mkdir()
    (v2 / "cgroup.subtree_control").write_text("\n")
    mine = v1 / "jobs" / "42"
    mine.mkdir(parents=True)
    (mine / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    mountinfo = (f"41 31 0:38 / {v2} rw,relatime - cgroup2 cgroup2 rw\n"
                 f"35 31 0:32 / {v1} rw,relatime - cgroup cgroup rw,memory\n"
                 f"32 31 0:29 / {tmp_path / 'cpu'} rw,relatime - cgroup cgroup rw,cpu\n")
    proc = _fake_proc(tmp_path, mountinfo, "4:memory:/jobs/42\n1:cpu:/\n0::/\n")
    ctl, why = find_memory_controller(proc)
    assert ctl == MemoryController(1, mine), why
    assert ctl.limit_file == "memory.limit_in_bytes"


def test_v1_mount_rooted_below_the_hierarchy(tmp_path):
    # inside a container the mount's root is our own group: its path is the mount point itself
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("1\n")
    proc = _fake_proc(tmp_path, f"35 31 0:32 /docker/abc {v1} rw - cgroup cgroup rw,memory\n",
                      "4:memory:/docker/abc\n")
    assert find_memory_controller(proc)[0] == MemoryController(1, v1)


def test_neither_gives_a_reason(tmp_path):
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.subtree_control").write_text("cpu\n")
    proc = _fake_proc(tmp_path, f"41 31 0:38 / {v2} rw - cgroup2 cgroup2 rw\n", "0::/\n")
    ctl, why = find_memory_controller(proc)
    assert ctl is None
    assert "memory" in why and "\n" not in why


def test_unreadable_proc_gives_a_reason(tmp_path):
    ctl, why = find_memory_controller(tmp_path / "nowhere")
    assert ctl is None and why


# -- real groups ------------------------------------------------------------------------

@needs_cgroup
def test_limit_is_written_and_group_removed():
    with MemoryCgroup(CONTROLLER, 64 << 20) as cg:
        assert cg.path.is_dir() and cg.path.name.startswith(GROUP_PREFIX)
        assert int((cg.path / CONTROLLER.limit_file).read_text()) == 64 << 20
        assert cg.oom_kills() == 0
    assert not cg.path.exists()
    cg.remove()  # idempotent


def _run_in(cg: MemoryCgroup, code: str) -> subprocess.Popen:
    procs = cg.path / "cgroup.procs"

    def enter():
        procs.write_text(str(__import__("os").getpid()))

    return subprocess.Popen([sys.executable, "-c", code], preexec_fn=enter)


@needs_cgroup
def test_oom_kill_is_counted():
    with MemoryCgroup(CONTROLLER, 48 << 20) as cg:
        # touch every page of 256 MiB: far over the limit, no swap to escape to
        proc = _run_in(cg, "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n")
        assert proc.wait(timeout=120) == -signal.SIGKILL
        assert cg.oom_kills() >= 1 or cg.hit_limit()
        assert cg.hit_limit()


@needs_cgroup
def test_within_limit_runs_and_is_not_an_oom():
    with MemoryCgroup(CONTROLLER, 256 << 20) as cg:
        proc = _run_in(cg, "b = bytearray(16 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n")
        assert proc.wait(timeout=120) == 0
        assert cg.oom_kills() == 0
        peak = cg.peak_bytes()
        assert peak is None or peak >= 16 << 20


@needs_cgroup
def test_remove_kills_what_is_left():
    before = set(leftover_groups(CONTROLLER))  # another run's groups are not this test's
    cg = MemoryCgroup(CONTROLLER, 128 << 20)
    proc = _run_in(cg, "import time; time.sleep(600)")
    deadline = time.monotonic() + 30
    while proc.pid not in cg.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.pid in cg.pids()
    cg.remove()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not cg.path.exists()
    assert set(leftover_groups(CONTROLLER)) <= before  # nothing new left


@needs_cgroup
def test_bad_limit_is_refused_without_a_group():
    before = set(leftover_groups(CONTROLLER))
    with pytest.raises(CgroupError):
        MemoryCgroup(CONTROLLER, 0)
    assert set(leftover_groups(CONTROLLER)) == before
