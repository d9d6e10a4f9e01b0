"""Extraction of untrusted files in a child process that the agent can afford to lose.

The limits of edge/media/limits.py are checked by our code, between frames. A
file can still make FFmpeg allocate or spin inside one call (a decoder's bug,
a header that says nothing), and in the agent's own process that would take
the agent down. `ExtractionSandbox` runs each file's extraction in a
long-lived child process, started with `spawn` (the agent has threads, whose
held locks a fork would copy), with:

- RLIMIT_AS: the child's whole address space is capped at `memory_mb`; an
  allocation past it fails in the child (MemoryError, or ENOMEM in FFmpeg);
- RLIMIT_CPU: before each call the soft limit is moved to the CPU time used so
  far plus that call's share, so the kernel ends a runaway child (SIGXCPU)
  even when no parent is left to do it;
- a wall clock in the parent: a call not answered within its budget (plus
  GRACE_S, for the child to report its own timeout first) kills the child.

A child that died, was killed or failed in an unexpected way is replaced for
the next file; one that refused a file cleanly (MediaError) is kept. The
child's answers are read as bytes and never unpickled, so a child taken over
by a hostile file cannot run code in the agent.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from edgefed.common.processes import die_with_parent
from edgefed.edge.media.errors import MediaError

GRACE_S = 10.0  # past a call's budget before the parent kills the child
START_TIMEOUT_S = 300.0  # the child imports torch, PyAV and OpenCV before its first call
RECYCLE_AFTER_CALLS = 200  # a fresh child now and then: no fragmentation builds up against RLIMIT_AS
MAX_REPLY_BYTES = 256 << 20
_READY, _OK, _REFUSED, _FAILED = b"r", b"o", b"e", b"f"  # first byte of each message from the child


class SandboxUnavailable(RuntimeError):
    """No child process could be started: not the file's fault, so not a MediaError (try the file later)."""


class ExtractionSandbox:
    """Calls `fn(*args) -> bytes` in a memory- and time-limited child process, one call at a time."""

    def __init__(self, memory_mb: int, prepare: Callable[[], None] | None = None, grace_s: float = GRACE_S) -> None:
        """`memory_mb`: the child's address-space limit (imports included); `prepare`: run once in each new
        child before its first call (a module-level function: it is pickled by name); `grace_s`: how long
        past a call's budget the parent waits for the child's own answer before killing it."""
        self.memory_mb = memory_mb
        self.prepare = prepare
        self.grace_s = grace_s
        self.calls = 0  # answered by the current child
        self.starts = 0  # children started so far
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def call(self, path: str, wall_s: float, fn: Callable[..., bytes], *args: object) -> bytes:
        """fn(*args) run in the child within `wall_s` seconds; MediaError(path, reason) when it refused the
        file, ran out of memory, died, or did not answer in time; SandboxUnavailable when no child starts."""
        with self._lock:
            conn = self._running()
            try:
                conn.send((fn, args, math.ceil(wall_s * (os.cpu_count() or 1) + self.grace_s)))
            except OSError:  # the child died since the last call
                reason = self._exit_reason()
                self.stop()
                raise MediaError(path, reason) from None
            if not conn.poll(wall_s + self.grace_s):
                self.stop()
                raise MediaError(path, f"extraction did not finish within max-media-seconds ({wall_s:g} s); "
                                       "its process was killed")
            try:
                reply = conn.recv_bytes(MAX_REPLY_BYTES)
            except (EOFError, OSError):  # the child died mid-call, or sent more than a reply can be
                reason = self._exit_reason()
                self.stop()
                raise MediaError(path, reason) from None
            self.calls += 1
            kind, body = reply[:1], reply[1:]
            if kind == _OK:
                if self.calls >= RECYCLE_AFTER_CALLS:
                    self.stop()
                return body
            if kind != _REFUSED:  # an unexpected failure: the next file gets a fresh child
                self.stop()
            raise MediaError(path, body.decode("utf-8", "replace"))

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def stop(self) -> None:
        """Kill the child (if any); the next call starts a new one."""
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._process.close()
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def _running(self) -> Connection:
        if self._conn is not None and self.running:
            return self._conn
        self.stop()  # a child that died between calls
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(theirs, self.memory_mb, self.prepare),
                                    name="edgefed-extract", daemon=True)
        try:
            self._process.start()
        except OSError as err:  # no memory or process slots left to fork
            self._process = None
            ours.close()
            raise SandboxUnavailable(f"the extraction process could not be started ({err})") from None
        finally:
            theirs.close()
        self._conn, self.calls = ours, 0
        self.starts += 1
        try:
            ready = ours.poll(START_TIMEOUT_S) and ours.recv_bytes(16) == _READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            reason = self._exit_reason() if not self._process.is_alive() else "it did not get ready in time"
            self.stop()
            raise SandboxUnavailable(f"the extraction process did not start ({reason}; memory limit "
                                     f"{self.memory_mb} MB)")
        return ours

    def _exit_reason(self) -> str:
        assert self._process is not None
        self._process.join(self.grace_s)
        code = self._process.exitcode
        if code is None:
            return "the extraction process stopped answering"
        if code >= 0:
            return f"the extraction process exited with code {code}"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGXCPU":
            return "the extraction process used up its CPU time limit and was stopped"
        if name == "SIGKILL":
            return "the extraction process was killed (out of memory?)"
        return f"the extraction process died ({name})"


def _serve(conn: Connection, memory_mb: int, prepare: Callable[[], None] | None) -> None:
    """The child: limits first, then one answer per call until the parent goes away."""
    die_with_parent()
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if prepare is not None:
        prepare()
    conn.send_bytes(_READY)
    while True:
        try:
            fn, args, cpu_s = conn.recv()
        except EOFError:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = math.ceil(usage.ru_utime + usage.ru_stime + cpu_s)
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        conn.send_bytes(_answer(fn, args, memory_mb))


def _answer(fn: Callable[..., bytes], args: tuple, memory_mb: int) -> bytes:
    try:
        return _OK + fn(*args)
    except MediaError as err:
        return _REFUSED + err.reason.encode()
    except MemoryError:
        return _FAILED + f"ran out of memory (extraction is limited to {memory_mb} MB)".encode()
    except Exception as err:  # noqa: BLE001 - whatever it was, the parent records it against the file
        traceback.print_exc()
        return _FAILED + f"extraction failed ({type(err).__name__}: {err})".encode()
