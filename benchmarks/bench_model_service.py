"""Benchmark: the model service holding 10,000 idle device watchers while devices download.

    python benchmarks/bench_model_service.py --json results/model_service.json

1. --watchers devices are enrolled (the cloud's registry.json) and a signed
   model of --model-mb MB is published (the default model's INT8 export is
   ~4.4 MB; the service serves bytes, so random bytes of that size stand in).
2. The service runs in a process of its own (this script with `--serve`), so
   its memory and threads are measured alone, on 127.0.0.1.
3. This process opens one authenticated WatchModels stream per device over
   --channels connections (grpc.aio: many streams per HTTP/2 connection) and
   waits until every stream has had its first notice: all are held at once.
4. With them connected and idle: the service's RSS (`watch_rss_mb`) and
   thread count (`threads`); then --downloads complete downloads, --concurrency
   at a time, each a device's GetManifest + Download of the model with its
   sha256 checked: p50/p99 latency and throughput (`download_mb_s`, MB/s of
   model bytes received). The same downloads without any watcher are printed
   beside them (the other side of the comparison), not written.
5. Every watcher must still be open after the downloads (the run fails
   otherwise); then a version 2 is published from this process (another
   process, as the ServerApp publishes under `edgefed cloud serve`) and the
   time until every watcher has its notice is printed.

Everything is bounded by --deadline-s and the service process ends with this one.
Writes {"watchers", "watch_rss_mb", "threads", "download_p50_ms", "download_p99_ms", "download_mb_s"}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.common.atomic import write_json_atomically  # noqa: E402
from edgefed.common.keys import public_hex  # noqa: E402
from edgefed.common.processes import die_with_parent, stop_process  # noqa: E402
from edgefed.common.wire.model_manifest import (  # noqa: E402
    MANIFEST_FILE,
    ModelManifest,
    describe_file,
    sign_manifest,
    verify_manifest,
)
from edgefed.common.wire.protos import model_service_pb2 as pb  # noqa: E402
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc  # noqa: E402
from edgefed.common.wire.request_auth import DeviceSigner, model_service_method  # noqa: E402

MODEL_FILE = "model.onnx"
WATCH = model_service_method("WatchModels")
GET_MANIFEST = model_service_method("GetManifest")
DOWNLOAD = model_service_method("Download")
CLIENT_OPTIONS = [("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
                  ("grpc.max_receive_message_length", 8 << 20)]


# --- the service's process ----------------------------------------------------------------
def serve(root: Path, port_file: Path) -> None:
    """Run the model service on root/models for root/registry.json until SIGTERM."""
    from edgefed.cloud.publishing.model_service import ModelServer
    from edgefed.cloud.publishing.registry import ModelRegistry
    from edgefed.common.keys import DeviceRegistry

    server = ModelServer(ModelRegistry(root / "models"), "127.0.0.1:0", devices=DeviceRegistry(root / "registry.json"))
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    port_file.write_text(f"{server.port}\n")
    stop.wait()
    server.stop(grace=0)


def start_service(root: Path, deadline_s: float) -> tuple[subprocess.Popen, str]:
    port_file = root / "port"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--json", os.devnull],
                            preexec_fn=die_with_parent)
    give_up = time.monotonic() + deadline_s
    while not port_file.exists() or not port_file.read_text().endswith("\n"):
        if proc.poll() is not None or time.monotonic() > give_up:
            stop_process(proc)
            raise SystemExit("the model service did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


# --- the fleet ------------------------------------------------------------------------------
def prepare(root: Path, devices: int) -> list[DeviceSigner]:
    """Enrolled device keys."""
    signers = [DeviceSigner(f"device-{i}", Ed25519PrivateKey.generate()) for i in range(devices)]
    write_json_atomically(root / "registry.json", {s.device_id: public_hex(s.key.public_key()) for s in signers})
    return signers


def publish(root: Path, version: int, model_mb: float, cloud_key: Ed25519PrivateKey) -> None:
    """A signed model of `model_mb` MB as `version`, moved into place in one rename (as the registry does)."""
    staged = root / f".staged-v{version}"
    staged.mkdir(parents=True)
    (staged / MODEL_FILE).write_bytes(os.urandom(int(model_mb * 1e6)))
    manifest = ModelManifest(version, "bench", [describe_file(staged / MODEL_FILE)], [], [], {}, ["a"], "int8", {}, "bench")
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(manifest, cloud_key))
    (root / "models").mkdir(exist_ok=True)
    staged.rename(root / "models" / f"v{version:06d}")


async def open_watchers(address: str, signers: list[DeviceSigner], channels: int, timeout_s: float):
    """One idle, authenticated watch per device, each past its first notice; (channels, calls)."""
    opened = [grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) for _ in range(channels)]
    stubs = [pb_grpc.ModelServiceStub(c) for c in opened]
    calls = []
    for i, signer in enumerate(signers):
        request = pb.WatchRequest(device_id=signer.device_id, have_version=0)
        calls.append(stubs[i % channels].WatchModels(request, metadata=signer.metadata(WATCH, request)))
    notices = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), timeout_s)
    if {n.version for n in notices} != {1}:
        raise SystemExit(f"watchers got {sorted({n.version for n in notices})}, expected the first notice of v1")
    return opened, calls


async def download_once(stub: pb_grpc.ModelServiceStub, signer: DeviceSigner, cloud_key: Ed25519PrivateKey,
                        timeout_s: float) -> tuple[float, int]:
    """(seconds, bytes) of one device's complete download: manifest, file, hash check."""
    start = time.perf_counter()
    request = pb.ManifestRequest(version=0)
    reply = await stub.GetManifest(request, timeout=timeout_s, metadata=signer.metadata(GET_MANIFEST, request))
    entry = verify_manifest(reply.signed_manifest, cloud_key.public_key()).model_file
    download = pb.DownloadRequest(version=reply.version, file=entry.name)
    digest, received = hashlib.sha256(), 0
    async for chunk in stub.Download(download, timeout=timeout_s, metadata=signer.metadata(DOWNLOAD, download)):
        digest.update(chunk.data)
        received += len(chunk.data)
    if received != entry.size or digest.hexdigest() != entry.sha256:
        raise SystemExit(f"download of {entry.name} by {signer.device_id}: {received} bytes, hash mismatch")
    return time.perf_counter() - start, received


async def downloads(address: str, signers: list[DeviceSigner], cloud_key: Ed25519PrivateKey, count: int,
                    concurrency: int, timeout_s: float) -> dict[str, float]:
    """`count` downloads by `concurrency` devices at once, each device on a connection of its own."""
    channels = [grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) for _ in range(concurrency)]
    latencies, total = [], 0
    queue = list(range(count))

    async def device(k: int) -> None:
        nonlocal total
        stub = pb_grpc.ModelServiceStub(channels[k])
        while queue:
            i = queue.pop()
            seconds, received = await download_once(stub, signers[i % len(signers)], cloud_key, timeout_s)
            latencies.append(seconds)
            total += received

    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(device(k) for k in range(concurrency))), timeout_s * count)
    finally:
        for c in channels:
            await c.close()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))] * 1000,
            "mb_s": total / 1e6 / wall}


async def measure(args: argparse.Namespace, root: Path) -> dict:
    t0 = time.perf_counter()
    signers, cloud_key = prepare(root, args.watchers), Ed25519PrivateKey.generate()
    publish(root, 1, args.model_mb, cloud_key)
    print(f"{args.watchers} devices enrolled, {args.model_mb} MB model published ({time.perf_counter() - t0:.1f} s)")
    proc, address = start_service(root, 60)
    try:
        service = psutil.Process(proc.pid)
        await downloads(address, signers, cloud_key, args.concurrency, args.concurrency, args.deadline_s / 4)  # warm up
        idle = await downloads(address, signers, cloud_key, args.downloads, args.concurrency, args.deadline_s / 4)
        print(f"no watchers: rss {service.memory_info().rss / 2**20:.0f} MB, {service.num_threads()} threads, "
              f"downloads p50 {idle['p50_ms']:.0f} ms, p99 {idle['p99_ms']:.0f} ms, {idle['mb_s']:.0f} MB/s")
        t0 = time.perf_counter()
        channels, calls = await open_watchers(address, signers, args.channels, args.deadline_s / 2)
        print(f"{len(calls)} watchers connected over {args.channels} connections in {time.perf_counter() - t0:.1f} s")
        rss_mb, threads = service.memory_info().rss / 2**20, service.num_threads()
        loaded = await downloads(address, signers, cloud_key, args.downloads, args.concurrency, args.deadline_s / 4)
        print(f"{len(calls)} watchers: rss {rss_mb:.0f} MB, {threads} threads, downloads p50 {loaded['p50_ms']:.0f} ms, "
              f"p99 {loaded['p99_ms']:.0f} ms, {loaded['mb_s']:.0f} MB/s")
        ended = sum(c.done() for c in calls)
        if ended:
            raise SystemExit(f"{ended} watchers ended while the downloads ran")
        t0 = time.perf_counter()
        publish(root, 2, 0.01, cloud_key)
        pushed = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), args.deadline_s / 4)
        if {n.version for n in pushed} != {2}:
            raise SystemExit(f"the push of v2 reached the watchers as {sorted({n.version for n in pushed})}")
        print(f"v2 published by another process: all {len(calls)} watchers notified in {time.perf_counter() - t0:.1f} s")
        for c in calls:
            c.cancel()
        for c in channels:
            await c.close()
    finally:
        stop_process(proc)
    return {"watchers": len(calls), "watch_rss_mb": round(rss_mb, 1), "threads": threads,
            "download_p50_ms": round(loaded["p50_ms"], 1), "download_p99_ms": round(loaded["p99_ms"], 1),
            "download_mb_s": round(loaded["mb_s"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--watchers", type=int, default=10_000, help="idle devices watching at once")
    parser.add_argument("--channels", type=int, default=20, help="connections the watchers share")
    parser.add_argument("--downloads", type=int, default=200, help="complete downloads measured (each side)")
    parser.add_argument("--concurrency", type=int, default=4, help="devices downloading at once")
    parser.add_argument("--model-mb", type=float, default=4.4, help="size of the published model")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="bound on the whole measurement")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the service's own process
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.serve / "port")
        return
    with tempfile.TemporaryDirectory(prefix="bench-model-service-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
