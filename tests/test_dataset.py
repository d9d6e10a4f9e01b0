
import torch

from edgefed.common.data.clip_manifest import ManifestEntry, read_manifest
from edgefed.edge.dataset import build_features


def test_features_have_model_shapes_and_audio_mask(small_dataset, cfg):
    entries = read_manifest(small_dataset)[:8]
    features, errors = build_features(entries, cfg, cache_dir=None)
    assert errors == []
    assert features.frames.shape == (8, cfg.num_keyframes, 3, cfg.image_size, cfg.image_size)
    assert features.frames.dtype == torch.uint8
    assert features.audio.shape == (8, cfg.num_keyframes, cfg.audio_frames, cfg.n_mels)
    assert features.frame_mask.all()
    # clips without an audio track have every window masked, the others none
    mask = features.audio_mask
    assert (mask.all(dim=1) | (~mask).all(dim=1)).all()
    assert mask.all(dim=1).any() and (~mask).all(dim=1).any()
    assert [cfg.label_names[i] for i in features.labels] == [e.label for e in entries]


def test_cache_hit_returns_identical_features_without_decoding(small_dataset, cfg, tmp_path, monkeypatch):
    entries = read_manifest(small_dataset)[:4]
    first, _ = build_features(entries, cfg, tmp_path)
    import edgefed.edge.dataset as dataset

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(dataset, "clip_features", no_decode)
    second, _ = build_features(entries, cfg, tmp_path)
    for a, b in zip(first.to_tensors().values(), second.to_tensors().values()):
        assert torch.equal(a, b)


def test_bad_files_fail_alone(small_dataset, cfg, tmp_path):
    good = read_manifest(small_dataset)[:2]
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good[0].path.read_bytes()[:2000])
    bad = [
        ManifestEntry("empty.mp4", good[0].label, str(tmp_path)),
        ManifestEntry("text.mp4", good[0].label, str(tmp_path)),
        ManifestEntry("truncated.mp4", good[0].label, str(tmp_path)),
        ManifestEntry("missing.mp4", good[0].label, str(tmp_path)),
        ManifestEntry(str(good[1].path), "not_a_label", str(tmp_path)),
    ]
    features, errors = build_features(good + bad, cfg, tmp_path / "cache")
    assert len(features) == 2
    assert len(errors) == 5
    assert all(e.reason for e in errors)
    assert any("label" in e.reason for e in errors)
