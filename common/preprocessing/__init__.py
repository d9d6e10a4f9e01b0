"""Exactly-the-checkpoint preprocessing: a pretrained checkpoint's own image and audio inputs, fast.

`read_preprocessing(checkpoint_dir)` reads the checkpoint's
`preprocessor_config.json` into typed settings; one function per kind turns
decoded media into what that checkpoint's transformers processor would give:

    ImagePreprocessing  geometry() -> uint8 frames to cache; normalize() / PixelNormalizer in the model
    AstFbank            ast_fbank()        input_values [B, 1024, 128]
    WhisperLogMel       whisper_log_mel()  input_features [B, 80|128, 3000]
    RawWaveform         raw_waveform()     input_values [B, T] (+ attention_mask if the checkpoint takes one)

Each module's docstring says what transformers computes and how this matches it;
tests/test_preprocessing.py measures the parity, benchmarks/bench_preprocessing.py the speed.
"""

from edgefed.common.preprocessing.ast_fbank import ast_fbank
from edgefed.common.preprocessing.frames import PixelNormalizer, geometry, normalize, pixel_values
from edgefed.common.preprocessing.settings import (
    AstFbank,
    FrameGeometry,
    ImagePreprocessing,
    PixelNormalization,
    Preprocessing,
    PreprocessingError,
    RawWaveform,
    WhisperLogMel,
    preprocessing_from_dict,
    read_preprocessing,
)
from edgefed.common.preprocessing.waveform import WaveformBatch, raw_waveform
from edgefed.common.preprocessing.whisper_mel import whisper_log_mel

__all__ = [
    "AstFbank", "FrameGeometry", "ImagePreprocessing", "PixelNormalization", "PixelNormalizer", "Preprocessing",
    "PreprocessingError", "RawWaveform", "WaveformBatch", "WhisperLogMel", "ast_fbank", "geometry", "normalize",
    "pixel_values", "preprocessing_from_dict", "raw_waveform", "read_preprocessing", "whisper_log_mel",
]
