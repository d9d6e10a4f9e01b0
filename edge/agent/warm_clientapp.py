"""Warm ClientApps: a device starts each Flower ClientApp from a process that has its libraries loaded.

Flower's SuperNode runs every instruction (train, evaluate) in a fresh
`flwr-clientapp` process. On a 2-core device that process spent 5-10 s of CPU
importing torch, transformers and peft before it read its message, every task
of every round. The agent instead keeps one idle *warm* process that has
imported those libraries (never used them: no thread pool of torch or OpenMP
exists in it yet), and the SuperNode's `flwr-clientapp` resolves to a small
launcher that asks it to fork: the child runs exactly Flower's `flwr-clientapp`
entry point with the launcher's arguments, environment, working directory and
standard streams, and the launcher exits with the child's status (a SIGTERM to
the launcher is passed on). This is the zygote pattern (Android's app start,
PyTorch's forked DataLoader workers rely on the same property of these
libraries).

Only third-party libraries are preloaded: the app's own modules come from the
FAB the SuperLink sent, and each child imports them from there as before.

If the warm process is not running, the launcher runs the real
`flwr-clientapp` itself (a cold start), so training never depends on it.
The socket lives in the agent's state directory (mode 0700) and the warm
process serves only its own user (SO_PEERCRED).

This module imports only the standard library at the top: the launcher runs
once per task and must start fast.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

# What a ClientApp process imports before it reads its message, heaviest first. Not flwr: it imports gRPC,
# whose poller threads must not be forked; each child imports it itself (about a second).
PRELOAD = ("torch", "transformers", "peft", "onnxruntime", "cv2", "av", "numpy")
LAUNCHER_NAME = "flwr-clientapp"  # the command Flower's SuperExec runs for a ClientApp task
MAX_REQUEST_BYTES = 1 << 20
RESTART_PAUSE_S, MAX_PAUSE_S = 2.0, 300.0  # a warm process that keeps dying is restarted ever less often
STABLE_S = 60.0  # one that ran this long before it exited is restarted after the shortest pause
_LEN = struct.Struct("!I")


class WarmStartError(RuntimeError):
    """The warm process could not be reached or did not start the ClientApp."""


# --- the launcher (runs as `flwr-clientapp` for the SuperNode) --------------------------------

def write_launcher(bin_dir: Path, socket_path: Path, cold_command: str) -> Path:
    """The `flwr-clientapp` that a SuperNode started with `bin_dir` first on its PATH runs."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / LAUNCHER_NAME
    path.write_text(f"#!{sys.executable}\n"
                    "import sys\n"
                    "from edgefed.edge.agent.warm_clientapp import launch\n"
                    f"sys.exit(launch({str(socket_path)!r}, {cold_command!r}, sys.argv[1:]))\n")
    path.chmod(0o700)
    return path


def launch(socket_path: str, cold_command: str, args: list[str]) -> int:
    """Start the ClientApp in a fork of the warm process and wait for it; cold if there is none."""
    try:
        conn = _request_fork(socket_path, args)
    except WarmStartError as err:
        print(f"edgefed: no warm ClientApp process ({err}); starting a cold one", file=sys.stderr, flush=True)
        os.execv(cold_command, [cold_command, *args])
    with conn:
        pid = int(_read_message(conn)["pid"])
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: _forward(pid, signum))
        try:
            reply = _read_message(conn)
        except WarmStartError:
            # The warm process died under its child: wait for the child itself.
            while Path(f"/proc/{pid}").exists():
                time.sleep(0.2)
            return 1
    status = int(reply["status"])
    return 128 - status if status < 0 else status


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _request_fork(socket_path: str, args: list[str]) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _at_socket(conn.connect, Path(socket_path))
        body = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [_LEN.pack(len(body)) + body], [0, 1, 2])
    except OSError as err:
        conn.close()
        raise WarmStartError(f"{socket_path}: {err.strerror or err}") from None
    return conn


def _at_socket(call, path: Path) -> None:  # call: socket.bind or socket.connect
    """`call` on the socket file `path` however deep its folder: a Unix socket's address holds at most 107
    bytes, so the folder is reached through a descriptor (/proc/self/fd/N/name)."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        call(f"/proc/self/fd/{folder}/{path.name}")
    finally:
        os.close(folder)


def _read_message(conn: socket.socket) -> dict:
    head = _read_exactly(conn, _LEN.size)
    return json.loads(_read_exactly(conn, _LEN.unpack(head)[0]))


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise WarmStartError("the warm process closed the connection")
        data += chunk
    return data


def _send_message(conn: socket.socket, message: dict) -> None:
    body = json.dumps(message).encode()
    conn.sendall(_LEN.pack(len(body)) + body)


# --- the agent's side ------------------------------------------------------------------------

class WarmStarter:
    """Keeps a device's warm process running and points its SuperNode's `flwr-clientapp` at it."""

    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.socket_path = state_dir / "run" / "warm-clientapp.sock"
        self.bin_dir = state_dir / "bin"
        self.log_path = state_dir / "warm-clientapp.log"
        self.env = env  # the SuperNode's: thread counts are read when the libraries load
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._started_at: float | None = None
        self._next_start = 0.0
        self._pause = RESTART_PAUSE_S

    def supernode_env(self) -> dict[str, str]:
        """The SuperNode's environment: the launcher first on its PATH."""
        cold = Path(sys.executable).parent / LAUNCHER_NAME
        write_launcher(self.bin_dir, self.socket_path, str(cold))
        return {**self.env, "PATH": f"{self.bin_dir}{os.pathsep}{self.env.get('PATH', '')}"}

    def ensure_running(self) -> None:
        """Start the warm process, or again if it exited (meanwhile a launcher starts cold). One that keeps
        dying is started again after a growing pause (2 s doubling to 5 min), not in a loop."""
        import subprocess

        from edgefed.common.processes import die_with_parent

        if self.process is not None and self.process.poll() is None:
            return
        now = time.monotonic()
        if self.process is not None and self._started_at is not None:
            self._pause = RESTART_PAUSE_S if now - self._started_at > STABLE_S else min(self._pause * 2, MAX_PAUSE_S)
            self._next_start = now + self._pause
            print(f"edgefed: the warm ClientApp process exited with {self.process.returncode}; ClientApps start "
                  f"cold, a new one in {self._pause:.0f} s (see {self.log_path})", file=sys.stderr, flush=True)
            self.process, self._started_at = None, None
        if now < self._next_start:
            return
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", __name__, str(self.socket_path)], env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            preexec_fn=die_with_parent)  # noqa: PLW1509 - one prctl call
        self._started_at = now
        self.starts += 1

    def stop(self) -> None:
        from edgefed.common.processes import stop_process

        stop_process(self.process, 10.0)


# --- the warm process ---------------------------------------------------------------------

class WarmProcess:
    """Serves fork requests on a Unix socket; one forked child per ClientApp task."""

    def __init__(self, socket_path: Path, preload: tuple[str, ...] = PRELOAD) -> None:
        self.socket_path = socket_path
        self.preload = preload
        self._children: dict[int, socket.socket] = {}  # pid -> the launcher waiting for it
        self._open: set[socket.socket] = set()
        self._selector = selectors.DefaultSelector()

    def serve(self) -> None:
        import importlib

        for name in self.preload:
            importlib.import_module(name)
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            _at_socket(listener.bind, self.socket_path)
        finally:
            os.umask(old_umask)
        listener.listen(16)
        self._open.add(listener)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"edgefed: warm ClientApp process ready on {self.socket_path} (pid {os.getpid()})", flush=True)
        self._selector.register(listener, selectors.EVENT_READ)
        try:
            while True:
                for _key, _mask in self._selector.select(timeout=0.2):
                    self._accept(listener)
                self._reap()
        finally:
            self.socket_path.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != os.getuid():
                raise WarmStartError(f"a process of uid {uid} asked for a ClientApp")
            conn.settimeout(10.0)  # a launcher sends its request at once
            data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
            request = self._read_request(conn, data, fds)
        except (OSError, ValueError, WarmStartError) as err:
            print(f"edgefed: warm ClientApp request refused: {err}", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            self._run_child(request, fds)
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
        self._open.add(conn)
        self._children[pid] = conn
        try:
            _send_message(conn, {"pid": pid})
        except OSError:
            pass  # the launcher is gone; the child's status is dropped when it is reaped

    @staticmethod
    def _read_request(conn: socket.socket, data: bytes, fds: list[int]) -> dict:
        if len(fds) != 3:
            raise WarmStartError(f"expected the launcher's 3 standard streams, got {len(fds)}")
        if len(data) < _LEN.size:
            raise WarmStartError("truncated request")
        (length,) = _LEN.unpack(data[:_LEN.size])
        if length > MAX_REQUEST_BYTES:
            raise WarmStartError(f"a request of {length} bytes (at most {MAX_REQUEST_BYTES})")
        body = data[_LEN.size:]
        if len(body) > length:
            raise WarmStartError("bytes after the request")
        body += _read_exactly(conn, length - len(body))
        request = json.loads(body)
        if not (isinstance(request, dict) and isinstance(request.get("argv"), list)
                and all(isinstance(a, str) for a in request["argv"]) and isinstance(request.get("cwd"), str)
                and isinstance(request.get("env"), dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())):
            raise WarmStartError("malformed request")
        return request

    def _run_child(self, request: dict, fds: list[int]) -> None:
        code = 1
        try:
            self._selector.close()
            for sock in self._open:
                sock.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [LAUNCHER_NAME, *request["argv"]]
            from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

            flwr_clientapp()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 - the child reports and exits, it never returns to serve()
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self._children.pop(pid, None)
            if conn is None:
                continue
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            try:
                _send_message(conn, {"status": code})
            except OSError:
                pass  # the launcher is gone (killed with its SuperExec)
            self._open.discard(conn)
            conn.close()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgefed.edge.agent.warm_clientapp SOCKET")
    WarmProcess(Path(sys.argv[1])).serve()


if __name__ == "__main__":
    main()
