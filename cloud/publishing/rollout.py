"""The cloud's side of getting the federation's model onto devices during a run.

`ModelRollout` ties together the model registry (`<run>/models/`), the
publisher (exports every `export-every` versions, off the aggregation
thread) and the gRPC model service; it tells devices where the newest model
is (`announcement`) and publishes the final version at the end (the devices
then score it: cloud/grid/deployed_evaluation.py). Every export attempt is a
line in `<run>/exports.jsonl`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from edgefed.cloud.publishing.base_registry import bases_of
from edgefed.cloud.publishing.model_service import ModelServer, enrolled_devices
from edgefed.cloud.publishing.publisher import BackgroundPublisher, ModelPublisher, PublishOutcome
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.keys import load_cloud_signing_key
from edgefed.common.model.lora import checkpoint_dirs
from edgefed.common.run_dir import RunDir
from edgefed.common.wire.messages import MODEL_SERVICE, MODEL_VERSION

log = logging.getLogger(__name__)

EXPORTS_LOG = "exports.jsonl"


class ModelRollout:
    def __init__(self, cfg: EdgefedConfig, run: RunDir, heldout: FeatureSet | None, base_fingerprint: str,
                 on_export: Callable[[dict], None] | None = None) -> None:
        self.cfg = cfg
        self.on_export = on_export
        self.run = run
        self.registry = ModelRegistry(run.path / "models")
        signing_key = load_cloud_signing_key(Path(cfg.keys_root) / "cloud")
        self.publisher = ModelPublisher(cfg, self.registry, signing_key, heldout, base_fingerprint)
        # A base of checkpoint encoders is shipped to devices like a model (once per fingerprint).
        video, audio = checkpoint_dirs(cfg)
        self.base = bases_of(self.registry).publish(video, audio, signing_key) if video or audio else None
        self.outcomes: list[PublishOutcome] = []
        self._new: list[int] = []  # published versions not yet taken (the background publisher appends)
        self._new_lock = threading.Lock()
        self.background = BackgroundPublisher(self.publisher, self._record)
        # Under `edgefed cloud serve` the long-lived service serves this registry; a
        # simulation's ServerApp serves it itself for the length of the run.
        self.server = (ModelServer(self.registry, cfg.model_service, cfg.tls_dir or None, devices=enrolled_devices(cfg)).start()
                       if cfg.serve_models else None)

    @property
    def service_address(self) -> str:
        """Where devices reach the model service."""
        if self.cfg.model_service_public:
            return self.cfg.model_service_public
        return self.server.address if self.server is not None else self.cfg.model_service

    def _record(self, outcome: PublishOutcome) -> None:
        self.outcomes.append(outcome)
        if outcome.published:
            with self._new_lock:
                self._new.append(outcome.version)
        self.run.append_metrics(outcome.to_json(), name=EXPORTS_LOG)
        if self.on_export is not None:
            self.on_export(outcome.to_json())

    def on_version(self, version: int, adapter: dict[str, torch.Tensor]) -> None:
        """Called for each new global version; exports every `export-every`-th, in the background."""
        if self.cfg.export_every and version % self.cfg.export_every == 0:
            self.background.submit(version, adapter)

    def take_published(self) -> list[int]:
        """Versions published since the last call, oldest first."""
        with self._new_lock:
            taken, self._new = self._new, []
        return taken

    def announcement(self) -> dict[str, object]:
        """Config entries telling a device where the newest published model is, and where to fetch a shipped
        base (empty before the first model when the base is built in)."""
        latest = self.registry.latest_version()
        entries: dict[str, object] = {MODEL_SERVICE: self.service_address} if latest or self.base else {}
        return {**entries, MODEL_VERSION: latest} if latest else entries

    def publish_final(self, version: int, adapter: dict[str, torch.Tensor]) -> PublishOutcome | None:
        """Publish the final version (unless already published); returns the newest published outcome."""
        self.background.drain()
        if self.registry.latest_version() != version:
            self._record(self.publisher.publish(version, adapter))
        published = [o for o in self.outcomes if o.published]
        return published[-1] if published else None

    def close(self) -> None:
        self.background.close()
        if self.server is not None:
            self.server.stop()
