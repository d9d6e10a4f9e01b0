"""Hostile media: files that are not media containers, and media past the limits a device sets.

Each attack is built in a temp folder (simulations/media_cases.py) and must end
as a MediaError with a reason, before the work it asks for is done. The
sandbox tests check what stops the rest: a child process that runs out of
memory, time or life fails one file, and the next file gets a working child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import pytest

from edgefed.common.config import EdgefedConfig
from edgefed.edge.dataset import clip_features
from edgefed.edge.media.errors import MediaError
from edgefed.edge.media.keyframes import extract_keyframes
from edgefed.edge.media.probe import probe
from edgefed.simulations.media_cases import (
    falsify_mkv_duration,
    write_audio,
    write_concat_script,
    write_png_mov,
    write_self_concat,
    write_video,
)

ROOT = Path(__file__).resolve().parents[1]
CFG = EdgefedConfig()


def _refusal(path: Path, cfg: EdgefedConfig = CFG) -> str:
    with pytest.raises(MediaError) as err:
        clip_features(str(path), cfg, label=0)
    assert str(path) in str(err.value)
    return err.value.reason


# --- not media: scripts under a media name -------------------------------------------------------------------


def test_concat_script_named_mp4_is_refused_before_it_opens_anything(tmp_path):
    """280 KB of `file 'clip.mp4'` lines once decoded 100,000 frames in the inbox thread."""
    clip = write_video(tmp_path / "clip.mp4", [20], width=64, height=48, audio=False).path
    script = write_concat_script(tmp_path / "holiday.mp4", clip, repeats=5000)  # 100,000 frames
    reason = _refusal(script)
    assert "'concat' is not an allowed container format" in reason
    for step in (probe, extract_keyframes):
        with pytest.raises(MediaError, match="not an allowed container format"):
            step(script)


def test_self_referencing_concat_script_is_refused_without_opening_itself(tmp_path):
    """Each open of this script opened it again, until the process ran out of file descriptors."""
    script = write_self_concat(tmp_path / "loop.mp4")
    reason = _refusal(script)
    assert "'concat' is not an allowed container format" in reason
    assert "Too many open files" not in reason


def test_ffmpeg_enforces_the_open_options(tmp_path):
    """The whitelists are FFmpeg's own checks: without them the same files open as concat inputs."""
    from edgefed.edge.media.container import SAFE_OPEN_OPTIONS, decoder_options
    from edgefed.edge.media.limits import MediaBudget

    clip = write_video(tmp_path / "clip.mp4", [10], width=64, height=48, audio=False).path
    script = write_concat_script(tmp_path / "script.mp4", clip, repeats=3)
    with av.open(str(script)) as container:
        assert container.format.name == "concat"
    with pytest.raises(av.error.ArgumentError):  # format_whitelist
        av.open(str(script), container_options=SAFE_OPEN_OPTIONS)
    url = f"concat:{clip}|{clip}"
    with av.open(url) as container:
        assert container.format.name.startswith("mov")
    with pytest.raises(av.error.ArgumentError):  # protocol_whitelist=file
        av.open(url, container_options=SAFE_OPEN_OPTIONS)
    with av.open(str(clip), container_options=SAFE_OPEN_OPTIONS) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = decoder_options(MediaBudget.start())
        next(container.decode(stream))
        assert "max_pixels" not in stream.codec_context.options  # PyAV keeps the options the decoder did not take


# --- real media past a limit ---------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {root!r})
    from edgefed.common.config import EdgefedConfig
    from edgefed.edge.dataset import clip_features
    from edgefed.edge.media.errors import MediaError
    reason = None
    try:
        clip_features(sys.argv[1], EdgefedConfig(), 0)
    except MediaError as err:
        reason = err.reason
    print(json.dumps({{"reason": reason, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
""")


def _extract_in_fresh_process(path: Path) -> dict:
    """The MediaError reason (or None) and peak RSS of a new process that extracts `path`."""
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.format(root=str(ROOT)), str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("header", ["honest", "lying"])
def test_huge_png_frames_are_refused_before_their_buffer_exists(tmp_path, header):
    """A 420 KB .mov of 12000x12000 PNG frames (432 MB of pixels each) once took 479 MiB.

    honest: its stream header says 12000x12000, refused from the header; lying: the header says 320x240
    and the decoder itself refuses the frame (max_pixels) before allocating it. Either way the process
    peaks near what a small legit clip needs."""
    control = _extract_in_fresh_process(write_video(tmp_path / "small.mp4", [20], audio=False).path)
    assert control["reason"] is None
    hostile = write_png_mov(tmp_path / "poster.mov", 12000, 12000, frames=2,
                            header_size=(320, 240) if header == "lying" else None)
    assert hostile.stat().st_size < 1_000_000
    result = _extract_in_fresh_process(hostile)
    assert result["reason"], "the file was decoded"
    if header == "honest":
        assert "12000x12000 is over max-media-pixels" in result["reason"]
    assert result["peak_mb"] < control["peak_mb"] + 150, (result, control)


@pytest.mark.parametrize("container,where", [("mp4", "stream header"), ("mkv", "decoding")])
def test_too_many_frames_are_refused(tmp_path, container, where):
    """mp4 states its frame count (refused unopened); Matroska does not (refused at frame limit + 1)."""
    truth = write_video(tmp_path / f"long.{container}", [30, 30],
                        container="matroska" if container == "mkv" else None)
    reason = _refusal(truth.path, CFG.replace(max_media_frames=40))
    assert "max-media-frames (40)" in reason
    assert ("(stream header)" in reason) == (where == "stream header")


def test_too_long_is_refused_from_the_header_and_while_decoding(tmp_path):
    """2.4 s of video and 3 s of audio against a 1 s limit; a Matroska header that claims 0.5 s is caught
    by the frames' own timestamps."""
    limits = CFG.replace(max_media_duration_s=1.0)
    clip = write_video(tmp_path / "clip.mp4", [30, 30]).path
    assert "max-media-duration-s (1 s)" in _refusal(clip, limits)
    assert "max-media-duration-s (1 s)" in _refusal(write_audio(tmp_path / "tone.wav", 3.0), limits)
    liar = falsify_mkv_duration(write_video(tmp_path / "liar.mkv", [30, 30], container="matroska").path, 0.5)
    assert probe(liar).duration_s == pytest.approx(0.5, abs=0.01)
    assert "video runs past max-media-duration-s (1 s)" in _refusal(liar, limits)


def test_extraction_past_max_media_seconds_is_stopped(tmp_path):
    """The wall time covers the whole file; 0.01 s is far less than 1200 frames need on any machine."""
    truth = write_video(tmp_path / "slow.mp4", [300] * 4, width=640, height=360)
    reason = _refusal(truth.path, CFG.replace(max_media_seconds=0.01))
    assert "longer than max-media-seconds (0.01 s)" in reason


def test_legit_files_stay_within_the_default_limits(tmp_path):
    truth = write_video(tmp_path / "ok.mkv", [30, 30], container="matroska")
    features = clip_features(str(truth.path), CFG, label=0)
    assert features.frame_mask.all() and features.audio_mask.all()


# --- the sandbox: what our checks cannot stop -----------------------------------------------------------------
# Functions run in the child: module level, so the child imports them by name. (New API is imported inside
# the tests, so the attack tests above also run against code that predates it.)


def _echo(data: bytes) -> bytes:
    return data


def _sleep(seconds: float) -> bytes:
    time.sleep(seconds)
    return b""


def _allocate(mb: int) -> bytes:
    return bytes(bytearray(mb << 20))[:1]


def _crash() -> bytes:
    os.kill(os.getpid(), signal.SIGSEGV)
    return b""


def _peak_vm_mb() -> bytes:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return str(int(line.split()[1]) // 1024).encode()
    raise AssertionError("no VmPeak in /proc/self/status")


@pytest.fixture()
def sandbox():
    from edgefed.edge.media.sandbox import ExtractionSandbox

    made = []

    def make(memory_mb: int = 4096, grace_s: float = 1.0) -> ExtractionSandbox:
        made.append(ExtractionSandbox(memory_mb, grace_s=grace_s))
        return made[-1]

    yield make
    for box in made:
        box.stop()


def test_sandbox_kills_a_call_that_outlives_its_wall_time(sandbox, tmp_path):
    box = sandbox()
    assert box.call("warm-up", 60, _echo, b"ready") == b"ready"
    with pytest.raises(MediaError, match=r"did not finish within max-media-seconds \(0.5 s\)"):
        box.call("stuck.mp4", 0.5, _sleep, 3600)
    assert box.call("next.mp4", 60, _echo, b"next") == b"next"
    assert box.starts == 2  # the stuck child was killed and replaced


def test_sandbox_child_that_dies_fails_one_file(sandbox):
    box = sandbox()
    with pytest.raises(MediaError, match=r"died \(SIGSEGV\)"):
        box.call("crash.mp4", 60, _crash)
    assert box.call("next.mp4", 60, _echo, b"next") == b"next"


def test_sandbox_memory_limit_stops_a_decode_the_limits_allowed(sandbox, tmp_path):
    """With max-media-pixels raised past a 12000x12000 frame, only the child's RLIMIT_AS stands between
    the frame and the device's memory: the file fails, the child answers the next one."""
    from edgefed.edge.dataset import clip_feature_bytes, features_from_bytes

    good = write_video(tmp_path / "good.mp4", [20, 20]).path
    probe_box = sandbox()
    probe_box.call(str(good), 120, clip_feature_bytes, str(good), CFG, 0)
    baseline = int(probe_box.call("vm", 60, _peak_vm_mb))
    box = sandbox(memory_mb=baseline + 256)
    with pytest.raises(MediaError, match="ran out of memory"):
        box.call("alloc", 60, _allocate, 1024)
    poster = write_png_mov(tmp_path / "poster.mov", 12000, 12000)
    with pytest.raises(MediaError, match="(?i)memory") as err:
        box.call(str(poster), 120, clip_feature_bytes, str(poster), CFG.replace(max_media_pixels=10**9), 0)
    assert err.value.path == str(poster)
    features = features_from_bytes(str(good), box.call(str(good), 120, clip_feature_bytes, str(good), CFG, 0), CFG)
    assert features.frame_mask.all()


def test_features_from_the_child_are_checked_not_trusted(tmp_path):
    """What crosses back from the extraction process is safetensors of the shapes one clip has, or refused."""
    from edgefed.edge.dataset import clip_feature_bytes, features_from_bytes

    good = write_video(tmp_path / "good.mp4", [20], audio=False).path
    data = clip_feature_bytes(str(good), CFG, 3)
    assert int(features_from_bytes("x", data, CFG).labels) == 3
    with pytest.raises(MediaError, match="unreadable features"):
        features_from_bytes("x", b"\x80\x04pickle?" + data, CFG)
    with pytest.raises(MediaError, match="wrong shapes"):
        features_from_bytes("x", data, CFG.replace(num_keyframes=CFG.num_keyframes + 1))
