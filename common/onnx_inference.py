"""Running the exported model with onnxruntime: the contract both sides share.

The cloud uses it for the parity gate and held-out metrics of an export;
devices use it for inference and for federated evaluation of the model they
actually run. Input and output names are part of the model manifest.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import torch
from torch.nn import functional as F

from edgefed.common.data.features import FeatureSet
from edgefed.common.evaluation import EvalResult

INPUT_NAMES = ("frames", "frame_mask", "audio", "audio_mask")
OUTPUT_NAMES = ("logits",)


def open_session(path: str, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with a fixed thread budget (a device shares its cores with training)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise on devices
    # Our models have no QDQ pairs meant for an accelerator: with QDQ handling off,
    # onnxruntime folds the INT8-stored conv weights to float once at load (~0.2 ms a call).
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds(batch: FeatureSet) -> dict[str, np.ndarray]:
    return {
        "frames": batch.frames.numpy(),
        "frame_mask": batch.frame_mask.numpy(),
        "audio": batch.audio.float().numpy(),
        "audio_mask": batch.audio_mask.numpy(),
    }


def onnx_logits(session: ort.InferenceSession, data: FeatureSet, batch_size: int) -> torch.Tensor:
    """Logits [N, C] for every clip of `data`, in order."""
    parts = [torch.from_numpy(session.run(list(OUTPUT_NAMES), feeds(batch))[0]) for batch in data.batches(batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def evaluate_onnx(session: ort.InferenceSession, data: FeatureSet, batch_size: int) -> EvalResult:
    """Mean cross-entropy and accuracy of an ONNX model over labelled clips."""
    if len(data) == 0:
        return EvalResult(loss=0.0, accuracy=0.0, examples=0)
    logits = onnx_logits(session, data, batch_size)
    loss = F.cross_entropy(logits, data.labels, reduction="mean").item()
    accuracy = float((logits.argmax(dim=1) == data.labels).float().mean())
    return EvalResult(loss=loss, accuracy=accuracy, examples=len(data))


def single_clip_latency_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int = 20) -> float:
    """Median milliseconds of one forward pass on one clip (after warm-up): what a device waits per prediction."""
    one = {name: array[:1] for name, array in feed.items()}
    for _ in range(3):
        session.run(list(OUTPUT_NAMES), one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(list(OUTPUT_NAMES), one)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
