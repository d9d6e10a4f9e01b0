"""What a device's model downloads and base downloads share: the channel, the device lock, and a
download that resumes from its .part file and never grows past the size its signed entry gives.

    dest.part (resume from its size) ──chunks, each at the expected offset──► rename to dest

A stream whose total size differs from the entry, or that would write past it, is cut
there: the .part is deleted and `DownloadRefused` raised. A broken link keeps the .part
(`ModelServiceUnavailable`), so the next attempt asks only for the bytes after it.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import grpc

from edgefed.common.wire.model_manifest import PART_SUFFIX, ModelFile
from edgefed.common.wire.protos import model_service_pb2 as pb


class ModelServiceUnavailable(ConnectionError):
    """The model service could not be reached or broke off; what was downloaded is kept."""


class DownloadRefused(ValueError):
    """The service sent a file other than its signed entry says (another size, or more bytes); nothing is kept."""


class ChunkStream(Protocol):
    """A server stream of Chunks (a grpc call): iterable, and cancellable."""

    def __iter__(self) -> Iterator[pb.Chunk]: ...

    def cancel(self) -> bool: ...


def channel_for(address: str, ca_cert: str | Path | None = None) -> grpc.Channel:
    """Plaintext, or TLS against the fleet's CA certificate when one is given."""
    if ca_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca_cert).read_bytes())
        return grpc.secure_channel(address, creds)
    return grpc.insecure_channel(address)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`: one process at a time installs into a device folder."""
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def download_resumable(open_stream: Callable[[int], ChunkStream], entry: ModelFile, dest: Path, what: str) -> Path:
    """Stream a file into `dest`, resuming from `dest.part`; returns dest when complete.

    `open_stream(offset)` starts the signed call for the bytes from `offset`; `what`
    ("v3 model.onnx") names the file in errors. The file may not grow past `entry.size`."""
    part = dest.with_name(dest.name + PART_SUFFIX)
    if dest.exists():
        return dest
    offset = part.stat().st_size if part.exists() else 0
    if offset > entry.size:  # left by something else: it cannot be the start of this file
        part.unlink()
        offset = 0
    refusal = None
    try:
        with open(part, "ab") as fh:
            stream = open_stream(offset)
            for chunk in stream:
                if chunk.offset != offset:
                    stream.cancel()
                    raise ModelServiceUnavailable(f"{entry.name}: chunk at {chunk.offset}, expected {offset}")
                if chunk.total_size != entry.size:
                    refusal = f"{entry.name}: the service's file has {chunk.total_size} bytes, the manifest {entry.size}"
                elif offset + len(chunk.data) > entry.size:
                    refusal = f"{entry.name}: the service sends more than the manifest's {entry.size} bytes"
                if refusal is not None:
                    stream.cancel()
                    break
                fh.write(chunk.data)
                offset += len(chunk.data)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.OUT_OF_RANGE:  # a stale .part longer than the file
            part.unlink(missing_ok=True)
        raise ModelServiceUnavailable(f"download of {what} stopped at byte {offset}: "
                                      f"{err.code().name} {err.details()}") from None
    if refusal is not None:
        part.unlink(missing_ok=True)
        raise DownloadRefused(refusal)
    if offset < entry.size:
        raise ModelServiceUnavailable(f"download of {what} ended at {offset} of {entry.size} bytes")
    part.rename(dest)
    return dest
