"""Ctrl-C and SIGTERM in the commands that run long (`run`, `bench`, `convert`).

Both end a command through KeyboardInterrupt (SIGTERM: its subclass Terminated), so the
command's `finally` blocks clean up (cgroups removed, read-ahead restored, temporary files
deleted) before the one-line `edgemoe: aborted` / `edgemoe: terminated` and exit status
128 + the signal's number. What stood between a signal and that exit:

- Python acts on a signal only between bytecodes of the main thread. Where those are a
  function that native code calls through ctypes (llama.cpp's log callback while a model
  loads), ctypes prints the KeyboardInterrupt as "Exception ignored" and drops it: the
  Ctrl-C is lost and the command runs on. `interruptible()`'s handler sees such a frame and
  sends the signal to the main thread again a moment later, once the callback has returned.
- The kernel hands a process-directed signal to any thread that does not block it, not
  always the main one; a main thread asleep in a blocking waitpid or read then never sees
  it. `wait_child()` waits for a child in short steps instead.
- An interrupt raised inside subprocess.Popen, after the fork: the child runs on and the
  parent has no Popen object to kill it with. `held()` defers signals until Popen returns.
- A second Ctrl-C while the first one's cleanup runs: `held()` around the cleanup.
- Native code that Python cannot interrupt (llama.cpp's quantizer, one call of minutes)
  runs in a child process that an interrupt kills (edgemoe.convert.quantize).

A signal that a command inherits as ignored (SIG_IGN, e.g. SIGINT in a background job of a
shell script) stays ignored, as in any other program.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import threading
from typing import Callable, Iterator, List

import click

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESEND_S = 0.05  # how soon a signal that came inside a ctypes callback is sent again

# functions that native code calls through ctypes, by (file name ending, function name): an
# exception raised in one of them never reaches the Python code that made the native call
_KNOWN_CALLBACKS = ((os.path.join("edgemoe", "log.py"), "_on_log"),
                    (os.path.join("llama_cpp", "_logger.py"), "llama_log_callback"))
_held = 0  # depth of held() blocks in the main thread
_pending: List[int] = []  # signals that came within them


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is."""

    signum = signal.SIGTERM


class Aborted(click.exceptions.Abort):
    """A command ended by a signal: `edgemoe.cli.main` prints one line and exits 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__()
        self.signum = int(signum)


def signum_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (SIGINT unless it is a Terminated)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def aborted(exc: BaseException) -> Aborted:
    """The Abort a command raises for a KeyboardInterrupt (`raise aborted(e) from None`)."""
    return Aborted(signum_of(exc))


def _in_callback(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if any(code.co_name == name and code.co_filename.endswith(tail) for tail, name in _KNOWN_CALLBACKS):
            return True
        frame = frame.f_back
    return False


def _resend(thread_id: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pthread_kill(thread_id, signum)


def _handler(signum, frame) -> None:
    if _held:
        _pending.append(signum)  # acts as held() ends
        return
    if _in_callback(frame):
        timer = threading.Timer(RESEND_S, _resend, (threading.main_thread().ident, signum))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt and SIGTERM Terminated in the main thread, also
    where the main thread runs a ctypes callback. The previous handlers come back after. A
    no-op outside the main thread, and for a signal whose disposition is SIG_IGN."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum in SIGNALS:
            old = signal.getsignal(signum)
            if old is signal.SIG_IGN or old is None:  # ignored, or a handler set outside Python
                continue
            previous[signum] = old
            signal.signal(signum, _handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interruptible_command(func: Callable) -> Callable:
    """For a click command's function (the decorator nearest to it): the function runs under
    interruptible(), and an interrupt that ends it, its `finally` blocks done, becomes
    Aborted: one line and 128 + the signal's number from edgemoe.cli.main."""

    @functools.wraps(func)
    def command(*args, **kwargs):
        try:
            with interruptible():
                return func(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise aborted(e) from None

    return command


class held:
    """Within, SIGINT and SIGTERM wait; one that came meanwhile acts as the block ends, as it
    would have (KeyboardInterrupt, Terminated, or the default action where no Python handler
    was set). Around starting a child, whose pid is unknown until Popen returns, and around
    cleanup that must not be cut short. Nests; a no-op outside the main thread, where Python
    runs no signal handler anyway."""

    def __enter__(self) -> "held":
        global _held
        self._main = threading.current_thread() is threading.main_thread()
        if not self._main:
            return self
        _held += 1  # first: from here a signal waits
        self._installed = {}
        if _held == 1:
            for signum in SIGNALS:
                old = signal.getsignal(signum)
                if old is not _handler and old is not signal.SIG_IGN and old is not None:
                    self._installed[signum] = old
                    signal.signal(signum, _handler)
        return self

    def __exit__(self, *exc) -> None:
        global _held
        if not self._main:
            return
        for signum, old in self._installed.items():
            signal.signal(signum, old)
        _held -= 1
        if _held == 0 and _pending:
            pending = list(dict.fromkeys(_pending))
            _pending.clear()
            for signum in pending:  # the first that raises ends the rest
                signal.raise_signal(signum)


def wait_child(proc: subprocess.Popen, step: float = 0.1) -> int:
    """proc.wait(), in steps. The kernel may hand a signal to any thread of this process that
    does not block it (numpy's and llama.cpp's threads too); Python then acts on it only when
    the main thread runs Python code again, never while that thread sleeps in a waitpid or a
    read that has no end. Between steps it does, within `step` seconds."""
    while True:
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            continue


def exit_status(signum: int) -> int:
    """The shell's status of a process ended by `signum`."""
    return 128 + int(signum)


def message(signum: int) -> str:
    return "edgemoe: terminated" if signum == signal.SIGTERM else "edgemoe: aborted"
