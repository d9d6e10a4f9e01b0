"""Benchmark: keyframe extraction against decoding alone and against PySceneDetect.

    python -m pip install --no-deps scenedetect platformdirs   # benchmark-only; see README
    python benchmarks/bench_media.py --json results/media.json [VIDEO ...]

Default videos: generated 1280x720 H.264 clips (moving stripe/ring patterns
with sensor-like grain, hard cuts at known frames), made once and cached.
All three passes run on the same files in the same process, in turn, best
of `--repeat` runs each:

- decode_only_fps: cv2.VideoCapture.grab() over every frame, no retrieve;
- keyframes_fps: edgefed's shot-aware keyframe extraction (decode included);
- pyscenedetect_fps: PySceneDetect's ContentDetector with its defaults.

cut_f1_vs_pyscenedetect matches our cuts to PySceneDetect's within 2 frames.
Log-mel: our torch.stft + mel_filter_bank against transformers'
ASTFeatureExtractor on the same 10 s of audio. Peak memory: extraction in a
fresh process on a short video and on one 10x longer (the same content
repeated by remuxing, so only length differs).
"""

from __future__ import annotations

import argparse
import json
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
from edgefed.simulations.synthetic import SyntheticSpec, write_clip  # noqa: E402

SPEC = SyntheticSpec(num_clips=1, width=1280, height=720, fps=30, duration_s=20, shots=10)


def default_videos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"bench720_{i}.mp4"
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            tmp = path.with_suffix(".tmp.mp4")
            write_clip(tmp, ["stripes_hum", "rings_chirp", "stripes_chirp"][i % 3], True, SPEC,
                       np.random.default_rng([7, i]))
            tmp.rename(path)
        paths.append(path)
    return paths


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


def cut_f1(ours: list[int], theirs: list[int], tolerance: int = 2) -> float:
    unmatched = list(theirs)
    hits = 0
    for cut in ours:
        match = next((t for t in unmatched if abs(t - cut) <= tolerance), None)
        if match is not None:
            unmatched.remove(match)
            hits += 1
    if not ours and not theirs:
        return 1.0
    precision = hits / len(ours) if ours else 0.0
    recall = hits / len(theirs) if theirs else 0.0
    return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)


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
    parser.add_argument("videos", nargs="*", type=Path, help="videos to measure (default: generated 720p)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--media-dir", type=Path, default=Path("runs/bench-media"), help="where generated videos live")
    parser.add_argument("--count", type=int, default=3, help="generated videos")
    parser.add_argument("--repeat", type=int, default=3, help="runs per pass; the best counts")
    args = parser.parse_args()

    videos = args.videos or default_videos(args.media_dir, args.count)
    frames = {v: decode_only(v) for v in videos}
    total = sum(frames.values())
    config = FeatureSettings()  # what a device extracts with the default run config
    rows = []
    for video in videos:
        n = frames[video]
        dec, _ = best_fps(decode_only, video, n, args.repeat)
        ours, result = best_fps(lambda p: extract_keyframes(p, config), video, n, args.repeat)
        psd, theirs = best_fps(pyscenedetect_cuts, video, n, args.repeat)
        rows.append({"video": str(video), "frames": n, "decode_only_fps": dec, "keyframes_fps": ours,
                     "pyscenedetect_fps": psd, "ours_cuts": result.cuts, "pyscenedetect_cuts": theirs,
                     "f1": cut_f1(result.cuts, theirs)})
        print(f"{video.name}: decode {dec:.0f} fps, ours {ours:.0f} fps, PySceneDetect {psd:.0f} fps, "
              f"F1 {rows[-1]['f1']:.3f}", flush=True)

    def overall(key: str) -> float:  # frames / total seconds over all videos
        return total / sum(r["frames"] / r[key] for r in rows)

    dec, ours, psd = overall("decode_only_fps"), overall("keyframes_fps"), overall("pyscenedetect_fps")
    ours_cuts = sum(([(i, c) for c in r["ours_cuts"]] for i, r in enumerate(rows)), [])
    f1 = float(np.mean([r["f1"] for r in rows]))
    logmel_ms, ast_ms = logmel_timing(videos[0])
    long_video = repeat_video(videos[0], args.media_dir / f"{videos[0].stem}_x10.mp4", 10)
    rss_short, rss_long = peak_rss_mb(videos[0]), peak_rss_mb(long_video)

    result = {
        "videos": len(videos),
        "frames": total,
        "keyframes_fps": round(ours, 1),
        "decode_only_fps": round(dec, 1),
        "pyscenedetect_fps": round(psd, 1),
        "ratio_vs_decode_only": round(ours / dec, 3),
        "ratio_vs_pyscenedetect": round(ours / psd, 3),
        "cut_f1_vs_pyscenedetect": round(f1, 4),
        "logmel_ms_per_10s": round(logmel_ms, 3),
        "ast_extractor_ms_per_10s": round(ast_ms, 3),
        "logmel_speedup_vs_ast": round(ast_ms / logmel_ms, 2),
        "peak_rss_mb_short": round(rss_short, 1),
        "peak_rss_mb_long": round(rss_long, 1),
        "cuts_found": len(ours_cuts),
        "per_video": [{k: v for k, v in r.items() if k not in ("ours_cuts", "pyscenedetect_cuts")} for r in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_video"}, indent=2))


if __name__ == "__main__":
    main()
