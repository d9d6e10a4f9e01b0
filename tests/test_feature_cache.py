"""The on-disk feature cache: hits, invalidation, atomic writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import edgefed.edge.dataset as dataset
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.clip_manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _entries(small_dataset, n=3):
    return read_manifest(small_dataset)[:n]


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = dataset.clip_features

    def counting(path, cfg, label):  # noqa: ANN001, ANN202
        calls.append(path)
        return real(path, cfg, label)

    monkeypatch.setattr(dataset, "clip_features", counting)
    return calls


def test_second_pass_reads_features_not_video(small_dataset, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cfg = EdgefedConfig()
    first, _ = dataset.build_features(_entries(small_dataset), cfg, tmp_path)
    assert len(calls) == 3
    second, _ = dataset.build_features(_entries(small_dataset), cfg, tmp_path)
    assert len(calls) == 3  # no decode on the second pass
    assert all(torch.equal(a, b) for a, b in zip(first.to_tensors().values(), second.to_tensors().values()))


def test_changing_the_extractor_config_invalidates(small_dataset, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    dataset.build_features(_entries(small_dataset), EdgefedConfig(), tmp_path)
    dataset.build_features(_entries(small_dataset), EdgefedConfig(shot_threshold=30.0), tmp_path)
    assert len(calls) == 6
    # settings that do not change features (training ones) keep the cache
    dataset.build_features(_entries(small_dataset), EdgefedConfig(learning_rate=0.1), tmp_path)
    assert len(calls) == 6


def test_changed_file_content_misses_the_cache(small_dataset, tmp_path, monkeypatch):
    entry = _entries(small_dataset, 1)[0]
    copy = tmp_path / "clip.mp4"
    copy.write_bytes(entry.path.read_bytes())
    cfg = EdgefedConfig()
    key_before = dataset.cache_key(copy, cfg)
    copy.write_bytes(entry.path.read_bytes() + b"\0")
    assert dataset.cache_key(copy, cfg) != key_before


def test_corrupt_entry_is_rebuilt(small_dataset, tmp_path, monkeypatch):
    cfg = EdgefedConfig()
    entries = _entries(small_dataset, 1)
    dataset.build_features(entries, cfg, tmp_path)
    (cached,) = list(tmp_path.rglob("*.safetensors"))
    cached.write_bytes(cached.read_bytes()[:100])
    calls = _count_decodes(monkeypatch)
    features, errors = dataset.build_features(entries, cfg, tmp_path)
    assert len(features) == 1 and errors == [] and len(calls) == 1


def test_killed_writer_leaves_no_entry_that_is_later_read(tmp_path):
    """SIGKILL in the middle of a cache write: the final path never holds half a file."""
    target = tmp_path / "cache" / "ab" / "entry.safetensors"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from edgefed.common.atomic import write_atomically
        def slow(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                fh.write(b"x" * 1000)
                fh.flush()
                print("half", flush=True)
                sys.stdin.read()  # held here until killed (the test never writes or closes it first)
                fh.write(b"y" * 1000)
        write_atomically(Path({str(target)!r}), slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "half"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdin.close()
    proc.stdout.close()
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert leftovers and all(p.name.endswith(".tmp") for p in leftovers)
