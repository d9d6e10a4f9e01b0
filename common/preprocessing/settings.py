"""What a checkpoint's `preprocessor_config.json` asks for, as typed frozen settings.

`read_preprocessing(checkpoint_dir)` reads the file a Hugging Face checkpoint
saved with `save_pretrained` and returns one of four settings, chosen by the
`image_processor_type` / `feature_extractor_type` written in it:

    ViTImageProcessor, DeiTImageProcessor,            -> ImagePreprocessing
    BitImageProcessor (DINOv2), CLIPImageProcessor,
    SiglipImageProcessor (and their *Fast / *Pil /
    old *FeatureExtractor names)
    ASTFeatureExtractor                               -> AstFbank
    WhisperFeatureExtractor                           -> WhisperLogMel
    Wav2Vec2FeatureExtractor (wav2vec2, HuBERT)       -> RawWaveform

A key missing from the file takes the default of that processor class, as
transformers does when it loads the file (`ViTImageProcessor` has no centre
crop, `DeiTImageProcessor` resizes to 256x256 and crops 224, ...). Keys that
ask for something these settings cannot reproduce (another resample filter,
padding, dithering) raise PreprocessingError rather than being ignored.

Each settings object has `as_dict()` (plain JSON types) and `fingerprint()`
(16 hex digits of its sha256): the feature cache keys on it, so it covers what
the output depends on - the parameters and the algorithm version - and not the
processor's name. Image settings split in two: `geometry` (resize + crop, what
the cache stores as uint8) and `normalization` (rescale, mean, std: inside the
exported model), each with its own fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

CONFIG_NAME = "preprocessor_config.json"

Resample = Literal["bilinear", "bicubic"]
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values we reproduce

_HALF = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD


class PreprocessingError(ValueError):
    """A preprocessor config or an input cannot be handled; `subject` is the file or input it is about."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject
        self.reason = reason


class _Fingerprinted:
    """as_dict() / fingerprint() for a frozen settings dataclass; KIND and VERSION name the algorithm."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1  # bump when the computation changes, so cached features are not reused

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND, "version": self.VERSION}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Fingerprinted):
                value = value.as_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def fingerprint(self) -> str:
        payload = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _fail(self, reason: str) -> None:
        raise PreprocessingError(type(self).__name__, reason)


# --- image -------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameGeometry(_Fingerprinted):
    """Resize then centre-crop, on uint8 RGB frames (what the feature cache stores)."""

    KIND: ClassVar[str] = "frame_geometry"

    resize: tuple[int, int] | None = (224, 224)  # fixed (height, width); None: no fixed-size resize
    shortest_edge: int | None = None  # resize so the shorter side is this long, keeping the aspect ratio
    resample: Resample = "bilinear"  # PIL filter of the processor (antialiased when shrinking)
    crop: tuple[int, int] | None = None  # centre crop (height, width) after the resize; zero-padded if larger

    def __post_init__(self) -> None:
        if self.resize is not None and self.shortest_edge is not None:
            self._fail("give either a fixed resize or a shortest edge, not both")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or any(not isinstance(v, int) or v <= 0 for v in value)):
                self._fail(f"{name} must be (height, width) of positive ints, got {value!r}")
        if self.shortest_edge is not None and (not isinstance(self.shortest_edge, int) or self.shortest_edge <= 0):
            self._fail(f"shortest_edge must be a positive int, got {self.shortest_edge!r}")
        if self.resample not in _PIL_RESAMPLE.values():
            self._fail(f"resample must be one of {sorted(_PIL_RESAMPLE.values())}, got {self.resample!r}")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, for an input of this size (transformers' rounding)."""
        if self.resize is not None:
            return self.resize
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)  # truncates, as get_resize_output_image_size does
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of `geometry(...)`'s frames for an input of this size."""
        return self.crop if self.crop is not None else self.resized_size(height, width)


@dataclass(frozen=True)
class PixelNormalization(_Fingerprinted):
    """uint8 -> float pixel_values: x * rescale_factor, then (x - mean) / std per channel."""

    KIND: ClassVar[str] = "pixel_normalization"

    rescale_factor: float | None = 1 / 255  # None: do_rescale is off
    mean: tuple[float, float, float] | None = _HALF  # None: do_normalize is off
    std: tuple[float, float, float] | None = _HALF

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            self._fail("mean and std are both set or both None")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
                self._fail(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
        if self.std is not None and any(v == 0 for v in self.std):
            self._fail(f"std must be non-zero, got {self.std!r}")
        if self.rescale_factor is not None and not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            self._fail(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")


@dataclass(frozen=True)
class ImagePreprocessing(_Fingerprinted):
    """An image processor's settings: geometry (cached as uint8) and normalization (in the model)."""

    KIND: ClassVar[str] = "image"

    geometry: FrameGeometry = FrameGeometry()
    normalization: PixelNormalization = PixelNormalization()


# --- audio -------------------------------------------------------------------------


@dataclass(frozen=True)
class AstFbank(_Fingerprinted):
    """ASTFeatureExtractor: Kaldi fbank (25 ms / 10 ms at 16 kHz, 512-point FFT), padded to max_length frames."""

    KIND: ClassVar[str] = "ast_fbank"

    sampling_rate: int = 16000
    num_mel_bins: int = 128
    max_length: int = 1024  # frames; shorter clips are padded with zeros (before normalisation), longer cut
    do_normalize: bool = True
    mean: float = -4.2677393  # AudioSet statistics of the original AST
    std: float = 4.5689974

    def __post_init__(self) -> None:
        for name in ("sampling_rate", "num_mel_bins", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                self._fail(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.sampling_rate < 3200:
            self._fail(f"sampling_rate {self.sampling_rate} is too low for 400-sample frames and 20 Hz..Nyquist mels")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std != 0):
            self._fail(f"mean and std must be finite and std non-zero, got {self.mean!r}, {self.std!r}")


@dataclass(frozen=True)
class WhisperLogMel(_Fingerprinted):
    """WhisperFeatureExtractor: log10 mel of a clip padded or cut to chunk_length seconds."""

    KIND: ClassVar[str] = "whisper_log_mel"

    sampling_rate: int = 16000
    feature_size: int = 80  # mel bins: 80 (whisper up to large-v2) or 128 (large-v3)
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30  # seconds
    padding_value: float = 0.0

    def __post_init__(self) -> None:
        for name in ("sampling_rate", "feature_size", "n_fft", "hop_length", "chunk_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                self._fail(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_samples <= self.n_fft // 2:
            self._fail(f"chunk of {self.n_samples} samples is too short for n_fft {self.n_fft}")
        if not math.isfinite(self.padding_value):
            self._fail(f"padding_value must be finite, got {self.padding_value!r}")

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length


@dataclass(frozen=True)
class RawWaveform(_Fingerprinted):
    """Wav2Vec2FeatureExtractor (wav2vec2, HuBERT): the samples, optionally zero-mean unit-variance per clip."""

    KIND: ClassVar[str] = "raw_waveform"

    sampling_rate: int = 16000
    do_normalize: bool = True
    padding_value: float = 0.0  # what pads a shorter clip of a batch
    return_attention_mask: bool = False  # whether the model is meant to get the mask (feat_extract_norm "layer")

    def __post_init__(self) -> None:
        if not isinstance(self.sampling_rate, int) or self.sampling_rate <= 0:
            self._fail(f"sampling_rate must be a positive int, got {self.sampling_rate!r}")
        if not math.isfinite(self.padding_value):
            self._fail(f"padding_value must be finite, got {self.padding_value!r}")


Preprocessing = ImagePreprocessing | AstFbank | WhisperLogMel | RawWaveform


# --- reading a checkpoint ----------------------------------------------------------


@dataclass(frozen=True)
class _ImageDefaults:
    """What an image processor class uses for a key its saved file leaves out."""

    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: dict[str, int]
    crop_size: dict[str, int] | None
    do_center_crop: bool
    default_to_square: bool  # how an int `size` reads: square, or shortest edge


_IMAGE_DEFAULTS = {
    "ViT": _ImageDefaults(2, _HALF, _HALF, {"height": 224, "width": 224}, None, False, True),
    "DeiT": _ImageDefaults(3, _HALF, _HALF, {"height": 256, "width": 256}, {"height": 224, "width": 224}, True, True),
    "Bit": _ImageDefaults(3, _CLIP_MEAN, _CLIP_STD, {"shortest_edge": 224}, {"height": 224, "width": 224}, True, False),
    "CLIP": _ImageDefaults(3, _CLIP_MEAN, _CLIP_STD, {"shortest_edge": 224}, {"height": 224, "width": 224}, True, False),
    "Siglip": _ImageDefaults(3, _HALF, _HALF, {"height": 224, "width": 224}, None, False, False),
}
_AUDIO_TYPES = {
    "ASTFeatureExtractor": AstFbank,
    "WhisperFeatureExtractor": WhisperLogMel,
    "Wav2Vec2FeatureExtractor": RawWaveform,
}
# keys of an audio file that map onto a settings field under the same name
_AUDIO_KEYS = {
    AstFbank: ("sampling_rate", "num_mel_bins", "max_length", "do_normalize", "mean", "std"),
    WhisperLogMel: ("sampling_rate", "feature_size", "n_fft", "hop_length", "chunk_length", "padding_value"),
    RawWaveform: ("sampling_rate", "do_normalize", "padding_value", "return_attention_mask"),
}


# type name in the file -> family; the *Fast (torchvision) and *Pil backends share a family's settings
_IMAGE_TYPES = {
    **{f"{family}{suffix}": family for family in _IMAGE_DEFAULTS
       for suffix in ("ImageProcessor", "ImageProcessorFast", "ImageProcessorPil")},
    "ViTFeatureExtractor": "ViT", "DeiTFeatureExtractor": "DeiT", "CLIPFeatureExtractor": "CLIP",  # older files
}


def supported_types() -> list[str]:
    """The processor type names `read_preprocessing` accepts."""
    return sorted([*_IMAGE_TYPES, *_AUDIO_TYPES])


def read_preprocessing(checkpoint_dir: str | Path) -> Preprocessing:
    """The settings of the checkpoint's `preprocessor_config.json`; PreprocessingError naming the file otherwise."""
    path = Path(checkpoint_dir) / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PreprocessingError(str(path), "not found (a checkpoint saved with save_pretrained has one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreprocessingError(str(path), f"unreadable ({err})") from None
    if not isinstance(config, dict):
        raise PreprocessingError(str(path), f"expected a JSON object, got {type(config).__name__}")
    try:
        return preprocessing_from_dict(config)
    except PreprocessingError as err:
        raise PreprocessingError(str(path), err.reason) from None


def preprocessing_from_dict(config: Mapping[str, Any]) -> Preprocessing:
    """The settings a `preprocessor_config.json` dictionary describes (see read_preprocessing)."""
    name = config.get("image_processor_type") or config.get("feature_extractor_type")
    if not isinstance(name, str) or not name:
        raise PreprocessingError("config", "has neither image_processor_type nor feature_extractor_type")
    if name in _AUDIO_TYPES:
        return _audio_settings(_AUDIO_TYPES[name], name, config)
    if name in _IMAGE_TYPES:
        return _image_settings(_IMAGE_DEFAULTS[_IMAGE_TYPES[name]], name, config)
    raise PreprocessingError("config", f"unsupported processor type {name!r}; supported: {', '.join(supported_types())}")


def _image_settings(defaults: _ImageDefaults, name: str, config: Mapping[str, Any]) -> ImagePreprocessing:
    def get(key: str, default: Any) -> Any:
        value = config.get(key)
        return default if value is None else value  # transformers reads null as "the class default"

    for key in ("do_pad", "do_reduce_labels"):
        if get(key, False):
            raise PreprocessingError("config", f"{name}: {key}=true is not supported")

    resample_id = get("resample", defaults.resample)
    if resample_id not in _PIL_RESAMPLE:
        raise PreprocessingError("config", f"{name}: resample={resample_id!r} is not supported "
                                           f"(supported: {_PIL_RESAMPLE} as PIL.Image.Resampling values)")
    resize, shortest_edge = None, None
    if _flag(get("do_resize", True), "do_resize"):
        size = _size_dict(get("size", defaults.size), _flag(get("default_to_square", defaults.default_to_square),
                                                            "default_to_square"), "size")
        if set(size) == {"height", "width"}:
            resize = (size["height"], size["width"])
        elif set(size) == {"shortest_edge"}:
            shortest_edge = size["shortest_edge"]
        else:
            raise PreprocessingError("config", f"{name}: size {dict(size)} is not supported "
                                               "(height+width or shortest_edge)")
    crop = None
    if _flag(get("do_center_crop", defaults.do_center_crop), "do_center_crop"):
        crop_size = _size_dict(get("crop_size", defaults.crop_size), True, "crop_size")
        if set(crop_size) != {"height", "width"}:
            raise PreprocessingError("config", f"{name}: crop_size {dict(crop_size)} must have height and width")
        crop = (crop_size["height"], crop_size["width"])
    rescale = _number(get("rescale_factor", 1 / 255), "rescale_factor") if _flag(get("do_rescale", True),
                                                                                   "do_rescale") else None
    mean, std = None, None
    if _flag(get("do_normalize", True), "do_normalize"):
        mean, std = _per_channel(get("image_mean", defaults.mean), "image_mean"), _per_channel(
            get("image_std", defaults.std), "image_std")
    return ImagePreprocessing(
        geometry=FrameGeometry(resize=resize, shortest_edge=shortest_edge, resample=_PIL_RESAMPLE[resample_id],
                               crop=crop),
        normalization=PixelNormalization(rescale_factor=rescale, mean=mean, std=std),
    )


def _audio_settings(kind: type, name: str, config: Mapping[str, Any]) -> Preprocessing:
    if config.get("feature_size", 1) != 1 and kind is not WhisperLogMel:
        raise PreprocessingError("config", f"{name}: feature_size={config['feature_size']!r}: only mono (1) is supported")
    if kind is WhisperLogMel and config.get("dither", 0.0) not in (0, 0.0, None):
        raise PreprocessingError("config", f"{name}: dither={config['dither']!r} adds random noise; only 0.0 is supported")
    defaults = {f.name: f.default for f in dataclasses.fields(kind)}
    values = {}
    for key in _AUDIO_KEYS[kind]:
        value = config.get(key)
        if value is None:
            continue
        want = type(defaults[key])
        if want is bool:
            values[key] = _flag(value, key)
        elif want is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise PreprocessingError("config", f"{name}: {key} must be an int, got {value!r}")
            values[key] = value
        else:
            values[key] = _number(value, key)
    return kind(**values)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise PreprocessingError("config", f"{key} must be true or false, got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PreprocessingError("config", f"{key} must be a finite number, got {value!r}")
    return float(value)


def _size_dict(size: Any, default_to_square: bool, key: str) -> dict[str, int]:
    """transformers' get_size_dict: an int is a square or a shortest edge, a pair is (height, width)."""
    if isinstance(size, bool):
        raise PreprocessingError("config", f"{key} must be a size, got {size!r}")
    if isinstance(size, int):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, list | tuple) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict) or not size:
        raise PreprocessingError("config", f"{key} must be an int, a pair or a dict, got {size!r}")
    size = {k: v for k, v in size.items() if v is not None}
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in size.values()):
        raise PreprocessingError("config", f"{key} must hold positive ints, got {size!r}")
    return size


def _per_channel(value: Any, key: str) -> tuple[float, float, float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise PreprocessingError("config", f"{key} must be a number or 3 numbers (R, G, B), got {value!r}")
    return tuple(_number(v, key) for v in value)  # type: ignore[return-value]
