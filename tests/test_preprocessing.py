"""Exactly-the-checkpoint preprocessing against the transformers processors it reproduces.

Every transformers processor here is built from its constructor with a
checkpoint's defaults and saved with `save_pretrained` (nothing downloads).
Inputs are realistic: frames with edges, gradients and grain at odd sizes, a
chirp with harmonics and noise, and the same content through H.264/AAC and
PyAV; real clips from /work/shared/media/real when that folder exists.
Speed is benchmarks/bench_preprocessing.py's claim, not asserted here.
"""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import transformers
from transformers import (
    ASTFeatureExtractor,
    BitImageProcessor,
    CLIPImageProcessor,
    DeiTImageProcessor,
    SiglipImageProcessor,
    ViTImageProcessor,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
)

from edgefed.common.preprocessing import (
    AstFbank,
    FrameGeometry,
    ImagePreprocessing,
    PixelNormalization,
    PixelNormalizer,
    PreprocessingError,
    RawWaveform,
    WhisperLogMel,
    ast_fbank,
    geometry,
    normalize,
    pixel_values,
    preprocessing_from_dict,
    raw_waveform,
    read_preprocessing,
    whisper_log_mel,
)
from edgefed.edge.media.audio import decode_audio

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")  # AST's own bank

SR = 16000
REAL_MEDIA = Path("/work/shared/media/real")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GREY = 1 / 255  # one grey level in pixel_values * std units
EPS = 1e-6


def dinov2_small() -> BitImageProcessor:
    """facebook/dinov2-small's preprocessor_config.json, as constructor arguments."""
    return BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_center_crop=True)


PROCESSORS = {
    "vit": ViTImageProcessor,
    "deit": DeiTImageProcessor,
    "dinov2": dinov2_small,
    "clip": CLIPImageProcessor,
    "siglip": SiglipImageProcessor,
}


def saved(processor: Any, tmp_path: Path) -> Path:  # an image processor or feature extractor
    processor.save_pretrained(tmp_path)
    return tmp_path


def scene(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB frames [n, H, W, 3]: gradients, fine stripes, hard-edged blocks and sensor grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(n):
        red = 127 + 120 * np.sin(xx / (3.1 + i) + yy / 7.3)
        green = 255 * (xx + yy) / (width + height)
        blue = 230.0 * (((xx + 9 * i) // 23 + yy // 17) % 2)
        img = np.stack([red, green, blue], -1) + rng.normal(0, 6, (height, width, 3))
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def chirp(seconds: float, seed: int = 0) -> np.ndarray:
    """Mono float32 at 16 kHz: a 200 Hz -> 4 kHz chirp, two harmonics of 440 Hz, and noise."""
    t = np.arange(round(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    sweep = 200 + 3800 * t / max(seconds, 1e-3)
    wave = (0.3 * np.sin(2 * np.pi * np.cumsum(sweep) / SR) + 0.1 * np.sin(2 * np.pi * 440 * t)
            + 0.05 * np.sin(2 * np.pi * 1320 * t) + 0.01 * rng.normal(size=t.size))
    return wave.astype(np.float32)


def grey_levels_apart(ours: torch.Tensor, theirs: torch.Tensor, std: tuple[float, ...]) -> torch.Tensor:
    """|ours - theirs| in pixel_values, scaled back to [0, 1] intensity (x std), per value."""
    return (ours - theirs).abs() * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)


def assert_frames_match(ours: torch.Tensor, theirs: torch.Tensor, std: tuple[float, ...]) -> None:
    """Within one grey level of the PIL path; torch's 14-16-bit resampling weights round a very few pixels
    (fewer than 1 in 10^4) one level further than PIL's 22-bit ones, never more than two levels."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    apart = grey_levels_apart(ours, theirs, std)
    assert float(apart.max()) <= 2 * GREY + EPS
    assert float((apart > GREY + EPS).float().mean()) < 1e-4


# --- settings read from a checkpoint ----------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("vit", ImagePreprocessing(FrameGeometry(resize=(224, 224), resample="bilinear"), PixelNormalization())),
    ("deit", ImagePreprocessing(FrameGeometry(resize=(256, 256), resample="bicubic", crop=(224, 224)),
                                PixelNormalization())),
    ("dinov2", ImagePreprocessing(FrameGeometry(resize=None, shortest_edge=256, resample="bicubic", crop=(224, 224)),
                                  PixelNormalization(mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD)))),
    ("clip", ImagePreprocessing(FrameGeometry(resize=None, shortest_edge=224, resample="bicubic", crop=(224, 224)),
                                PixelNormalization(mean=(0.48145466, 0.4578275, 0.40821073),
                                                   std=(0.26862954, 0.26130258, 0.27577711)))),
    ("siglip", ImagePreprocessing(FrameGeometry(resize=(224, 224), resample="bicubic"), PixelNormalization())),
])
def test_image_settings_are_read_back_from_a_saved_processor(tmp_path, name, expected):
    assert read_preprocessing(saved(PROCESSORS[name](), tmp_path)) == expected


@pytest.mark.parametrize("extractor, kwargs, expected", [
    (ASTFeatureExtractor, {}, AstFbank()),
    (WhisperFeatureExtractor, {"feature_size": 80}, WhisperLogMel(feature_size=80)),
    (WhisperFeatureExtractor, {"feature_size": 128}, WhisperLogMel(feature_size=128)),
    (Wav2Vec2FeatureExtractor, {}, RawWaveform()),
    (Wav2Vec2FeatureExtractor, {"do_normalize": False, "return_attention_mask": True},
     RawWaveform(do_normalize=False, return_attention_mask=True)),
    (ASTFeatureExtractor, {"num_mel_bins": 64, "max_length": 512, "mean": -3.0, "std": 4.0},
     AstFbank(num_mel_bins=64, max_length=512, mean=-3.0, std=4.0)),
], ids=["ast", "whisper80", "whisper128", "wav2vec2", "wav2vec2-raw", "ast-custom"])
def test_audio_settings_are_read_back_from_a_saved_extractor(tmp_path, extractor, kwargs, expected):
    assert read_preprocessing(saved(extractor(**kwargs), tmp_path)) == expected


def test_older_files_with_int_sizes_read_as_transformers_reads_them():
    """An int `size` is a square for ViT and a shortest edge for CLIP (default_to_square); an int crop is square."""
    vit = preprocessing_from_dict({"feature_extractor_type": "ViTFeatureExtractor", "size": 384, "resample": 2,
                                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    assert vit.geometry == FrameGeometry(resize=(384, 384), resample="bilinear")
    clip = preprocessing_from_dict({"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224,
                                    "do_center_crop": True, "resample": 3})
    assert clip.geometry == FrameGeometry(resize=None, shortest_edge=224, resample="bicubic", crop=(224, 224))
    fast = preprocessing_from_dict({"image_processor_type": "SiglipImageProcessorFast", "size": {"height": 384,
                                                                                                  "width": 384}})
    assert fast.geometry == FrameGeometry(resize=(384, 384), resample="bicubic")


@pytest.mark.parametrize("content, reason", [
    (None, "not found"),
    ("{not json", "unreadable"),
    ('["a list"]', "expected a JSON object"),
    ('{"do_resize": true}', "neither image_processor_type nor feature_extractor_type"),
    ('{"image_processor_type": "DetrImageProcessor"}', "unsupported processor type 'DetrImageProcessor'"),
    ('{"image_processor_type": "CLIPImageProcessor", "resample": 1}', "resample=1 is not supported"),
    ('{"image_processor_type": "ViTImageProcessor", "size": {"longest_edge": 512}}', "is not supported"),
    ('{"image_processor_type": "ViTImageProcessor", "do_pad": true}', "do_pad=true is not supported"),
    ('{"image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0, 0.5]}', "std must be non-zero"),
    ('{"feature_extractor_type": "WhisperFeatureExtractor", "dither": 0.001}', "only 0.0 is supported"),
    ('{"feature_extractor_type": "ASTFeatureExtractor", "max_length": "1024"}', "max_length must be an int"),
    ('{"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 2}', "only mono"),
])
def test_a_bad_preprocessor_config_is_a_clear_error_naming_the_file(tmp_path, content, reason):
    if content is not None:
        (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(PreprocessingError, match=reason) as err:
        read_preprocessing(tmp_path)
    assert str(tmp_path / "preprocessor_config.json") in str(err.value)
    assert isinstance(err.value, ValueError)


def test_fingerprints_change_with_what_the_output_depends_on_and_nothing_else():
    clip = preprocessing_from_dict({"image_processor_type": "CLIPImageProcessor"})
    same = preprocessing_from_dict({"image_processor_type": "CLIPImageProcessorFast"})
    assert clip.fingerprint() == same.fingerprint()  # the processor's name is not part of the key
    other_mean = preprocessing_from_dict({"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5] * 3})
    assert other_mean.fingerprint() != clip.fingerprint()
    assert other_mean.geometry.fingerprint() == clip.geometry.fingerprint()  # cached uint8 frames still reusable
    assert AstFbank().fingerprint() != AstFbank(max_length=512).fingerprint()
    assert WhisperLogMel(feature_size=80).fingerprint() != WhisperLogMel(feature_size=128).fingerprint()
    assert json.loads(json.dumps(clip.as_dict())) == clip.as_dict()  # plain JSON types
    # The cache key of the defaults is pinned: changing the settings' fields or the computation's version must
    # be a visible decision (bump VERSION), not an accident that silently reuses or drops cached features.
    assert AstFbank().fingerprint() == "40ada85b2f548fa9"
    assert FrameGeometry().fingerprint() == "f45734f9d54e1b91"


# --- frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("height, width", [(360, 640), (577, 1024), (640, 360), (100, 150)],
                         ids=["landscape", "odd-large", "portrait", "smaller-than-crop"])
def test_pixel_values_match_the_checkpoints_image_processor(tmp_path, name, height, width):
    processor = PROCESSORS[name]()
    settings = read_preprocessing(saved(processor, tmp_path))
    frames = scene(3, height, width)
    theirs = processor(list(frames), return_tensors="pt")["pixel_values"]
    assert_frames_match(pixel_values(frames, settings), theirs, settings.normalization.std)


def test_portrait_shrinks_vertically_first_as_pillow_does():
    """Pillow 13 runs the vertical pass first when the height loses over twice the width's pixels; on hard
    edges the other order is ~10 grey levels off (bicubic overshoot clips between the passes)."""
    processor = SiglipImageProcessor()
    frames = scene(2, 640, 360, seed=3)
    frames[..., 2] = np.where(frames[..., 2] > 100, 255, 0)  # saturated edges: overshoot clips
    settings = preprocessing_from_dict(processor.to_dict())
    theirs = processor(list(frames), return_tensors="pt")["pixel_values"]
    assert_frames_match(pixel_values(frames, settings), theirs, settings.normalization.std)


def test_geometry_is_uint8_of_the_output_size_and_normalize_finishes_it():
    settings = preprocessing_from_dict(dinov2_small().to_dict())
    frames = scene(4, 360, 640)
    pixels = geometry(frames, settings.geometry)
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 224, 224) and pixels.is_contiguous()
    assert settings.geometry.output_size(360, 640) == (224, 224)
    assert settings.geometry.resized_size(360, 640) == (256, 455)  # int(256 * 640 / 360)
    assert settings.geometry.resized_size(640, 360) == (455, 256)
    assert torch.equal(normalize(pixels, settings.normalization), pixel_values(frames, settings))
    assert torch.equal(geometry(frames[0], settings.geometry), pixels[:1])  # one [H, W, 3] frame is a batch of 1
    assert geometry(frames[:0], settings.geometry).shape == (0, 3, 224, 224)


def test_a_crop_larger_than_the_frame_pads_with_zeros_like_transformers(tmp_path):
    processor = BitImageProcessor(do_resize=False, crop_size={"height": 224, "width": 224})
    settings = read_preprocessing(saved(processor, tmp_path))
    frames = scene(2, 101, 150)  # odd padding on one side
    theirs = processor(list(frames), return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixel_values(frames, settings), theirs, atol=1e-5, rtol=0)  # no resampling: exact


def test_pixel_normalizer_is_the_module_the_model_holds():
    settings = PixelNormalization(mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD))
    module = PixelNormalizer(settings)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = (pixels.double() / 255 - torch.tensor(IMAGENET_MEAN).double().view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).double().view(1, 3, 1, 1)
    assert torch.allclose(module(pixels).double(), expected, atol=1e-5)
    assert not module.state_dict()  # nothing to load or ship: the buffers are rebuilt from the settings
    raw = PixelNormalizer(PixelNormalization(rescale_factor=None, mean=None, std=None))
    assert torch.equal(raw(pixels), pixels.float())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pixel_normalizer_exports_to_onnx_and_runs_the_same_in_onnxruntime():
    import onnxruntime

    module = PixelNormalizer(PixelNormalization(mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD)))
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.zeros(1, 3, 224, 224, dtype=torch.uint8),), buffer, dynamo=False,
                      input_names=["pixels"], dynamic_axes={"pixels": {0: "batch"}})
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    pixels = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    [exported] = session.run(None, {"pixels": pixels.numpy()})
    assert np.abs(exported - module(pixels).numpy()).max() <= 1e-6


@pytest.mark.parametrize("bad", [np.zeros((2, 10, 10, 4), np.uint8), np.zeros((2, 10, 10, 3), np.float32),
                                 np.zeros((10, 10), np.uint8), np.zeros((1, 0, 10, 3), np.uint8)],
                         ids=["rgba", "float", "grey", "empty"])
def test_frames_that_are_not_uint8_rgb_are_refused(bad):
    with pytest.raises(PreprocessingError, match="frames"):
        geometry(bad, FrameGeometry())


# --- AST fbank ---------------------------------------------------------------------------


def _ast(wave: np.ndarray | list[np.ndarray], extractor: ASTFeatureExtractor | None = None) -> torch.Tensor:
    return torch.from_numpy((extractor or ASTFeatureExtractor())(wave, sampling_rate=SR, return_tensors="np")
                            ["input_values"])


@pytest.mark.parametrize("seconds", [10.0, 1.0, 0.0255, 12.5], ids=["10s", "1s", "two-frames", "over-max-length"])
def test_ast_fbank_matches_ast_feature_extractor(seconds):
    wave = chirp(seconds)
    ours = ast_fbank(wave, AstFbank(), SR)
    assert ours.shape == (1, 1024, 128) and ours.dtype == torch.float32
    assert float((ours - _ast(wave)).abs().max()) <= 1e-4


def test_ast_fbank_of_a_ragged_batch_matches_clip_by_clip():
    batch = [chirp(2.0, seed=1), chirp(0.5, seed=2), 0.5 * chirp(3.0, seed=3)]
    ours = ast_fbank(batch, AstFbank(), SR)
    assert ours.shape == (3, 1024, 128)
    assert float((ours - _ast(batch)).abs().max()) <= 1e-4


def test_ast_fbank_of_silence_is_the_log_floor_and_padding_stays_zero_before_scaling():
    settings = AstFbank()
    ours = ast_fbank(np.zeros(SR, np.float32), settings, SR)[0]
    floor = (np.log(np.float32(1.192092955078125e-07)) - settings.mean) / (2 * settings.std)
    padding = (0.0 - settings.mean) / (2 * settings.std)
    assert torch.allclose(ours[:98], torch.full((98, 128), float(floor)), atol=1e-5)  # 1 s = 98 frames
    assert torch.allclose(ours[98:], torch.full((1024 - 98, 128), float(padding)), atol=1e-6)
    assert float((ours - _ast(np.zeros(SR, np.float32))[0]).abs().max()) <= 1e-4


def test_ast_clip_shorter_than_one_frame_is_all_padding():
    """Under 400 samples there is no whole frame. transformers agrees from 240 samples and raises below."""
    settings = AstFbank()
    padding = torch.full((1, 1024, 128), (0.0 - settings.mean) / (2 * settings.std))
    for samples in (300, 399):
        ours = ast_fbank(chirp(samples / SR), settings, SR)
        assert torch.allclose(ours, padding) and float((ours - _ast(chirp(samples / SR))).abs().max()) <= 1e-4
    assert torch.allclose(ast_fbank(chirp(100 / SR), settings, SR), padding)
    assert torch.allclose(ast_fbank(np.zeros(0, np.float32), settings, SR), padding)


def test_ast_without_normalisation_gives_the_raw_log_mel():
    extractor = ASTFeatureExtractor(do_normalize=False, num_mel_bins=64, max_length=300)
    wave = chirp(4.0)
    ours = ast_fbank(wave, AstFbank(do_normalize=False, num_mel_bins=64, max_length=300), SR)
    assert ours.shape == (1, 300, 64)
    assert float((ours - _ast(wave, extractor)).abs().max()) <= 1e-4


# --- Whisper log-mel -----------------------------------------------------------------------


@pytest.mark.parametrize("feature_size", [80, 128])
@pytest.mark.parametrize("seconds", [10.0, 0.2, 29.99, 35.0], ids=["10s", "short", "just-under-30s", "over-30s"])
def test_whisper_log_mel_matches_whisper_feature_extractor(feature_size, seconds):
    extractor = WhisperFeatureExtractor(feature_size=feature_size)
    wave = chirp(seconds)
    theirs = torch.from_numpy(extractor(wave, sampling_rate=SR, return_tensors="np")["input_features"])
    ours = whisper_log_mel(wave, WhisperLogMel(feature_size=feature_size), SR)
    assert ours.shape == (1, feature_size, 3000) and ours.dtype == torch.float32
    assert float((ours - theirs).abs().max()) <= 1e-5


def test_whisper_batch_and_silence_match_clip_by_clip():
    extractor = WhisperFeatureExtractor(feature_size=80)
    batch = [chirp(1.0), np.zeros(SR // 2, np.float32), 0.2 * chirp(12.0, seed=4)]
    theirs = torch.from_numpy(extractor(batch, sampling_rate=SR, return_tensors="np")["input_features"])
    ours = whisper_log_mel(batch, WhisperLogMel(), SR)
    assert float((ours - theirs).abs().max()) <= 1e-5
    assert torch.all(ours[1] == (-10.0 + 4.0) / 4.0)  # digital silence: log10(1e-10), nothing above it


# --- wav2vec2 / HuBERT waveform -------------------------------------------------------------


def test_raw_waveform_matches_wav2vec2_feature_extractor():
    wave = chirp(10.0) + 0.05  # a DC offset, which normalisation removes
    theirs = Wav2Vec2FeatureExtractor()(wave, sampling_rate=SR, return_tensors="pt")["input_values"]
    ours = raw_waveform(wave, RawWaveform(), SR)
    assert ours.input_values.shape == (1, wave.size) and float((ours.input_values - theirs).abs().max()) <= 1e-6
    assert ours.attention_mask is None  # wav2vec2-base's extractor returns none either


def test_raw_waveform_of_a_ragged_batch_normalises_each_clip_over_its_own_samples():
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)  # e.g. wav2vec2-large-lv60's
    batch = [chirp(1.0), 3 * chirp(2.5, seed=5) + 0.1, chirp(0.3, seed=6)]
    theirs = extractor(batch, sampling_rate=SR, return_tensors="pt", padding=True)
    ours = raw_waveform(batch, RawWaveform(return_attention_mask=True), SR)
    assert float((ours.input_values - theirs["input_values"]).abs().max()) <= 1e-6
    assert torch.equal(ours.attention_mask, theirs["attention_mask"].to(torch.int32))
    plain = raw_waveform(batch, RawWaveform(do_normalize=False, padding_value=0.5), SR)
    assert torch.equal(plain.input_values[2, : 4800], torch.from_numpy(batch[2]))
    assert torch.all(plain.input_values[2, 4800:] == 0.5)


# --- audio inputs refused ---------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda w, r: ast_fbank(w, AstFbank(), r),
    lambda w, r: whisper_log_mel(w, WhisperLogMel(), r),
    lambda w, r: raw_waveform(w, RawWaveform(), r),
], ids=["ast", "whisper", "wav2vec2"])
@pytest.mark.parametrize("wave, rate, reason", [
    (chirp(1.0), 44100, "44100 Hz, the checkpoint expects 16000 Hz"),
    (np.stack([chirp(1.0), chirp(1.0)], axis=1), SR, r"looks like \[samples, channels\]"),
    (np.zeros((2, 2, SR), np.float32), SR, "mix channels to mono"),
    ((chirp(1.0) * 32767).astype(np.int16), SR, "int16"),
    (np.full(SR, np.nan, np.float32), SR, "NaN"),
], ids=["44k1", "stereo-channels-last", "3d", "int16", "nan"])
def test_audio_the_checkpoint_cannot_take_is_refused_with_the_reason(call, wave, rate, reason):
    with pytest.raises(PreprocessingError, match=reason):
        call(wave, rate)


# --- decoded media -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """H.264 + AAC of the synthetic scene (360x640) and chirp: what a device decodes."""
    path = tmp_path_factory.mktemp("clip") / "scene.mp4"
    frames, wave = scene(6, 360, 640, seed=9), chirp(2.0, seed=9)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=6)
        video.width, video.height, video.pix_fmt = 640, 360, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "18", "threads": "1"}
        audio = out.add_stream("aac", rate=SR, layout="mono")
        for i, frame in enumerate(frames):
            encoded = av.VideoFrame.from_ndarray(frame, format="rgb24")
            encoded.pts = i
            out.mux(video.encode(encoded))
        out.mux(video.encode(None))
        for start in range(0, wave.size, 1024):
            chunk = av.AudioFrame.from_ndarray(wave[None, start: start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = SR, start, Fraction(1, SR)
            out.mux(audio.encode(chunk))
        out.mux(audio.encode(None))
    return path


def decoded_frames(path: Path, count: int) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(count), container.decode(video=0))]
    return np.stack(frames)


def check_decoded(video: Path, frames: int) -> None:
    rgb = decoded_frames(video, frames)
    for name in ("clip", "dinov2"):
        processor = PROCESSORS[name]()
        settings = preprocessing_from_dict(processor.to_dict())
        theirs = processor(list(rgb), return_tensors="pt")["pixel_values"]
        assert_frames_match(pixel_values(rgb, settings), theirs, settings.normalization.std)
    wave = decode_audio(str(video), SR)
    assert wave is not None and wave.size > SR
    assert float((ast_fbank(wave, AstFbank(), SR) - _ast(wave)).abs().max()) <= 1e-4
    whisper = torch.from_numpy(WhisperFeatureExtractor()(wave, sampling_rate=SR, return_tensors="np")["input_features"])
    assert float((whisper_log_mel(wave, WhisperLogMel(), SR) - whisper).abs().max()) <= 1e-5


def test_decoded_h264_and_aac_match_the_processors(encoded_clip):
    check_decoded(encoded_clip, 6)


@pytest.mark.skipif(not (REAL_MEDIA / "chaplin.mp4").exists(), reason="real clips are not on this machine")
def test_a_real_clip_matches_the_processors():
    check_decoded(REAL_MEDIA / "chaplin.mp4", 8)
