"""Atomic file writes: a reader (or a restarted process) sees the old file or the whole new one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temp file in the same folder, fsync, then rename over `path`.

    The file ends up with mode 0600 (mkstemp's): several of these files name secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def write_json_atomically(path: Path, payload: object) -> None:
    """Indented JSON with a final newline: the status and registry files people and tools read."""
    write_bytes_atomically(path, (json.dumps(payload, indent=1) + "\n").encode())
