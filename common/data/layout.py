"""Where prepared data lives, so the preparer, the clients and the server agree.

    <data-dir>/
      metadata.jsonl                      the full manifest (synthetic or the user's)
      partitions/client_<i>/train.jsonl   one simulated device's training clips
      partitions/client_<i>/heldout.jsonl its local held-out clips
      partitions/central/heldout.jsonl    the server's held-out clips
      central_heldout.safetensors         their features (the server never decodes media)
      cache/                              per-clip feature cache shared by local devices
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "metadata.jsonl"

    @property
    def partitions(self) -> Path:
        return self.root / "partitions"

    def client_train(self, partition_id: int) -> Path:
        return self.partitions / f"client_{partition_id}" / "train.jsonl"

    def client_heldout(self, partition_id: int) -> Path:
        return self.partitions / f"client_{partition_id}" / "heldout.jsonl"

    @property
    def central_manifest(self) -> Path:
        return self.partitions / "central" / "heldout.jsonl"

    @property
    def central_features(self) -> Path:
        return self.root / "central_heldout.safetensors"

    @property
    def cache(self) -> Path:
        return self.root / "cache"
