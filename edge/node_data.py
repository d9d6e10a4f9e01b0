"""Which clips a node trains and evaluates on, as features.

A deployed device names its manifests in its node config (`train-manifest`,
`heldout-manifest`, optional `cache-dir`); a simulated node has a
`partition-id` and finds its split under the run's data dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.clip_manifest import read_manifest
from edgefed.common.data.features import FeatureSet
from edgefed.common.data.layout import DataLayout
from edgefed.common.lru import Lru
from edgefed.edge.dataset import build_features

# Features of the splits this process loaded last (simulated nodes live for many rounds in one process, and one
# process serves many of them in turn): what a split's features are is also in the on-disk feature cache.
_LOADED: Lru[tuple[str, str], tuple[FeatureSet, int]] = Lru(64)


class NoUsableData(RuntimeError):
    """Every clip of a split failed extraction, or the split is empty."""


@dataclass(frozen=True)
class NodeData:
    cfg: EdgefedConfig
    node_key: str
    train_manifest: Path
    heldout_manifest: Path
    cache_dir: Path | None

    @classmethod
    def for_context(cls, cfg: EdgefedConfig, context: Context) -> NodeData:
        node_config = context.node_config
        if "train-manifest" in node_config:
            train = Path(str(node_config["train-manifest"]))
            heldout = Path(str(node_config.get("heldout-manifest", train)))
            cache = node_config.get("cache-dir")
            return cls(cfg, str(context.node_id), train, heldout, Path(str(cache)) if cache else None)
        if "partition-id" in node_config:
            if not cfg.data_dir:
                raise NoUsableData("simulated node has no data: run config data-dir is empty")
            pid = int(node_config["partition-id"])
            layout = DataLayout(Path(cfg.data_dir))
            return cls(cfg, f"p{pid}", layout.client_train(pid), layout.client_heldout(pid), layout.cache)
        raise NoUsableData(
            "node config names no data: set train-manifest (and heldout-manifest) "
            "or run under the simulation engine"
        )

    def train_features(self) -> tuple[FeatureSet, int]:
        """Training features and how many clips of the split were skipped as unreadable."""
        return self._features(self.train_manifest)

    def heldout_features(self) -> tuple[FeatureSet, int]:
        return self._features(self.heldout_manifest)

    def _features(self, manifest: Path) -> tuple[FeatureSet, int]:
        extractor = json.dumps({**self.cfg.feature_config(), "labels": self.cfg.labels}, sort_keys=True)
        return _LOADED.get((str(manifest.resolve()), extractor), lambda: self._build(manifest))

    def _build(self, manifest: Path) -> tuple[FeatureSet, int]:
        features, errors = build_features(read_manifest(manifest), self.cfg, self.cache_dir)
        if features is None:
            reasons = "; ".join(f"{e.path}: {e.reason}" for e in errors[:3])
            raise NoUsableData(f"{manifest}: no usable clips ({len(errors)} failed: {reasons})")
        return features, len(errors)
