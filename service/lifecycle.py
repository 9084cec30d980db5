"""Process lifecycle: child processes that never outlive their parent, and stop signals.

Long-running commands stop cleanly on SIGTERM, SIGINT and SIGHUP (`on_stop_signals`), except
the two that serve models, ``rbstream consume`` and ``rbstream serve``: for them SIGHUP
(`RELOAD_SIGNAL`) means "check the model files for a new version now" (`service.score.reload`),
and they stop on SIGTERM and SIGINT only.
A child process started with `die_with_parent` as its ``preexec_fn`` also stops when
its parent dies without cleaning up (SIGKILL, a crash): on Linux the kernel sends it
SIGTERM through ``prctl(PR_SET_PDEATHSIG)``. Elsewhere that guarantee is not available
and only the parent's own clean-up stops the child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from typing import Callable, Iterable

log = logging.getLogger(__name__)

#: The signals a long-running command treats as "stop now, cleanly".
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None)

#: The signal that makes ``rbstream consume`` and ``rbstream serve`` reload their models instead of stopping.
RELOAD_SIGNAL: signal.Signals | None = getattr(signal, "SIGHUP", None)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _load_prctl():
    """libc's ``prctl``, resolved in the parent: the child must not load libraries between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()

#: Whether `die_with_parent` can make the kernel stop a child whose parent dies.
PARENT_DEATH_SIGNAL_SUPPORTED = _prctl is not None


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for `subprocess.Popen`: the child gets ``signum`` when its parent dies.

    The kernel ties the signal to the *thread* that forks the child: start such children
    from a thread that lives as long as the child should (the main thread, typically).
    Besides the preexec function, start such children with ``start_new_session=True``,
    so that a Ctrl-C at the terminal reaches only the parent, which stops them in order.

    Parameters
    ----------
    signum : int
        The signal the child receives when the parent dies (default SIGTERM).

    Returns
    -------
    callable
        The function to pass as ``preexec_fn``; a no-op where prctl is not available.
    """
    parent = os.getpid()
    prctl = _prctl

    def preexec() -> None:
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), int(signum))

    return preexec


def on_stop_signals(handler: Callable[[signal.Signals], None],
                    signals: Iterable[signal.Signals] = STOP_SIGNALS,
                    reload: Callable[[], None] | None = None) -> dict:
    """Call ``handler(signal)`` on each stop signal instead of dying; returns the previous handlers.

    With ``reload``, `RELOAD_SIGNAL` (SIGHUP) calls ``reload()`` instead and stops nothing.
    Must be called from the main thread (Python delivers signals there only).
    """
    def on_signal(signum, _frame):
        if reload is not None and signum == RELOAD_SIGNAL:
            log.info("%s received: checking the model files for a new version", signal.Signals(signum).name)
            reload()
            return
        handler(signal.Signals(signum))

    handled = set(signals) | ({RELOAD_SIGNAL} if reload is not None and RELOAD_SIGNAL is not None else set())
    return {s: signal.signal(s, on_signal) for s in handled}


def restore_signals(previous: dict) -> None:
    """Put back the handlers `on_stop_signals` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def terminate(process: "subprocess.Popen", timeout: float) -> None:
    """SIGTERM ``process`` (its clean stop), wait up to ``timeout`` seconds, then SIGKILL it;
    returns once it has exited. Nothing is done for a process that already exited."""
    import subprocess

    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
