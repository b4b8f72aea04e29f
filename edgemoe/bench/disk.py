"""The model file's storage: its device's read-ahead, and its pages in the page cache.

Read-ahead decides how much stock llama.cpp's page faults read: this VM's 8 MiB makes a
memory-limited mmap thrash at seconds per token where the Linux default of 128 KiB (what a
Jetson runs) does not, so a benchmark sets it for the run and puts the old value back.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from edgemoe.errors import EdgemoeIOError
from edgemoe.interrupt import held


def read_ahead_knob(path) -> Optional[Path]:
    """`/sys/block/<dev>/queue/read_ahead_kb` of the disk holding `path`, or None (tmpfs,
    overlay, network file systems)."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysfs.exists():
        return None
    real = sysfs.resolve()
    # a partition has no queue of its own: its disk's applies
    for queue in (real / "queue", real.parent / "queue"):
        if (queue / "read_ahead_kb").exists():
            return queue / "read_ahead_kb"
    return None


def read_ahead_kb(path) -> Optional[int]:
    """The read-ahead in effect for `path`'s disk, or None where there is no such knob."""
    knob = read_ahead_knob(path)
    if knob is None:
        return None
    try:
        return int(knob.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def read_ahead(path, kb: Optional[int]) -> Iterator[Optional[int]]:
    """Sets the read-ahead of `path`'s disk to `kb` inside the block and restores it after,
    also on errors and Ctrl-C. Yields the old value (None when `kb` is None: nothing changes).

    Raises:
        EdgemoeIOError: no knob for this file, or it cannot be written (needs root).
    """
    if kb is None:
        yield None
        return
    knob = read_ahead_knob(path)
    if knob is None:
        raise EdgemoeIOError(f"cannot set read-ahead: no block device found for {path}")
    changed = False
    try:
        # Ctrl-C and SIGTERM wait while the value changes hands: once set, it is restored
        with held():
            try:
                old = int(knob.read_text())
                knob.write_text(str(kb))
            except OSError as e:
                raise EdgemoeIOError(f"cannot set read-ahead through {knob}: {e.strerror or e}") from None
            changed = True
        yield old
    finally:
        if changed:
            with held():
                knob.write_text(str(old))


def drop_file_pages(path) -> None:
    """Drops the file's clean pages from the page cache (pages another process maps stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages cannot be dropped; a freshly written model has them
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_file(path, chunk: int = 64 << 20) -> None:
    """Reads the whole file once, so that its pages are in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass
