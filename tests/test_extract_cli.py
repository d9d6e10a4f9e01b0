"""`edgefed extract` end to end, as a user runs it."""

import json
import subprocess
import sys

from edgefed.simulations.media_cases import write_audio, write_video


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgefed", "extract", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_extract_writes_keyframes_index_and_contact_sheet(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    truth = write_video(media / "a.mp4", [30, 30, 30])
    write_audio(media / "b.wav", 2.0)
    (media / "broken.mp4").write_text("not a video")
    out = tmp_path / "out"
    proc = _run(media, "--out", out, "--contact-sheet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken.mp4" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    index = json.loads((out / "a.mp4" / "index.json").read_text())
    assert len(index["shots"]) == 3 and index["cut_frames"] == truth.cuts or all(
        abs(a - b) <= 2 for a, b in zip(index["cut_frames"], truth.cuts))
    assert all((out / "a.mp4" / kf["file"]).stat().st_size > 0 for kf in index["keyframes"])
    assert len(index["audio_windows"]) == len(index["keyframes"])
    assert (out / "a.mp4" / "contact_sheet.png").stat().st_size > 0
    report = {r["path"].split("/")[-1]: r for r in json.loads((out / "report.json").read_text())}
    assert report["broken.mp4"]["ok"] is False and report["broken.mp4"]["reason"]
    assert report["b.wav"]["ok"] is True


def test_every_file_failing_exits_non_zero(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"")
    proc = _run(tmp_path / "x.mp4", tmp_path / "missing.mkv", "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert "every file failed" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_extract_refuses_hostile_files_and_applies_the_media_limits(tmp_path):
    """`edgefed extract` decodes as a device does: scripts under media names and a 12000x12000 PNG frame
    fail with their reasons, and `--set max-media-*` limits apply."""
    from edgefed.simulations.media_cases import write_concat_script, write_png_mov, write_self_concat

    media = tmp_path / "media"
    media.mkdir()
    good = write_video(media / "a.mp4", [30, 30]).path
    write_concat_script(media / "holiday.mp4", good, repeats=200)
    write_self_concat(media / "loop.mp4")
    write_png_mov(media / "poster.mov", 12000, 12000)
    out = tmp_path / "out"
    proc = _run(media, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = {r["path"].split("/")[-1]: r for r in json.loads((out / "report.json").read_text())}
    assert report["a.mp4"]["ok"] is True
    for name in ("holiday.mp4", "loop.mp4"):
        assert report[name]["ok"] is False and "'concat' is not an allowed container" in report[name]["reason"]
    assert report["poster.mov"]["ok"] is False and "over max-media-pixels" in report["poster.mov"]["reason"]
    limited = _run(good, "--out", tmp_path / "limited", "--set", "max-media-frames=40")
    assert limited.returncode != 0 and "Traceback" not in limited.stdout + limited.stderr
    assert "max-media-frames (40)" in json.loads((tmp_path / "limited" / "report.json").read_text())[0]["reason"]
