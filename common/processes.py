"""Child processes that must not outlive the service or agent that started them."""

from __future__ import annotations

import ctypes
import signal

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
