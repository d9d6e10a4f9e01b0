"""The frozen-prefix cache: each clip's hidden states entering the trainable layers, on disk, bounded.

With LoRA on the last N layers of each encoder (`lora-layers`), a device computes the frozen
prefix of a clip (common/encoders/prefix.py) once and trains only the top N layers, the fusion
and the head from then on: every later epoch and round reads the states back instead of running
the encoders' first L - N layers, their embeddings and (for wav2vec2) the convolutions again.

    batch ──► key per clip = sha256(base identity, split layers, dtype, the clip's model inputs)
                │ hit:  <cache>/prefix/<kk>/<key>.safetensors (touched: recently used)
                └ miss: model.prefix_states(batch misses) in one call ──► written atomically

A key covers what the states depend on: the frozen base (its identity, which also names the
precision it runs at), where each encoder is split, the stored dtype and the clip's inputs
themselves (so a change of feature config, which changes the inputs, is a new key and never a
stale read). States are stored in float16: tests/test_prefix_cache.py and bench_edge_training
measure the logit error that adds (the target is 1e-3). The folder is bounded by `prefix-cache-mb`:
past it, the least recently used files are deleted. A file that is missing, unreadable or of
the wrong shape (another process evicted it, the disk lost it) is recomputed, never an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgefed.common.atomic import write_atomically
from edgefed.common.data.features import FeatureSet
from edgefed.common.model.classifier import MultimodalClassifier, PrefixStates

log = logging.getLogger(__name__)

PREFIX_VERSION = "prefix-1"
STORED = torch.float16


class PrefixCache:
    """Prefix states of one base and split, under `folder`, at most `max_bytes` of files."""

    def __init__(self, folder: str | Path, max_bytes: int, base_identity: str, starts: tuple[int, int]) -> None:
        if max_bytes <= 0:
            raise ValueError(f"a prefix cache needs a positive size bound, got {max_bytes} bytes")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.starts = starts
        self._scope = f"{PREFIX_VERSION}|{base_identity}|{starts[0]},{starts[1]}|{STORED}".encode()
        self.hits = self.misses = self.evicted = 0
        self._sizes = self._scan()  # path -> bytes, of what this process knows is on disk

    def forward(self, model: MultimodalClassifier, batch: FeatureSet) -> torch.Tensor:
        """The batch's logits through the trainable top of `model`, from cached (or just computed) states."""
        return model.forward_from_prefix(self.states(model, batch), batch.frame_mask, batch.audio_mask, self.starts)

    def states(self, model: MultimodalClassifier, batch: FeatureSet) -> PrefixStates:
        """Every clip's prefix states (float16): read where cached, the misses computed in one call and stored."""
        keys = [self._key(batch, i) for i in range(len(batch))]
        found = [self._read(key) for key in keys]
        missing = [i for i, states in enumerate(found) if states is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            misses = batch.subset(missing)
            computed = model.prefix_states(misses.frames, misses.audio, self.starts)
            for j, i in enumerate(missing):
                found[i] = _row(computed, j)
                self._write(keys[i], found[i])
        return _stack(found)

    # --- keys and files ---------------------------------------------------------------------------
    def _key(self, batch: FeatureSet, i: int) -> str:
        digest = hashlib.sha256(self._scope)
        for tensor in (batch.frames[i], batch.audio[i]):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> PrefixStates | None:
        path = self._path(key)
        try:
            tensors = load_file(path)
            states = PrefixStates(video=tensors["video"][None], audio=tensors["audio"][None],
                                  sounding=tensors["sounding"][None] if "sounding" in tensors else None)
            os.utime(path)  # recently used: evicted last
        except FileNotFoundError:
            self._sizes.pop(path, None)
            return None
        except (OSError, SafetensorError, KeyError) as err:
            log.warning("prefix cache: recomputing %s (%s)", path.name, err)
            self._sizes.pop(path, None)
            return None
        return states

    def _write(self, key: str, states: PrefixStates) -> None:
        path = self._path(key)
        tensors = {"video": states.video[0].contiguous(), "audio": states.audio[0].contiguous()}
        if states.sounding is not None:
            tensors["sounding"] = states.sounding[0].contiguous()
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
        self._sizes[path] = path.stat().st_size
        self._evict()

    def _scan(self) -> dict[Path, int]:
        if not self.folder.is_dir():
            return {}
        return {path: path.stat().st_size for path in self.folder.glob("*/*.safetensors")}

    def _evict(self) -> None:
        """Delete the least recently used files until the folder is within its bound."""
        total = sum(self._sizes.values())
        if total <= self.max_bytes:
            return
        self._sizes = self._scan()  # other processes (simulated devices sharing the folder) write here too
        by_age = sorted(self._sizes, key=_mtime)
        total = sum(self._sizes.values())
        for path in by_age:
            if total <= self.max_bytes:
                break
            total -= self._sizes.pop(path)
            path.unlink(missing_ok=True)
            self.evicted += 1

    @property
    def bytes_on_disk(self) -> int:
        return sum(self._sizes.values())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _row(states: PrefixStates, j: int) -> PrefixStates:
    return PrefixStates(video=states.video[j: j + 1].to(STORED), audio=states.audio[j: j + 1].to(STORED),
                        sounding=None if states.sounding is None else states.sounding[j: j + 1])


def _stack(rows: list[PrefixStates]) -> PrefixStates:
    sounding = [r.sounding for r in rows]
    return PrefixStates(video=torch.cat([r.video for r in rows]), audio=torch.cat([r.audio for r in rows]),
                        sounding=None if sounding[0] is None else torch.cat(sounding))
