"""New media on a device becomes training data in the background.

The agent watches `inbox/<label>/...` (the folder name is the label; media
directly in `inbox/` is not trained on). Each new file is decoded once, at low
priority and within `extract-cpu-share` of one core, into the feature cache,
then listed in the device's manifests (`train.jsonl` / `heldout.jsonl`,
rewritten atomically after every clip), which the ClientApp reads. A file that
fails extraction is recorded in `inbox_errors.jsonl` with its reason and not
retried until it changes. All of it is on disk: a restarted agent goes on
where it stopped.

Inbox files are untrusted: they are decoded in an ExtractionSandbox child
process (edge/media/sandbox.py), never in the agent, within the media limits
(`[media-limits]`, run-config defaults) and `extract-memory-mb`. A file that
is refused, runs out of memory or time, or kills its decoder is one failed
file; a child that died or was killed is replaced for the next one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch

from edgefed.common.atomic import write_bytes_atomically
from edgefed.common.data.clip_manifest import ManifestEntry, ManifestError, read_manifest
from edgefed.edge.agent.config import AgentConfig
from edgefed.edge.dataset import build_features
from edgefed.edge.extract import find_media
from edgefed.edge.media.sandbox import ExtractionSandbox, SandboxUnavailable

log = logging.getLogger(__name__)

ERRORS_FILE = "inbox_errors.jsonl"
NICE = 10


@dataclass
class InboxState:
    backlog: int = 0  # labelled files not yet extracted
    extracted: int = 0
    failed: int = 0
    unlabelled: int = 0


class InboxWatcher:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.extractor = cfg.feature_config()
        self.state = InboxState()
        self.errors_path = cfg.state_dir / ERRORS_FILE
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.inbox.mkdir(parents=True, exist_ok=True)
        self.train = self._read(cfg.train_manifest)
        self.heldout = self._read(cfg.heldout_manifest)
        self.failed = self._read_failures()
        self.sandbox = ExtractionSandbox(cfg.extract_memory_mb, prepare=prepare_extraction_process)

    # --- one pass --------------------------------------------------------------------
    def scan_once(self, stop: threading.Event | None = None) -> InboxState:
        """Extract every new labelled file (stopping early if `stop` is set); returns the counts."""
        listed = {e.video for e in [*self.train.values(), *self.heldout.values()]}
        pending, unlabelled = [], 0
        for path in find_media([self.cfg.inbox]):
            relative = path.relative_to(self.cfg.inbox)
            if len(relative.parts) < 2:
                unlabelled += 1
                continue
            if str(path) in listed or self.failed.get(str(path)) == _stamp(path):
                continue
            pending.append((path, relative.parts[0]))
        self.state.unlabelled, self.state.backlog = unlabelled, len(pending)
        for path, label in pending:
            if stop is not None and stop.is_set():
                break
            try:
                self._extract(path, label)
            except SandboxUnavailable as err:  # the device's trouble, not the file's: it stays pending
                log.warning("inbox: %s; trying again at the next scan", err)
                break
            self.state.backlog -= 1
        return self.state

    def _extract(self, path: Path, label: str) -> None:
        start = time.perf_counter()
        entry = ManifestEntry(str(path), label, "")
        _, errors = build_features([entry], self.extractor, self.cfg.cache_dir, self.sandbox)
        if errors:
            self.failed[str(path)] = _stamp(path)
            self.state.failed += 1
            with open(self.errors_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"path": str(path), "stamp": _stamp(path), "reason": errors[0].reason}) + "\n")
            log.warning("inbox: %s not usable: %s", path.name, errors[0].reason)
        else:
            split = self.heldout if _is_heldout(self.cfg.device_id, path, self.cfg.heldout_share) else self.train
            split[str(path)] = entry
            self.state.extracted += 1
            self._write_manifests()
        # Stay within the CPU share: after t seconds of work, rest t * (1 - share) / share.
        spent = time.perf_counter() - start
        time.sleep(spent * (1.0 - self.cfg.extract_cpu_share) / self.cfg.extract_cpu_share)

    def _write_manifests(self) -> None:
        heldout = self.heldout or self.train  # until a clip falls in the held-out share, evaluate on what there is
        for path, entries in ((self.cfg.train_manifest, self.train), (self.cfg.heldout_manifest, heldout)):
            text = "".join(e.to_json() + "\n" for e in entries.values())
            write_bytes_atomically(path, text.encode())

    # --- the loop ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Scan every `scan-every-s` until `stop`, at low priority; the extraction process ends with it."""
        # This thread only (Linux); the extraction process it spawns inherits it (and sets it again).
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        try:
            while not stop.is_set():
                try:
                    self.scan_once(stop)
                except OSError as err:  # a vanished file or a full disk: report, try again next scan
                    log.warning("inbox scan failed: %s", err)
                stop.wait(self.cfg.scan_every_s)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the extraction process (a later scan starts a new one)."""
        self.sandbox.stop()

    # --- persisted state ------------------------------------------------------------------
    @staticmethod
    def _read(manifest: Path) -> dict[str, ManifestEntry]:
        if not manifest.exists():
            return {}
        try:
            return {e.video: e for e in read_manifest(manifest)}
        except ManifestError as err:
            log.warning("%s unreadable (%s): rebuilding it from the inbox", manifest, err)
            return {}

    def _read_failures(self) -> dict[str, str]:
        failed: dict[str, str] = {}
        if self.errors_path.exists():
            for line in self.errors_path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    failed[record["path"]] = record["stamp"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash
        return failed


def prepare_extraction_process() -> None:
    """In each new extraction process: low priority, one thread for OpenCV and torch (decoding is the work)."""
    if os.getpriority(os.PRIO_PROCESS, 0) < NICE:  # only ever lower it: raising it back needs privileges
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _stamp(path: Path) -> str:
    """Size and mtime: a failed file is tried again once it changes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "gone"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _is_heldout(device_id: str, path: Path, share: float) -> bool:
    digest = hashlib.sha256(f"{device_id}|{path.name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < share
