"""Benchmark: every real-size encoder family through the device loop, from a random checkpoint of its real size.

    python benchmarks/bench_encoders.py --json results/encoders.json [--families vit,ast] [--steps 3]

Per family, a checkpoint of the published architecture with random weights is written with
`save_pretrained` into a scratch folder, with the preprocessor_config.json of its own image
processor / feature extractor at that class's defaults (nothing is downloaded):

    vit       ViTModel, ViTConfig() = ViT-B/16 at 224           ViTImageProcessor()
    dinov2    Dinov2Model, DINOv2-S/14 (384 wide, 12 layers,    BitImageProcessor (dinov2-small's: shortest
              6 heads; config image 518 as on the hub)           edge 256, crop 224, ImageNet mean/std)
    clip      CLIPVisionModel, CLIPVisionConfig() = ViT-B/32    CLIPImageProcessor()
    ast       ASTModel, ASTConfig() = AST-base, 1024 x 128      ASTFeatureExtractor()
    whisper   WhisperModel, whisper-base's encoder (d_model     WhisperFeatureExtractor() (80 mels, 30 s)
              512, 6 layers, 8 heads, 80 mels); decoder 1 layer
    wav2vec2  Wav2Vec2Model, Wav2Vec2Config() = wav2vec2-base  Wav2Vec2FeatureExtractor()

Each frame family is paired with the built-in `tiny` audio encoder and each audio family with
the `tiny` video encoder, so a row measures one family (the tiny partner, ~1.8 M parameters, is
in every figure of the whole model: latency, ONNX sizes, update). The model config is the
default one otherwise (4 keyframes a clip, fusion width 192, LoRA r 8 on every attention
projection of every layer, update codec topk0.05+int8+zstd). Each family runs in a fresh
subprocess of this script, so its peak RSS is its own; the checkpoint is written by the parent
before, so writing it is not in the peak.

Data: generated 640x360 10 fps clips, labelled by the content of the family's own modality only
(4 classes). Frame families: write_video (simulations/media_cases.py) with c + 1 shots for class
c (its palette's colours 0..c) and the same quiet track for all; 6 s, variants 0.2 s longer each.
Audio families: one picture (a single shot) for all and a tone of 250 / 500 / 1000 / 2000 Hz
with its octave for class c, variants detuned by 1 % steps and at other levels
(write_tone_clip: write_video's only sound is one 100 ms beep, which a random encoder's mean
over a 10-30 s window does not tell apart); the clip fills the encoder's fixed window (AST
10.24 s, Whisper 30 s: the model reads Whisper out by the plain mean over all 1500 frames, so
on a 6 s clip 80 % of the embedding is padding) or lasts 6 s (wav2vec2).

Fields per family:
  params_m             the encoder's parameters, millions
  lora_params          LoRA parameters inside that encoder (trainable_params: everything the
                       device trains: both encoders' LoRA, the projection, fusion and head)
  load_s               load_encoder(checkpoint dir) wall time (page cache warm: just written)
  features_ms_per_clip / hf_features_ms_per_clip
                       bench_preprocessing.measure(kind) on one clip's inputs (its K frames at
                       640x360, or the audio of its windows: wav2vec2's K windows in one call, as
                       the edge pipeline normalises them, against one extractor call per window),
                       ours vs the transformers processor, same threads; best of runs (medians in
                       features_detail)
  train_clips_per_s    train_adapter (forward + backward + AdamW step) over `--steps` batches of
                       `--batch` clips, after one warm-up step
  update_bytes         build_update(trained, start, the default codec, fresh error feedback) as
                       edge/client_app.py calls it, after the warm-up + timed steps;
  update_ratio_vs_fp32 update_bytes / (4 x trainable_params)
  onnx_fp32_mb / onnx_int8_mb
                       export_quantized(merged model, cfg, dir, ("int8",)) file sizes (1e6 bytes)
  torch_latency_ms_batch1 / int8_latency_ms_batch1
                       median single-clip forward: PyTorch eager FP32 (the merged model,
                       inference_mode) vs onnxruntime INT8 (open_session), same threads, taking
                       turns in blocks (onnx_fp32_latency_ms_batch1: the FP32 ONNX file, for
                       telling the runtime's share from quantization's)
  int8_argmax_agreement
                       the head (with the projection and fusion) is first trained on the encoders'
                       frozen outputs of the first 16 clips (4 a class; LoRA as trained in the
                       steps above): full-batch AdamW, lr 1e-3, until the loss is 0.1 or
                       `--head-steps`; merged, exported; then argmax of FP32 torch vs INT8 ORT on
                       `--inputs` generated clips (the 16 and more variants). head_training,
                       fp32_accuracy, fp32_argmax_classes and fp32_logit_margin_median say whether
                       the head learned (a head that did not has near-tied logits)
  int8_embedding_cosine
                       mean cosine between the family encoder's pooled embedding (per frame or
                       per audio window, the readout the model feeds its projection) in FP32
                       torch and in INT8 ORT, over `--cosine-inputs` clips. The embedding is not an
                       output of the published graph, so a second model - the same merged model
                       whose forward returns that embedding - goes through the same
                       export_quantized path (same exporter, graph passes and quantizer); min in
                       embedding_cosine_min; int8_embedding_cosine_centered: the same after
                       taking the FP32 embeddings' mean away from both (a random encoder's
                       embedding is mostly a constant vector: embedding_varying_fraction)
  int8_profile_ms_by_op  onnxruntime's profile of an INT8 batch-1 call, ms by op type (diagnosis)
  peak_rss_mb          ru_maxrss of the family's process (MiB); rss_mb_by_phase: the peak up to
                       the end of each phase
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_preprocessing import image_processor, measure  # noqa: E402

from edgefed.cloud.publishing.onnx_export import export_quantized, file_size, merged_model  # noqa: E402
from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.data.features import FeatureSet  # noqa: E402
from edgefed.common.encoders import load_encoder  # noqa: E402
from edgefed.common.model.classifier import masked_mean  # noqa: E402
from edgefed.common.model.inputs import model_inputs  # noqa: E402
from edgefed.common.model.lora import build_lora_model, classifier_of, get_adapter_state  # noqa: E402
from edgefed.common.onnx_inference import INPUT_NAMES, open_session  # noqa: E402
from edgefed.common.training import train_adapter  # noqa: E402
from edgefed.common.wire.codec import CodecSpec  # noqa: E402
from edgefed.edge.dataset import clip_features  # noqa: E402
from edgefed.edge.error_feedback import ErrorFeedback  # noqa: E402
from edgefed.edge.media.audio import decode_audio  # noqa: E402
from edgefed.edge.update_sender import build_update  # noqa: E402
from edgefed.simulations.media_cases import write_video  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()  # save_pretrained's shard bar
warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")

SR = 16000
CLASSES = 4
TRAIN_CLIPS = 16  # the first 16 generated clips: 4 a class
WIDTH, HEIGHT, FPS, FRAMES = 640, 360, 10, 60
HEAD_LR = 1e-3  # 5e-3 and up diverge on the audio families' embeddings (measured)
HEAD_LOSS = 0.1  # the head training stops at this loss (each training clip's class at ~90 %)
TONES_HZ = (250.0, 500.0, 1000.0, 2000.0)  # audio families: class c's tone


@dataclass(frozen=True)
class Family:
    modality: str  # "frames" or "audio": which encoder slot the checkpoint takes
    make: Callable[[], tuple[transformers.PreTrainedModel, object]]  # (model, processor) to save_pretrained


def _vit():
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    return ViTModel(ViTConfig()), ViTImageProcessor()


def _dinov2():
    from transformers import Dinov2Config, Dinov2Model

    # facebook/dinov2-small: 384 wide, 12 layers, 6 heads, MLP ratio 4, patch 14, position embeddings for 518
    # (interpolated to the 224 crop its processor gives)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=518, layerscale_value=1.0)
    return Dinov2Model(config), image_processor("dinov2")


def _clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig()), CLIPImageProcessor()  # the defaults are ViT-B/32 at 224


def _ast():
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    return ASTModel(ASTConfig()), ASTFeatureExtractor()  # AST-base: 768 wide, 12 layers, 1024 frames x 128 mels


def _whisper():
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                           decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=2048, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=448, vocab_size=51865)
    return WhisperModel(config), WhisperFeatureExtractor()


def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config()), Wav2Vec2FeatureExtractor()  # the defaults are wav2vec2-base


FAMILIES = {
    "vit": Family("frames", _vit),
    "dinov2": Family("frames", _dinov2),
    "clip": Family("frames", _clip),
    "ast": Family("audio", _ast),
    "whisper": Family("audio", _whisper),
    "wav2vec2": Family("audio", _wav2vec2),
}


def make_checkpoint(family: str, path: Path) -> Path:
    torch.manual_seed(0)
    model, processor = FAMILIES[family].make()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _say(family: str, text: str) -> None:
    print(f"  [{family}] {text}", flush=True)


# --- data ------------------------------------------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def generate_clips(folder: Path, modality: str, count: int, seconds: float) -> list[tuple[Path, int]]:
    """`count` clips (clip i has class i % 4), labelled by the content of `modality` alone; audio clips last
    `seconds` (frame clips FRAMES / FPS s and 0.2 s more per variant)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(count):
        label, variant = i % CLASSES, i // CLASSES
        path = folder / f"clip{i:03d}.mp4"
        if modality == "frames":  # class c: c + 1 shots (palette colours 0..c); one quiet track for all
            write_video(path, _split(FRAMES + 2 * variant, label + 1), width=WIDTH, height=HEIGHT, fps=FPS,
                        beep_ms=None)
        else:  # one picture for all; class c: a tone of TONES_HZ[c], detuned and louder or softer by variant
            write_tone_clip(path, TONES_HZ[label] * (1 + 0.01 * (variant - 8)), 0.15 + 0.03 * (variant % 5), seconds)
        clips.append((path, label))
    return clips


def write_tone_clip(path: Path, freq: float, amplitude: float, seconds: float = FRAMES / FPS) -> Path:
    """`seconds` of one static picture with a moving bar (the same in every clip: one shot), and a tone of
    `freq` with its octave over faint noise (write_video's track is a single 100 ms beep: too little sound for a
    4-class audio task)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    picture = np.stack([80 + 100 * xx / WIDTH, 60 + 120 * yy / HEIGHT, np.full_like(xx, 140.0)], -1).astype(np.uint8)
    t = np.arange(int(seconds * SR)) / SR
    wave = amplitude * (np.sin(2 * np.pi * freq * t) + 0.5 * np.sin(4 * np.pi * freq * t)) / 1.5
    wave = (wave + np.random.default_rng(0).normal(0, 0.003, t.size)).astype(np.float32)
    frames = round(seconds * FPS)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = {"preset": "ultrafast", "threads": "1", "bf": "0"}
        audio = out.add_stream("aac", rate=SR, layout="mono")
        for i in range(frames):
            img = picture.copy()
            x = (i * WIDTH // frames) % (WIDTH - 32)
            img[:, x:x + 32] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        size = audio.codec_context.frame_size or 1024
        for start in range(0, wave.size, size):
            chunk = av.AudioFrame.from_ndarray(wave[None, start:start + size], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = SR, start, Fraction(1, SR)
            out.mux(audio.encode(chunk))
        out.mux(audio.encode(None))
    return path


def clip_frames(path: Path, k: int) -> np.ndarray:
    """k RGB frames spread over the clip, at its own resolution: what preprocessing gets for one clip."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[int(i)] for i in np.linspace(0, len(frames) - 1, k)])


# --- the model, in the pieces the head training needs -------------------------------------------------------------


def encoder_outputs(clf: nn.Module, frames: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoders' readouts before the projections: ([B, K, Dv], [B, A, Da]), as MultimodalClassifier computes."""
    b, k = frames.shape[:2]
    video = clf._video.encode(clf.pixels(frames.reshape(b * k, *frames.shape[2:]))).reshape(b, k, -1)
    a = audio.shape[1]
    values = audio.reshape(b * a, *audio.shape[2:]).float()
    if clf.tiny_logmel:
        from edgefed.common.model.classifier import LOGMEL_MEAN, LOGMEL_STD

        values = (values - LOGMEL_MEAN) / LOGMEL_STD
    return video, clf._audio.encode(values).reshape(b, a, -1)


def head_logits(clf: nn.Module, video: torch.Tensor, frame_mask: torch.Tensor, audio: torch.Tensor,
                audio_mask: torch.Tensor) -> torch.Tensor:
    """MultimodalClassifier.forward after the encoders: projections, masked means, fusion, head."""
    v = masked_mean(clf.video_proj(video), frame_mask)
    a = masked_mean(clf.audio_proj(audio), audio_mask)
    return clf.head(clf.fusion(v, a, frame_mask.any(dim=1), audio_mask.any(dim=1)))


def train_head(model: nn.Module, data: FeatureSet, steps: int, batch: int) -> dict:
    """Projections + fusion + head, full batch, on the frozen encoders' outputs for `data` (LoRA as trained):
    at most `steps` AdamW steps, until the loss is HEAD_LOSS."""
    clf = classifier_of(model)
    model.eval()
    with torch.inference_mode():  # in batches: the peak RSS is the device's (training, export), not this cache's
        outputs = [encoder_outputs(clf, b.frames, b.audio) for b in data.batches(batch)]
        reference = model(data.frames[:2], data.frame_mask[:2], data.audio[:2], data.audio_mask[:2])
    video, audio = torch.cat([v for v, _ in outputs]).clone(), torch.cat([a for _, a in outputs]).clone()
    with torch.no_grad():
        pieces = head_logits(clf, video[:2], data.frame_mask[:2], audio[:2], data.audio_mask[:2])
    assert torch.allclose(pieces, reference, atol=1e-4), "the head pieces do not reproduce the model's forward"
    params = [p for n, p in clf.named_parameters() if p.requires_grad and "lora_" not in n]
    optimizer = torch.optim.AdamW(params, lr=HEAD_LR, weight_decay=0.0)
    clf.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(head_logits(clf, video, data.frame_mask, audio, data.audio_mask), data.labels)
        losses.append(loss.item())
        if losses[-1] <= HEAD_LOSS:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = head_logits(clf, video, data.frame_mask, audio, data.audio_mask)
    return {"steps": len(losses) - (losses[-1] <= HEAD_LOSS), "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4),
            "train_accuracy": float((logits.argmax(1) == data.labels).float().mean())}


class EncoderEmbedding(nn.Module):
    """The merged model's forward cut after one encoder's readout: [B, K or A, D] (per frame / audio window)."""

    def __init__(self, model: nn.Module, modality: str) -> None:
        super().__init__()
        self.model = model
        self.modality = modality

    @property
    def encoders(self):  # noqa: ANN201 - what the exporter reads the head counts from
        return self.model.encoders

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, audio: torch.Tensor,
                audio_mask: torch.Tensor) -> torch.Tensor:
        video, sound = encoder_outputs(self.model, frames, audio)
        return video if self.modality == "frames" else sound


# --- timing ------------------------------------------------------------------------------------------------------


def latencies(calls: dict[str, Callable[[], object]], repeat: int, blocks: int = 3) -> dict[str, tuple[float, float]]:
    """(median, min) ms per call; the variants take turns block by block, in alternating order (bench_onnx's
    method, with one warm-up call a block: a real-size model's call takes up to seconds)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_block = max(repeat // blocks, 1)
    for block in range(blocks):
        for name in (list(calls) if block % 2 == 0 else list(reversed(calls))):
            calls[name]()
            for _ in range(per_block):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return {name: (round(statistics.median(t) * 1000, 2), round(min(t) * 1000, 2)) for name, t in times.items()}


def feeds_of(batch: FeatureSet, names: set[str]) -> dict[str, np.ndarray]:
    arrays = {"frames": batch.frames.numpy(), "frame_mask": batch.frame_mask.numpy(),
              "audio": batch.audio.float().numpy(), "audio_mask": batch.audio_mask.numpy()}
    return {name: arrays[name] for name in INPUT_NAMES if name in names}


def input_names(session) -> set[str]:  # noqa: ANN001
    return {i.name for i in session.get_inputs()}


# --- one family, in its own process -----------------------------------------------------------------------------------


def measure_family(family: str, checkpoint: Path, work: Path, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    modality = FAMILIES[family].modality
    attribute = "video_encoder" if modality == "frames" else "audio_encoder"
    encoders = {"video_encoder": str(checkpoint), "audio_encoder": "tiny"} if modality == "frames" else \
        {"video_encoder": "tiny", "audio_encoder": str(checkpoint)}
    cfg = EdgefedConfig(**encoders, labels=",".join(f"class{c}" for c in range(CLASSES)),
                        client_threads=args.threads, batch_size=args.batch)
    out: dict = {"modality": modality, "paired_with": "tiny " + ("audio" if modality == "frames" else "video")}
    phases: dict[str, float] = {}

    start = time.perf_counter()
    loaded = load_encoder(checkpoint, modality)
    out["load_s"] = round(time.perf_counter() - start, 3)
    out["params_m"] = round(sum(p.numel() for p in loaded.module.parameters()) / 1e6, 3)
    del loaded
    gc.collect()
    _say(family, f"{out['params_m']} M parameters, loaded in {out['load_s']} s")

    # clips and features
    start = time.perf_counter()
    inputs = model_inputs(cfg)
    # an audio clip fills the encoder's fixed window (AST 10.24 s, Whisper 30 s), or lasts 6 s
    seconds = max(FRAMES / FPS, inputs.audio.window_samples / SR if inputs.audio.windows == 1 else 0.0)
    out["audio_clip_s"] = round(seconds, 2) if modality == "audio" else None
    clips = generate_clips(work / "clips", modality, args.inputs, seconds)
    data = FeatureSet.concat([clip_features(str(path), cfg, label) for path, label in clips])
    out["input_shapes"] = {name: list(shape) for name, shape in inputs.shapes().items()}
    out["extract_s_per_clip"] = round((time.perf_counter() - start) / len(clips), 3)
    _say(family, f"{len(clips)} clips extracted, inputs {out['input_shapes']}")

    kind = family
    first = clips[0][0]
    if modality == "frames":
        frames = clip_frames(first, cfg.num_keyframes)
        pre = measure(kind, frames=frames, repeat=args.pre_repeat, threads=args.threads)
        scale, described = 1, f"{len(frames)} frames {frames.shape[1]}x{frames.shape[2]}"
    else:
        wave = decode_audio(str(first), SR)
        window = inputs.audio.window_samples
        if inputs.audio.windows == 1:  # AST/Whisper: the clip's one window
            one = wave[:window]
        else:  # wav2vec2: K windows a clip, normalised together by the edge pipeline (one call per window in theirs)
            one = np.stack([np.resize(np.roll(wave, i * window // 3), window) for i in range(inputs.audio.windows)])
        pre = measure(kind, wave=one.astype(np.float32), repeat=args.pre_repeat, threads=args.threads)
        scale = 1
        described = f"{inputs.audio.windows} x {one.shape[-1] / SR:.2f} s of audio"
    out["features_ms_per_clip"] = round(pre["ours_ms"] * scale, 3)
    out["hf_features_ms_per_clip"] = round(pre["hf_ms"] * scale, 3)
    out["features_detail"] = {"input": described, "calls_per_clip": scale, "ours_ms_median": pre["ours_ms_median"],
                              "hf_ms_median": pre["hf_ms_median"], "max_abs_err": pre["max_abs_err"]}
    torch.set_num_threads(args.threads)
    phases["features"] = peak_rss_mb()
    _say(family, f"preprocessing ours {out['features_ms_per_clip']} ms, transformers "
                 f"{out['hf_features_ms_per_clip']} ms per clip")

    # LoRA training, the update
    model = build_lora_model(cfg)
    prefix = f"base_model.model.{attribute}."
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    out["lora_params"] = sum(v for n, v in trainable.items() if n.startswith(prefix) and "lora_" in n)
    out["trainable_params"] = sum(trainable.values())
    train = data.subset(list(range(TRAIN_CLIPS)))
    start_state = get_adapter_state(model)
    batches = list(train.batches(args.batch, torch.Generator().manual_seed(0)))
    train_adapter(model, [batches[:1]], cfg.training)  # warm-up step
    timed = [batches[1 + i % (len(batches) - 1)] for i in range(args.steps)]
    result = train_adapter(model, [timed], cfg.training)
    out["train_clips_per_s"] = round(result.examples / result.seconds, 3)
    out["train_detail"] = {"batch": args.batch, "timed_steps": result.steps, "seconds": round(result.seconds, 2),
                           "loss": round(result.loss, 4)}
    payload = build_update(get_adapter_state(model), start_state, CodecSpec.parse(cfg.update_codec), ErrorFeedback(),
                           torch.Generator().manual_seed(0))
    out["update_bytes"] = len(payload)
    out["update_ratio_vs_fp32"] = round(len(payload) / (4 * out["trainable_params"]), 5)
    out["update_codec"] = cfg.update_codec
    phases["train"] = peak_rss_mb()
    _say(family, f"train {out['train_clips_per_s']} clips/s, update {out['update_bytes']} bytes "
                 f"({out['update_ratio_vs_fp32']} of fp32)")

    out["head_training"] = train_head(model, train, args.head_steps, args.eval_batch)
    adapter = get_adapter_state(model)
    del model, start_state
    gc.collect()
    merged = merged_model(cfg, adapter)
    phases["head"] = peak_rss_mb()
    _say(family, f"head trained: {out['head_training']}")

    # FP32 torch on every input: logits and the family's embeddings
    logits, embeddings = [], []
    with torch.inference_mode():
        for batch in data.batches(args.eval_batch):
            video, sound = encoder_outputs(merged, batch.frames, batch.audio)
            embeddings.append(video if modality == "frames" else sound)
            logits.append(head_logits(merged, video, batch.frame_mask, sound, batch.audio_mask))
        full = merged(data.frames[:2], data.frame_mask[:2], data.audio[:2], data.audio_mask[:2])
    torch_logits, torch_embeddings = torch.cat(logits), torch.cat(embeddings)
    assert torch.allclose(full, torch_logits[:2], atol=1e-4)
    out["fp32_accuracy"] = float((torch_logits.argmax(1) == data.labels).float().mean())
    top2 = torch_logits.topk(2, dim=1).values
    out["fp32_logit_margin_median"] = round(float((top2[:, 0] - top2[:, 1]).median()), 4)
    out["fp32_argmax_classes"] = int(torch_logits.argmax(1).unique().numel())  # 1: a head that learned nothing

    # export as published, sizes, latency, agreement
    start = time.perf_counter()
    paths = export_quantized(merged, cfg, work / "onnx", ("int8",))
    out["export_s"] = round(time.perf_counter() - start, 1)
    out["onnx_fp32_mb"] = round(file_size(paths["fp32"]) / 1e6, 3)
    out["onnx_int8_mb"] = round(file_size(paths["int8"]) / 1e6, 3)
    out["onnx_ops_int8"] = op_census(paths["int8"])
    phases["export"] = peak_rss_mb()
    _say(family, f"exported in {out['export_s']} s: fp32 {out['onnx_fp32_mb']} MB, int8 {out['onnx_int8_mb']} MB")

    int8 = open_session(str(paths["int8"]), args.threads)
    fp32 = open_session(str(paths["fp32"]), args.threads)
    one = data.subset([0])
    one_inputs = (one.frames, one.frame_mask, one.audio, one.audio_mask)

    def torch_call() -> object:
        with torch.inference_mode():
            return merged(*one_inputs)

    timed_calls = latencies({
        "torch": torch_call,
        "int8": lambda s=int8: s.run(None, feeds_of(one, input_names(s))),
        "onnx_fp32": lambda s=fp32: s.run(None, feeds_of(one, input_names(s))),
    }, args.repeat)
    del fp32
    out["int8_profile_ms_by_op"] = int8_profile(paths["int8"], feeds_of(one, input_names(int8)), args.threads, work)
    out["torch_latency_ms_batch1"], out["torch_latency_ms_batch1_min"] = timed_calls["torch"]
    out["int8_latency_ms_batch1"], out["int8_latency_ms_batch1_min"] = timed_calls["int8"]
    out["onnx_fp32_latency_ms_batch1"], out["onnx_fp32_latency_ms_batch1_min"] = timed_calls["onnx_fp32"]
    _say(family, f"batch 1 (median / min): torch {timed_calls['torch']} ms, int8 {timed_calls['int8']} ms, "
                 f"onnx fp32 {timed_calls['onnx_fp32']} ms")

    int8_logits = torch.cat([torch.from_numpy(int8.run(None, feeds_of(b, input_names(int8)))[0])
                             for b in data.batches(args.eval_batch)])
    out["int8_argmax_agreement"] = float((int8_logits.argmax(1) == torch_logits.argmax(1)).float().mean())
    out["int8_accuracy"] = float((int8_logits.argmax(1) == data.labels).float().mean())
    out["int8_max_logit_diff"] = round(float((int8_logits - torch_logits).abs().max()), 4)
    out["agreement_inputs"] = len(data)
    del int8
    gc.collect()
    phases["int8"] = peak_rss_mb()
    _say(family, f"argmax agreement {out['int8_argmax_agreement']} on {len(data)} clips "
                 f"(fp32 accuracy {out['fp32_accuracy']}, int8 {out['int8_accuracy']})")

    # the encoder's embedding through the same export path
    shutil.rmtree(work / "onnx")
    view = EncoderEmbedding(merged, modality).eval()
    cosine_data = data.subset(list(range(min(args.cosine_inputs, len(data)))))
    view_paths = export_quantized(view, cfg, work / "embedding", ("int8",))
    session = open_session(str(view_paths["int8"]), args.threads)
    got = torch.cat([torch.from_numpy(session.run(None, feeds_of(b, input_names(session)))[0])
                     for b in cosine_data.batches(args.eval_batch)])
    expected = torch_embeddings[:len(cosine_data)]
    mask = cosine_data.frame_mask if modality == "frames" else cosine_data.audio_mask
    cosines = F.cosine_similarity(got.flatten(0, 1), expected.flatten(0, 1), dim=-1)[mask.flatten()]
    out["int8_embedding_cosine"] = round(float(cosines.mean()), 5)
    # the same after taking away the FP32 embedding's mean over these inputs: the INT8 error against the part
    # of the embedding that changes with the input (on a random base that part can be small)
    flat_got, flat_expected = got.flatten(0, 1)[mask.flatten()], expected.flatten(0, 1)[mask.flatten()]
    centre = flat_expected.mean(dim=0)
    out["int8_embedding_cosine_centered"] = round(float(F.cosine_similarity(
        flat_got - centre, flat_expected - centre, dim=-1).mean()), 5)
    out["embedding_varying_fraction"] = round(float((flat_expected - centre).norm(dim=-1).mean()
                                                    / flat_expected.norm(dim=-1).mean()), 5)
    out["embedding_cosine_min"] = round(float(cosines.min()), 5)
    out["embedding_vectors"] = int(cosines.numel())
    del session
    shutil.rmtree(work / "embedding")
    phases["embedding"] = peak_rss_mb()
    _say(family, f"embedding cosine {out['int8_embedding_cosine']} (min {out['embedding_cosine_min']}, centred "
                 f"{out['int8_embedding_cosine_centered']}) over {out['embedding_vectors']} vectors")

    out["int8_size_ratio"] = round(out["onnx_int8_mb"] / out["onnx_fp32_mb"], 4)
    out["int8_latency_ratio_batch1"] = round(out["int8_latency_ms_batch1"] / out["torch_latency_ms_batch1"], 4)
    out["peak_rss_mb"] = peak_rss_mb()
    out["rss_mb_by_phase"] = phases
    return out


def int8_profile(path: Path, feed: dict[str, np.ndarray], threads: int, folder: Path, runs: int = 4) -> dict:
    """Where an INT8 batch-1 call spends its time: ms per call by op type (onnxruntime's profiler, a session with
    open_session's options; the first, warm-up call left out), the top ones and the rest."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.enable_profiling, options.profile_file_prefix = True, str(folder / "ort-profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    calls = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    after = calls[0]["ts"] + calls[0]["dur"]
    by_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("ts", 0) > after and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1000 / runs
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])
    top = {op: round(ms, 2) for op, ms in ranked[:8]}
    return {**top, "other": round(sum(ms for _, ms in ranked[8:]), 2), "total": round(sum(by_op.values()), 2)}


def op_census(path: Path) -> dict[str, int]:
    """Node count per op type of the INT8 graph (what stayed float shows here)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# --- driver ------------------------------------------------------------------------------------------------------


FIELDS = ("params_m", "lora_params", "load_s", "features_ms_per_clip", "hf_features_ms_per_clip",
          "train_clips_per_s", "update_bytes", "update_ratio_vs_fp32", "onnx_fp32_mb", "onnx_int8_mb",
          "torch_latency_ms_batch1", "int8_latency_ms_batch1", "int8_argmax_agreement", "int8_embedding_cosine",
          "peak_rss_mb")


def run_child(family: str, checkpoint: Path, work: Path, args: argparse.Namespace) -> dict:
    result = work / "result.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--json", str(result), "--child", family,
               "--checkpoint", str(checkpoint), "--work", str(work), "--threads", str(args.threads),
               "--steps", str(args.steps), "--batch", str(args.batch), "--head-steps", str(args.head_steps),
               "--inputs", str(args.inputs), "--cosine-inputs", str(args.cosine_inputs),
               "--repeat", str(args.repeat), "--pre-repeat", str(args.pre_repeat),
               "--eval-batch", str(args.eval_batch)]
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads, both sides")
    parser.add_argument("--steps", type=int, default=3, help="timed LoRA training steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=2, help="clips per training step")
    parser.add_argument("--head-steps", type=int, default=300,
                        help="most full-batch steps training projection+fusion+head (it stops at loss 0.1)")
    parser.add_argument("--inputs", type=int, default=64, help="generated clips the argmax agreement is taken on")
    parser.add_argument("--cosine-inputs", type=int, default=16, help="clips whose embeddings are compared")
    parser.add_argument("--repeat", type=int, default=6, help="timed batch-1 calls per variant (3 blocks)")
    parser.add_argument("--pre-repeat", type=int, default=10, help="runs per side of the preprocessing timing")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inputs < TRAIN_CLIPS:
        parser.error(f"--inputs must be at least {TRAIN_CLIPS} (the head trains on the first {TRAIN_CLIPS})")

    if args.child:  # one family, in this fresh process
        result = measure_family(args.child, args.checkpoint, args.work, args)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        return

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; one of {', '.join(FAMILIES)}")
    out: dict = {"threads": args.threads, "families": {},
                 "settings": {"steps": args.steps, "batch": args.batch, "head_steps": args.head_steps,
                              "inputs": args.inputs, "cosine_inputs": args.cosine_inputs, "repeat": args.repeat,
                              "num_keyframes": EdgefedConfig().num_keyframes, "clips": f"{WIDTH}x{HEIGHT} {FPS} fps "
                              f"{FRAMES / FPS:.0f}+ s, write_video"},
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "onnxruntime": __import__("onnxruntime").__version__}}
    out["load_average_1min_before"] = round(os.getloadavg()[0], 2)
    total = time.perf_counter()
    scratch = args.work or Path(tempfile.mkdtemp(prefix="bench-encoders-"))
    try:
        for family in families:
            started = time.perf_counter()
            work = scratch / family
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            print(f"{family}: writing a random real-size checkpoint ...", flush=True)
            checkpoint = make_checkpoint(family, work / "checkpoint")
            gc.collect()
            result = run_child(family, checkpoint, work, args)
            result["wall_s"] = round(time.perf_counter() - started, 1)
            result["load_average_1min_after"] = round(os.getloadavg()[0], 2)  # another job on the cores shows here
            out["families"][family] = {**{k: result[k] for k in FIELDS}, **{k: v for k, v in result.items()
                                                                             if k not in FIELDS}}
            shutil.rmtree(work, ignore_errors=True)
            print(f"{family}: done in {result['wall_s']} s: " + ", ".join(f"{k} {result[k]}" for k in FIELDS),
                  flush=True)
            out["wall_s"] = round(time.perf_counter() - total, 1)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")  # after every family: a partial run keeps its rows
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"total {out['wall_s']} s -> {args.json}", flush=True)


if __name__ == "__main__":
    main()
