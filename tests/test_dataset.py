import shutil

import pytest
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


@pytest.mark.parametrize("where", ["in-process", "sandbox"])
def test_hostile_files_are_refused_with_reasons(small_dataset, cfg, tmp_path, where):
    """What devices' ClientApps and the simulation build from manifests: the same refusals as the inbox."""
    from edgefed.simulations.media_cases import write_concat_script, write_png_mov, write_self_concat

    good = read_manifest(small_dataset)[:2]
    script = write_concat_script(tmp_path / "holiday.mp4", good[0].path, repeats=1000)
    shutil.copy(good[0].path, tmp_path / good[0].path.name)  # what the script names, beside it
    hostile = [script, write_self_concat(tmp_path / "loop.mp4"), write_png_mov(tmp_path / "poster.mov", 12000, 12000)]
    entries = good + [ManifestEntry(str(p), good[0].label, "") for p in hostile]
    sandbox = None
    if where == "sandbox":
        from edgefed.edge.media.sandbox import ExtractionSandbox

        sandbox = ExtractionSandbox(4096)
    try:
        extra = {} if sandbox is None else {"sandbox": sandbox}  # in-process is the call older code had too
        features, errors = build_features(entries, cfg, tmp_path / "cache", **extra)
    finally:
        if sandbox is not None:
            sandbox.stop()
    assert len(features) == 2
    reasons = {e.path: e.reason for e in errors}
    assert set(reasons) == {str(p) for p in hostile}
    assert "'concat' is not an allowed container" in reasons[str(script)]
    assert "'concat' is not an allowed container" in reasons[str(tmp_path / "loop.mp4")]
    assert "over max-media-pixels" in reasons[str(tmp_path / "poster.mov")]
