"""Training from cached frozen-prefix states: the same logits and gradients as the full forward, a cache
that is keyed by what the states depend on, bounded on disk, and never an error when it lost a file.

The built-in tiny encoders (3 layers, LoRA on the last one) and tiny random Whisper / wav2vec2
checkpoints (tests/checkpoints.py); the states are stored in float16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.model.lora import build_lora_model
from edgefed.common.training import train_adapter
from edgefed.edge.training.prefix_cache import PrefixCache
from tests.checkpoints import make_checkpoint
from tests.feature_batches import random_features

SMALL = dict(num_layers=3, lora_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, image_size=32, n_mels=16,
             audio_frames=32, patch_size=8, num_keyframes=2)
MB = 1 << 20


def _features(cfg: EdgefedConfig, n: int, seed: int = 0) -> FeatureSet:
    data = random_features(cfg, n, seed)
    data.frame_mask[0, -1] = False  # an empty keyframe slot
    return data


def _setup(cfg: EdgefedConfig, folder: Path, max_bytes: int = 64 * MB, identity: str = "base-a"):
    model = build_lora_model(cfg)
    classifier = model.base_model.model
    return model, classifier, PrefixCache(folder, max_bytes, identity, classifier.prefix_starts(cfg.lora_layers))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: make_checkpoint(kind, root).path for kind in ("whisper", "wav2vec2")}


def _configs(checkpoints) -> dict[str, EdgefedConfig]:
    return {"tiny": EdgefedConfig(**SMALL),
            "whisper": EdgefedConfig(**{**SMALL, "audio_encoder": str(checkpoints["whisper"])}),
            "wav2vec2": EdgefedConfig(**{**SMALL, "audio_encoder": str(checkpoints["wav2vec2"])})}


@pytest.mark.parametrize("kind", ["tiny", "whisper", "wav2vec2"])
def test_logits_from_cached_states_equal_the_full_forward_within_1e_3(checkpoints, tmp_path, kind):
    cfg = _configs(checkpoints)[kind]
    model, classifier, cache = _setup(cfg, tmp_path)
    assert cache.starts == (2, 1 if kind != "tiny" else 2)  # the checkpoints have 2 layers, tiny 3
    data = _features(cfg, 6)
    model.eval()
    with torch.no_grad():
        full = model(data.frames, data.frame_mask, data.audio, data.audio_mask)
        exact = classifier.forward_from_prefix(classifier.prefix_states(data.frames, data.audio, cache.starts),
                                               data.frame_mask, data.audio_mask, cache.starts)
        computed = cache.forward(classifier, data)  # misses: computed, stored in float16
        read = cache.forward(classifier, data)  # hits: read back from disk
    assert torch.allclose(exact, full, atol=1e-5)
    assert (cache.misses, cache.hits) == (6, 6)
    assert torch.equal(computed, read)
    assert float((read - full).abs().max()) < 1e-3


def test_gradients_through_cached_states_are_those_of_the_full_forward(tmp_path):
    cfg = EdgefedConfig(**SMALL)
    model, classifier, cache = _setup(cfg, tmp_path)
    data = _features(cfg, 4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)
    grads = []
    for forward in (lambda: model(data.frames, data.frame_mask, data.audio, data.audio_mask),
                    lambda: cache.forward(classifier, data)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(), data.labels).backward()
        grads.append({n: p.grad.clone() for n, p in trainable.items() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    assert any(".lora_B." in n and float(g.abs().max()) > 0 for n, g in grads[1].items())
    for name, full in grads[0].items():
        assert torch.allclose(grads[1][name], full, atol=1e-3, rtol=1e-2), name


def test_training_from_the_cache_moves_the_adapter_the_full_forward_sees(tmp_path):
    cfg = EdgefedConfig(**SMALL)
    model, classifier, cache = _setup(cfg, tmp_path)
    data = _features(cfg, 8)
    model.eval()
    with torch.no_grad():
        before = model(data.frames, data.frame_mask, data.audio, data.audio_mask)
    epochs = [list(data.batches(4, torch.Generator().manual_seed(s))) for s in range(3)]
    result = train_adapter(model, epochs, cfg.training, forward=lambda b: cache.forward(classifier, b))
    assert result.steps == 6 and cache.misses == 8 and cache.hits == 16  # the first epoch computes, then reads
    with torch.no_grad():
        after = model(data.frames, data.frame_mask, data.audio, data.audio_mask)
        cached = cache.forward(classifier, data)
    assert not torch.allclose(before, after, atol=1e-3)
    assert float((cached - after).abs().max()) < 1e-3  # the trained top applies to the cached states


def test_a_new_base_or_new_features_miss_and_the_same_ones_hit(tmp_path):
    cfg = EdgefedConfig(**SMALL)
    model, classifier, cache = _setup(cfg, tmp_path)
    data = _features(cfg, 3)
    with torch.no_grad():
        cache.forward(classifier, data)
        other_base = PrefixCache(tmp_path, 64 * MB, "base-b", cache.starts)
        other_base.forward(classifier, data)
        assert other_base.misses == 3
        other_split = PrefixCache(tmp_path, 64 * MB, "base-a", (1, 1))
        other_split.states(classifier, data)
        assert other_split.misses == 3
        changed = _features(cfg, 3)
        changed.frames[1] ^= 1  # one clip's extracted frames differ (another feature config, say)
        again = PrefixCache(tmp_path, 64 * MB, "base-a", cache.starts)  # a restarted device: same folder
        again.forward(classifier, changed)
    assert (again.hits, again.misses) == (2, 1)


def test_the_folder_stays_within_its_bound_and_an_evicted_clip_is_recomputed(tmp_path):
    cfg = EdgefedConfig(**SMALL)
    model, classifier, probe = _setup(cfg, tmp_path / "probe")
    data = _features(cfg, 10)
    with torch.no_grad():
        probe.states(classifier, data.subset([0]))
    per_clip = probe.bytes_on_disk
    cache = PrefixCache(tmp_path / "bounded", 4 * per_clip, "base-a", probe.starts)
    with torch.no_grad():
        for i in range(10):
            cache.states(classifier, data.subset([i]))
            on_disk = sum(p.stat().st_size for p in (tmp_path / "bounded").glob("*/*.safetensors"))
            assert on_disk <= 4 * per_clip
        assert cache.evicted == 6
        states = cache.forward(classifier, data)  # the six oldest are gone: recomputed, not an error
    assert cache.misses == 10 + 6 and cache.hits == 4
    model.eval()
    with torch.no_grad():
        full = model(data.frames, data.frame_mask, data.audio, data.audio_mask)
    assert float((states - full).abs().max()) < 1e-3


def test_a_truncated_or_foreign_cache_file_is_recomputed(tmp_path):
    cfg = EdgefedConfig(**SMALL)
    _, classifier, cache = _setup(cfg, tmp_path)
    data = _features(cfg, 2)
    with torch.no_grad():
        expected = cache.forward(classifier, data)
        files = sorted(tmp_path.glob("*/*.safetensors"))
        files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
        files[1].write_bytes(b"\x00" * 64)  # garbage
        again = PrefixCache(tmp_path, 64 * MB, "base-a", cache.starts)
        got = again.forward(classifier, data)
    assert again.misses == 2 and torch.equal(got, expected)


def test_a_split_below_a_trainable_layer_is_refused(tmp_path):
    cfg = EdgefedConfig(**{**SMALL, "lora_layers": 2})
    _, classifier, _ = _setup(cfg, tmp_path)
    data = _features(cfg, 1)
    with pytest.raises(ValueError, match="sits before layer 2"):
        classifier.prefix_states(data.frames, data.audio, (2, 2))
