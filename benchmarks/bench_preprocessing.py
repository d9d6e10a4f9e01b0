"""Benchmark: exactly-the-checkpoint preprocessing against the transformers processors it reproduces.

    python benchmarks/bench_preprocessing.py --json results/preprocessing.json [--video CLIP]

Per kind, on the same input in the same process, with the same torch thread
count for both sides, in alternating blocks, best of `--repeat`. `--threads 1,2`
(default): each kind's fields at 1 thread - transformers' PIL and numpy paths
are single-threaded, and on a 2-core machine with other load a second torch
thread waits for a busy core - and again at 2 threads under `threads_2`:

    ast       ast_fbank()        vs ASTFeatureExtractor()               10 s of audio
    whisper   whisper_log_mel()  vs WhisperFeatureExtractor(80)         10 s of audio
    wav2vec2  raw_waveform()     vs Wav2Vec2FeatureExtractor()          10 s of audio
    vit, dinov2, clip, siglip    pixel_values() (geometry + normalize)
              vs ViT / BiT (dinov2-small's settings) / CLIP / SigLIP ImageProcessor   8 RGB frames 360x640

Fields per kind: ours_ms, hf_ms (best of the runs), speedup (hf_ms / ours_ms),
max_abs_err (features: max |ours - theirs|; frames: max |ours - theirs| x std,
i.e. in [0, 1] intensity, where one grey level is 1/255 = 0.00392), and for
frames max_grey_levels and frac_over_one_level. Inputs: frames and the audio
track of `--video` (10 s: the track repeated or cut), or generated ones - frames
with gradients, stripes, hard edges and grain, a chirp with harmonics and noise.
`measure(kind)` is the measuring function, for benchmarks that compose it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import PIL
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefed.common.preprocessing import (  # noqa: E402
    AstFbank,
    RawWaveform,
    WhisperLogMel,
    ast_fbank,
    pixel_values,
    preprocessing_from_dict,
    raw_waveform,
    whisper_log_mel,
)
from edgefed.edge.media.audio import decode_audio  # noqa: E402

SR = 16000
KINDS = ("ast", "whisper", "wav2vec2", "vit", "dinov2", "clip", "siglip")
AUDIO_SECONDS = 10
FRAMES, HEIGHT, WIDTH = 8, 360, 640

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")


def image_processor(kind: str) -> transformers.BaseImageProcessor:
    from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor, ViTImageProcessor

    if kind == "dinov2":  # facebook/dinov2-small's preprocessor_config.json
        return BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return {"vit": ViTImageProcessor, "clip": CLIPImageProcessor, "siglip": SiglipImageProcessor}[kind]()


def generated_frames(n: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(n):
        img = np.stack([127 + 120 * np.sin(xx / (3.1 + i) + yy / 7.3), 255 * (xx + yy) / (width + height),
                        230.0 * (((xx + 9 * i) // 23 + yy // 17) % 2)], -1) + rng.normal(0, 6, (height, width, 3))
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def generated_audio(seconds: float = AUDIO_SECONDS) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    sweep = 200 + 3800 * t / seconds
    wave = (0.3 * np.sin(2 * np.pi * np.cumsum(sweep) / SR) + 0.1 * np.sin(2 * np.pi * 440 * t)
            + 0.05 * np.sin(2 * np.pi * 1320 * t) + 0.01 * np.random.default_rng(0).normal(size=t.size))
    return wave.astype(np.float32)


def clip_media(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(FRAMES RGB frames spread over the clip's first seconds, AUDIO_SECONDS of its track at 16 kHz)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0))
                  if i % 10 == 0 and i < 10 * FRAMES]
    wave = decode_audio(str(path), SR)
    if wave is None:
        raise SystemExit(f"{path}: no audio track")
    return np.stack(frames), np.resize(wave, AUDIO_SECONDS * SR).astype(np.float32)


def best_ms(ours: Callable[[], object], theirs: Callable[[], object], repeat: int,
            rounds: int = 5) -> tuple[float, float, float, float]:
    """(best ours, best theirs, median ours, median theirs) in ms over `repeat` runs each, taken in `rounds`
    alternating blocks, so a change of machine load hits both sides alike."""
    ours(), theirs()  # warm caches, tables, thread pools
    runs: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            for _ in range(max(1, repeat // rounds)):
                start = time.perf_counter()
                fn()
                runs[name].append((time.perf_counter() - start) * 1000)
    return (min(runs["ours"]), min(runs["theirs"]), float(np.median(runs["ours"])), float(np.median(runs["theirs"])))


def measure(kind: str, frames: np.ndarray | None = None, wave: np.ndarray | None = None, repeat: int = 30,
            threads: int = 1) -> dict:
    """One kind's {ours_ms, hf_ms, speedup, max_abs_err, ...} on these frames / this mono 16 kHz wave
    (generated ones when None), with torch set to `threads` threads for both sides."""
    from transformers import ASTFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    torch.set_num_threads(threads)
    extra: dict = {}
    if kind in ("ast", "whisper", "wav2vec2"):
        wave = generated_audio() if wave is None else wave
        extra["input"] = f"{wave.size / SR:.1f} s mono 16 kHz" + (f" in {wave.shape[0]} windows" if wave.ndim == 2 else "")
        if kind == "ast":
            extractor, key = ASTFeatureExtractor(), "input_values"
            extra["hf_backend"] = "torchaudio" if transformers.utils.is_speech_available() else "numpy"

            def ours() -> torch.Tensor:
                return ast_fbank(wave, AstFbank(), SR)
        elif kind == "whisper":
            extractor, key = WhisperFeatureExtractor(feature_size=80), "input_features"

            def ours() -> torch.Tensor:
                return whisper_log_mel(wave, WhisperLogMel(feature_size=80), SR)
        else:
            extractor, key = Wav2Vec2FeatureExtractor(), "input_values"

            def ours() -> torch.Tensor:  # a clip's K windows [K, T] in one call, as the edge pipeline makes them
                return raw_waveform(wave, RawWaveform(), SR).input_values

        def theirs() -> torch.Tensor:  # a batch [K, T]: one call per window, the extractor's fastest way
            rows = wave if wave.ndim == 2 else wave[None]
            return torch.from_numpy(np.concatenate([extractor(row, sampling_rate=SR, return_tensors="np")[key]
                                                    for row in rows]))

        error = float((ours() - theirs()).abs().max())
    elif kind in ("vit", "dinov2", "clip", "siglip"):
        frames = generated_frames() if frames is None else frames
        processor = image_processor(kind)
        settings = preprocessing_from_dict(processor.to_dict())

        def ours() -> torch.Tensor:
            return pixel_values(frames, settings)

        def theirs() -> torch.Tensor:
            return processor(frames, return_tensors="pt")["pixel_values"]

        apart = (ours() - theirs()).abs() * torch.tensor(settings.normalization.std).view(1, 3, 1, 1)  # [0, 1] scale
        error = float(apart.max())
        extra.update(input=f"{frames.shape[0]} RGB frames {frames.shape[1]}x{frames.shape[2]}",
                     max_grey_levels=round(error * 255, 3),
                     frac_over_one_level=float((apart * 255 > 1 + 1e-3).float().mean()))
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    ours_ms, hf_ms, ours_med, hf_med = best_ms(ours, theirs, repeat)
    return {"ours_ms": round(ours_ms, 3), "hf_ms": round(hf_ms, 3), "speedup": round(hf_ms / ours_ms, 2),
            "max_abs_err": error, "ours_ms_median": round(ours_med, 3), "hf_ms_median": round(hf_med, 3), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--video", type=Path, help="take the frames and audio from this clip (default: generated)")
    parser.add_argument("--repeat", type=int, default=30, help="runs per side; the best counts")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, the same for both sides; the first "
                                                         "gives each kind's fields, the others go under threads_<n>")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    args = parser.parse_args()

    threads = [int(t) for t in args.threads.split(",")]
    frames, wave = clip_media(args.video) if args.video else (generated_frames(), generated_audio())
    result: dict = {"threads": threads, "repeat": args.repeat,
                    "media": str(args.video) if args.video else "generated",
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "pillow": PIL.__version__}}
    for kind in args.kinds.split(","):
        for n in threads:
            row = measure(kind, frames, wave, args.repeat, n)
            print(f"{kind:9s} {n} thread(s): ours {row['ours_ms']:8.3f} ms  transformers {row['hf_ms']:8.3f} ms  "
                  f"x{row['speedup']:<6}  max err {row['max_abs_err']:.3g}", flush=True)
            if kind not in result:
                result[kind] = row
            else:
                result[kind][f"threads_{n}"] = {k: row[k] for k in ("ours_ms", "hf_ms", "speedup")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
