"""Memory limits for child processes: one cgroup per run, cgroup v2 `memory.max` where the
memory controller is delegated to us, else cgroup v1 `memory.limit_in_bytes`.

Both versions count the page cache a process brings in, so a limit covers stock llama.cpp's
mmap of the model as well as edgemoe's slot pools. A group is created under the cgroup this
process is in (v1), or under the nearest of it and its parent that has the memory controller in
`cgroup.subtree_control` (v2: a cgroup that enables controllers for its children may hold no
processes itself, so ours is often not that one). Creating, limiting and moving a process
needs root or a delegated subtree; `find_memory_controller` says why when neither works.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from edgemoe.errors import EdgemoeError

GROUP_PREFIX = "edgemoe-bench-"


class CgroupError(EdgemoeError):
    """A cgroup could not be created, limited, joined or removed."""


@dataclass(frozen=True)
class MemoryController:
    version: int  # 1 or 2
    parent: Path  # groups are created as its subdirectories

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    @property
    def name(self) -> str:
        return f"v{self.version}"


def _mounts(mountinfo: Path) -> List[Tuple[str, str, str, List[str]]]:
    """(root within the hierarchy, mount point, fs type, super options) of each mount."""
    out = []
    for line in mountinfo.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        # mountinfo escapes spaces and the like as octal
        point = fields[4].encode().decode("unicode_escape")
        out.append((fields[3], point, tail[0], tail[2].split(",")))
    return out


def _own_cgroups(cgroup_file: Path) -> List[Tuple[List[str], str]]:
    """(controllers, path) per line of /proc/self/cgroup; controllers [] for the v2 line."""
    out = []
    for line in cgroup_file.read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append(([c for c in parts[1].split(",") if c], parts[2]))
    return out


def _below(mount_point: str, mount_root: str, path: str) -> Optional[Path]:
    """The directory of cgroup `path` under a mount of the hierarchy whose root is `mount_root`."""
    root = mount_root.rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        return None  # our cgroup is not visible through this mount
    return Path(mount_point) / path[len(root):].lstrip("/")


def find_memory_controller(proc_self: Path = Path("/proc/self")) -> Tuple[Optional[MemoryController], str]:
    """The controller to create limited groups with, or None and a one-line reason.

    Args:
        proc_self: where `mountinfo` and `cgroup` are read (a fake tree in tests).
    """
    try:
        mounts = _mounts(proc_self / "mountinfo")
        own = _own_cgroups(proc_self / "cgroup")
    except OSError as e:
        return None, f"cannot read the process's cgroups: {e.strerror or e}"
    reasons = []

    v2_path = next((p for ctrls, p in own if not ctrls), None)
    for root, point, fstype, _ in mounts:
        if fstype != "cgroup2" or v2_path is None:
            continue
        here = _below(point, root, v2_path)
        if here is None:
            continue
        for cand in (here, here.parent):
            try:
                enabled = (cand / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if "memory" in enabled and os.access(cand, os.W_OK):
                return MemoryController(2, cand), ""
        reasons.append(f"cgroup v2 at {point} does not delegate the memory controller to {here}")
        break

    v1_path = next((p for ctrls, p in own if "memory" in ctrls), None)
    for root, point, fstype, opts in mounts:
        if fstype != "cgroup" or "memory" not in opts or v1_path is None:
            continue
        here = _below(point, root, v1_path)
        if here is None or not (here / "memory.limit_in_bytes").exists():
            continue
        if not os.access(here, os.W_OK):
            reasons.append(f"cgroup v1 memory controller at {here} is not writable (needs root)")
            break
        return MemoryController(1, here), ""
    else:
        reasons.append("no cgroup v1 memory controller mounted")
    return None, "; ".join(reasons)


def own_memory_cgroups(proc_self: Path = Path("/proc/self")) -> List[Tuple[int, Path, Path]]:
    """(version, directory, mount point) of the cgroups this process is in, v2 first, then the
    v1 memory one; the directories from there up to the mount point hold the limits that apply
    to it. [] where /proc cannot be read.

    Args:
        proc_self: where `mountinfo` and `cgroup` are read (a fake tree in tests).
    """
    try:
        mounts = _mounts(proc_self / "mountinfo")
        own = _own_cgroups(proc_self / "cgroup")
    except OSError:
        return []
    out = []
    v2_path = next((p for ctrls, p in own if not ctrls), None)
    v1_path = next((p for ctrls, p in own if "memory" in ctrls), None)
    for version, path in ((2, v2_path), (1, v1_path)):
        for root, point, fstype, opts in mounts:
            if path is None or fstype != ("cgroup2" if version == 2 else "cgroup"):
                continue
            if version == 1 and "memory" not in opts:
                continue
            here = _below(point, root, path)
            if here is not None:
                out.append((version, here, Path(point)))
                break
    return out


class MemoryCgroup:
    """One cgroup with a memory limit. Use as a context manager: on exit, whatever still runs
    in it is killed and the group is removed, also after Ctrl-C.

    Args:
        controller: from find_memory_controller().
        limit: bytes.
    """

    def __init__(self, controller: MemoryController, limit: int):
        if limit <= 0:
            raise CgroupError(f"memory limit must be positive, got {limit}")
        self.controller = controller
        self.limit = limit
        self.path = controller.parent / f"{GROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {self.path}: {e.strerror or e}") from None
        try:
            self._write(controller.limit_file, str(limit))
            if controller.version == 2:
                # no swap either: a limit that spills to swap would time the swap device
                with contextlib.suppress(OSError):
                    self._write("memory.swap.max", "0")
            else:
                with contextlib.suppress(OSError):
                    self._write("memory.swappiness", "0")
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as e:
            raise CgroupError(f"cannot write {value} to {self.path / name}: {e.strerror or e}") from None

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def add(self, pid: int) -> None:
        """Moves a process into the group (call it in the child before it allocates)."""
        self._write("cgroup.procs", str(pid))

    def pids(self) -> List[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group (v1: kernels >= 4.13)."""
        name = "memory.events" if self.controller.version == 2 else "memory.oom_control"
        for line in self._read(name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def hit_limit(self) -> bool:
        """Whether usage reached the limit at least once (reclaim or OOM followed)."""
        if self.controller.version == 2:
            return any(line.startswith("max ") and int(line.split()[1]) > 0
                       for line in self._read("memory.events").splitlines())
        text = self._read("memory.failcnt").strip()
        return bool(text) and int(text) > 0

    def peak_bytes(self) -> Optional[int]:
        """Highest usage seen, page cache included, where the kernel keeps it."""
        text = self._read("memory.peak" if self.controller.version == 2 else "memory.max_usage_in_bytes").strip()
        return int(text) if text.isdigit() else None

    def remove(self, timeout_s: float = 10.0) -> None:
        """Kills what is left in the group, waits for it to empty and removes it. Idempotent."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout_s
        while True:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # busy until the killed tasks are reaped
                if time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {self.path}: {e.strerror or e}") from None
                time.sleep(0.05)

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def leftover_groups(controller: MemoryController) -> Iterator[Path]:
    """Groups of this module under the controller's parent (for tests and cleanup checks)."""
    return (p for p in controller.parent.glob(f"{GROUP_PREFIX}*") if p.is_dir())
