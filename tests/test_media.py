"""The edge media pipeline on generated videos with known structure."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from edgefed.common.config import EdgefedConfig, FeatureSettings, KeyframeSelectorName, ShotDetectorName, choices
from edgefed.common.model.inputs import HOP_MS, model_inputs
from edgefed.edge.dataset import clip_features
from edgefed.edge.media.audio import audio_windows
from edgefed.edge.media.audio_features import WindowFeatures
from edgefed.edge.media.decode import VideoReader
from edgefed.edge.media.errors import MediaError
from edgefed.edge.media.keyframes import SAMPLE_STRIDE, extract_keyframes
from edgefed.edge.media.selectors import SELECTORS
from edgefed.edge.media.shots import DETECTORS, make_detector
from edgefed.simulations.media_cases import write_audio, write_video

CFG = EdgefedConfig()


def _near(found: list[int], truth: list[int], tolerance: int = 2) -> bool:
    return len(found) == len(truth) and all(abs(f - t) <= tolerance for f, t in zip(found, truth))


@pytest.mark.parametrize("detector", ["content", "adaptive", "content+fade"])
def test_hard_cuts_found_within_two_frames(tmp_path, detector):
    truth = write_video(tmp_path / "cuts.mp4", [30, 40, 25, 50, 35])
    result = extract_keyframes(truth.path, FeatureSettings(shot_detector=detector, num_keyframes=1))
    assert _near(result.cuts, truth.cuts), (result.cuts, truth.cuts)
    assert result.frames == truth.frames


@pytest.mark.parametrize("detector", ["content", "adaptive", "content+fade"])
def test_process_returns_each_cut_once_as_it_is_decided(tmp_path, detector):
    """The detector interface: `process` returns the new shot's first frame (or None), `flush` the rest."""
    truth = write_video(tmp_path / "cuts.mp4", [30, 40, 25, 50, 35])
    shots = make_detector(FeatureSettings(shot_detector=detector))
    returned = []
    with VideoReader(truth.path, stride=SAMPLE_STRIDE) as reader:
        for frame in reader:
            cut = shots.process(frame)
            if cut is not None:
                assert cut <= frame.index  # decided on this frame or a few frames late, never ahead
                returned.append(cut)
    returned += shots.flush()
    assert returned == shots.cuts
    assert _near(returned, truth.cuts), (returned, truth.cuts)


def test_every_configurable_detector_and_selector_has_an_implementation():
    assert set(DETECTORS) == set(choices(ShotDetectorName))
    assert set(SELECTORS) == set(choices(KeyframeSelectorName))


def test_fade_through_black_is_one_cut_inside_the_fade(tmp_path):
    truth = write_video(tmp_path / "fade.mp4", [50, 50], fade_frames=24)
    plain = extract_keyframes(truth.path, FeatureSettings(shot_detector="content", num_keyframes=1))
    with_fade = extract_keyframes(truth.path, FeatureSettings(shot_detector="content+fade", num_keyframes=1))
    assert plain.cuts == []  # each fade step is small: frame differences alone miss it
    assert len(with_fade.cuts) == 1 and abs(with_fade.cuts[0] - truth.cuts[0]) <= 4


def test_min_shot_length_suppresses_flicker(tmp_path):
    truth = write_video(tmp_path / "flicker.mp4", [30, 4, 30])
    result = extract_keyframes(truth.path, FeatureSettings(min_shot_frames=15, num_keyframes=1))
    assert len(result.cuts) == 1


def test_keyframes_per_shot_and_budget(tmp_path):
    truth = write_video(tmp_path / "many.mp4", [20] * 12)
    per_shot = extract_keyframes(truth.path, FeatureSettings(keyframes_per_shot=2, max_keyframes=100, num_keyframes=1))
    assert len(per_shot.keyframes) == 2 * 12
    budget = extract_keyframes(truth.path, FeatureSettings(keyframes_per_shot=2, max_keyframes=5, num_keyframes=1))
    assert len(budget.keyframes) == 5
    times = budget.timestamps_ms
    assert times == sorted(times) and times[-1] > 0.7 * truth.frames * 40  # spread to the end


def _stream_times_ms(path) -> list[float]:
    with av.open(str(path)) as container:
        return [f.time * 1000 for f in container.decode(video=0)]


def test_variable_frame_rate_uses_stream_timestamps(tmp_path):
    truth = write_video(tmp_path / "vfr.mp4", [30, 30], vfr=True)
    result = extract_keyframes(truth.path)
    times = _stream_times_ms(truth.path)
    for kf in result.keyframes:
        assert kf.pts_ms == pytest.approx(times[kf.index], abs=0.5)
    # index / fps would be wrong for most frames of this stream
    assert any(abs(kf.pts_ms - kf.index * 1000 / truth.fps) > 5 for kf in result.keyframes)


def test_late_first_frame_keeps_its_time(tmp_path):
    truth = write_video(tmp_path / "late.mp4", [30, 30], start_ms=500)
    result = extract_keyframes(truth.path)
    assert min(result.timestamps_ms) >= 499


def test_rotation_metadata_gives_upright_keyframes(tmp_path):
    truth = write_video(tmp_path / "rot.mp4", [20], width=320, height=160, rotation=90)
    result = extract_keyframes(truth.path, FeatureSettings(image_size=112, num_keyframes=1))
    image = result.keyframes[0].image
    rows = int((image.sum(axis=(1, 2)) > 0).sum())
    cols = int((image.sum(axis=(0, 2)) > 0).sum())
    assert result.rotation == 90
    assert rows == 112 and cols == 56  # portrait content, letterboxed left and right


@pytest.mark.parametrize("width,height", [(98, 62), (640, 80), (64, 480)])
def test_odd_sizes_are_letterboxed_with_aspect_kept(tmp_path, width, height):
    truth = write_video(tmp_path / "odd.mp4", [20], width=width, height=height, audio=False)
    image = extract_keyframes(truth.path, FeatureSettings(image_size=112, num_keyframes=1)).keyframes[0].image
    assert image.shape == (112, 112, 3)
    rows = int((image.sum(axis=(1, 2)) > 0).sum())
    cols = int((image.sum(axis=(0, 2)) > 0).sum())
    assert abs(cols / rows - width / height) < 0.15 * max(width / height, 1)


@pytest.mark.parametrize("codec,container,suffix", [("libx264", "mp4", "mp4"), ("mpeg4", "mp4", "mp4"),
                                                    ("libx264", "matroska", "mkv"), ("mpeg4", "matroska", "mkv")])
def test_codecs_and_containers(tmp_path, codec, container, suffix):
    truth = write_video(tmp_path / f"v.{suffix}", [25, 25], codec=codec, container=container)
    assert _near(extract_keyframes(truth.path).cuts, truth.cuts)


def test_audio_window_is_aligned_with_its_keyframe(tmp_path):
    """A beep at a known time peaks in the window of the keyframe at that time, at the window's matching offset."""
    beep_ms = 2600.0
    truth = write_video(tmp_path / "beep.mp4", [40, 40, 40], beep_ms=beep_ms, start_ms=200)
    features = clip_features(str(truth.path), CFG.replace(num_keyframes=6), label=0)
    video = extract_keyframes(truth.path, FeatureSettings(max_keyframes=6, num_keyframes=6))
    centres = video.timestamps_ms
    windows, present = audio_windows(str(truth.path), centres, WindowFeatures(model_inputs(CFG).audio, CFG.sample_rate))
    assert present.all()
    nearest = int(np.argmin([abs(c - beep_ms) for c in centres]))
    energy = windows[nearest].exp().sum(dim=1)  # [T]
    expected = (beep_ms - centres[nearest]) / HOP_MS + CFG.audio_frames / 2
    assert abs(int(energy.argmax()) - expected) <= 5  # within 50 ms
    far = int(np.argmax([abs(c - beep_ms) for c in centres]))
    assert windows[nearest].exp().sum() > 10 * windows[far].exp().sum()
    assert features.audio.shape == (1, 6, CFG.audio_frames, CFG.n_mels)


def test_video_without_audio_track_has_audio_masked(tmp_path):
    truth = write_video(tmp_path / "silent.mp4", [30, 30], audio=False)
    features = clip_features(str(truth.path), CFG, label=1)
    assert features.frame_mask.all() and not features.audio_mask.any()


@pytest.mark.parametrize("codec,container,suffix,audio_codec", [
    ("libvpx-vp9", "webm", "webm", "libopus"), ("libx264", "mov", "mov", "aac"), ("mpeg4", "avi", "avi", "libmp3lame"),
])
def test_more_containers_with_their_audio(tmp_path, codec, container, suffix, audio_codec):
    """WebM (VP9 + Opus), QuickTime (H.264 + AAC) and AVI (MPEG-4 + MP3) open under the container whitelist."""
    truth = write_video(tmp_path / f"v.{suffix}", [25, 25], codec=codec, container=container, audio_codec=audio_codec)
    assert _near(extract_keyframes(truth.path).cuts, truth.cuts)
    features = clip_features(str(truth.path), CFG, label=0)
    assert features.frame_mask.all() and features.audio_mask.all()


def test_cover_art_of_an_audio_file_is_not_a_video(tmp_path):
    """An mp3's attached picture (here larger than max-media-pixels) is neither decoded nor refused."""
    path = write_audio(tmp_path / "song.mp3", 3.0, cover=(4000, 4000))
    features = clip_features(str(path), CFG, label=2)
    assert not features.frame_mask.any() and features.audio_mask.all()


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"])
def test_standalone_audio_files(tmp_path, suffix):
    path = write_audio(tmp_path / f"tone{suffix}", duration_s=3.0)
    features = clip_features(str(path), CFG, label=2)
    assert not features.frame_mask.any()
    assert features.audio_mask.all()
    assert torch.isfinite(features.audio.float()).all()


def _bad(tmp_path, kind):
    good = write_video(tmp_path / "good.mp4", [20, 20]).path
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:3000])
    elif kind == "text":
        path.write_text("definitely not a video\n" * 50)
    elif kind == "unsupported-codec":
        path.write_bytes(good.read_bytes().replace(b"avc1", b"zzzz"))
    elif kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "text", "unsupported-codec", "missing", "directory"])
def test_bad_input_is_a_typed_error_with_a_reason(tmp_path, kind):
    path = _bad(tmp_path, kind)
    with pytest.raises(MediaError) as err:
        clip_features(str(path), CFG, label=0)
    assert err.value.reason and str(path) in str(err.value)


def test_raw_waveform_windows_are_each_normalised_as_the_extractor_normalises_one(tmp_path):
    """The K windows of a wav2vec2/HuBERT clip are normalised together; each equals Wav2Vec2FeatureExtractor's own
    output for that window's samples, and a window past the end of the track stays silence."""
    from transformers import Wav2Vec2FeatureExtractor

    from edgefed.common.model.inputs import AudioInput
    from edgefed.common.preprocessing import RawWaveform

    truth = write_video(tmp_path / "tones.mp4", [20, 20, 20], beep_ms=900.0, start_ms=0)
    centres = [400.0, 1500.0, 2600.0, 60_000.0]  # the last is past the end of the 6 s clip

    def windows_of(settings: RawWaveform) -> tuple[torch.Tensor, torch.Tensor]:
        audio = AudioInput(preprocessing=settings, windows=len(centres), window_samples=8000, shape=(8000,))
        return audio_windows(str(truth.path), centres, WindowFeatures(audio, CFG.sample_rate))

    raw, present = windows_of(RawWaveform(do_normalize=False))
    normalised, present_too = windows_of(RawWaveform())
    assert present.tolist() == present_too.tolist() == [True, True, True, False]
    extractor = Wav2Vec2FeatureExtractor()
    for i in range(3):
        expected = extractor(raw[i].numpy(), sampling_rate=CFG.sample_rate, return_tensors="np")["input_values"][0]
        # the norm-based variance (common/preprocessing/waveform.py) differs from numpy's float32 var by ~2e-6 relative
        np.testing.assert_allclose(normalised[i].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(normalised[3].abs().max()) == 0.0
