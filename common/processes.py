"""Child processes that must not outlive the service or agent that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1
try:  # loaded here, in the parent: the forked child must not dlopen (other threads may hold its locks)
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the parent's own cleanup is all there is
    _PRCTL = None


def die_with_parent() -> None:
    """`preexec_fn` for a child: it gets SIGTERM when its parent dies, even by SIGKILL (Linux).

    A SuperLink or SuperNode left running by a killed parent would hold its port
    (and, for a SuperNode, its node key's session), and the restarted parent
    would find it in the way."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 20.0, group: bool = False) -> None:
    """SIGTERM (to its whole process group with `group`), then SIGKILL if it has not exited in time."""
    if proc is None or proc.poll() is not None:
        return
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
