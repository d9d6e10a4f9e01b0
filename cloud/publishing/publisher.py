"""Global version -> a published, signed, quantized ONNX model (or a logged refusal).

    adapter ─► merged FP32 model ─► ONNX ─► INT8/INT4 ─► parity gate ─► manifest, signed ─► registry

The parity gate runs the quantized model and PyTorch FP32 on the cloud's
held-out clips; if their argmax agrees on fewer than `parity-min-agreement`
of them, the version is not published and the reason goes to the log and to
`exports.jsonl`. Devices keep the model they have.

Exports run beside aggregation (`BackgroundPublisher`): one at a time, and
if versions arrive faster than exports finish, only the newest waits.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnxruntime as ort
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.cloud.publishing.onnx_export import ExportError, example_inputs, export_quantized, merged_model, scratch_dir
from edgefed.cloud.publishing.parity_gate import parity_refusal
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.model.classifier import MultimodalClassifier
from edgefed.common.onnx_inference import OUTPUT_NAMES, evaluate_onnx, onnx_logits, open_session, single_clip_latency_ms
from edgefed.common.wire.model_manifest import MANIFEST_FILE, ModelManifest, TensorSpec, describe_file, sign_manifest

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
PARITY_MAX_CLIPS = 512
_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(float)": "float32", "tensor(int64)": "int64"}


class ParityGateFailed(ExportError):
    """The quantized model disagrees with PyTorch FP32 too often to be published."""

    def __init__(self, agreement: float, reason: str) -> None:
        super().__init__(reason)
        self.agreement = agreement


@dataclass
class PublishOutcome:
    version: int
    published: bool
    reason: str  # why not, when not published
    quantization: str
    size_bytes: int = 0
    fp32_size_bytes: int = 0
    argmax_agreement: float = 0.0
    heldout_accuracy: float | None = None
    export_s: float = 0.0
    latency_ms_batch1: float | None = None  # median single-clip forward on the cloud's CPU

    def to_json(self) -> dict:
        return asdict(self)


class ModelPublisher:
    def __init__(self, cfg: EdgefedConfig, registry: ModelRegistry, signing_key: Ed25519PrivateKey,
                 heldout: FeatureSet | None, base_fingerprint: str) -> None:
        self.cfg = cfg
        self.registry = registry
        self.signing_key = signing_key
        self.heldout = heldout.subset(list(range(min(len(heldout), PARITY_MAX_CLIPS)))) if heldout else None
        self.base_fingerprint = base_fingerprint

    def publish(self, version: int, adapter: dict[str, torch.Tensor]) -> PublishOutcome:
        """Export, gate, sign and publish `version`; never raises for a bad model, it reports it."""
        start = time.perf_counter()
        quantization = self.cfg.export_quantization
        staging = scratch_dir(self.registry.root)
        try:
            model = merged_model(self.cfg, adapter)
            paths = export_quantized(model, self.cfg, staging, (quantization,))
            session = open_session(str(paths[quantization]), threads=torch.get_num_threads())
            agreeing, clips = self._parity(model, session)
            agreement = agreeing / clips
            refusal = parity_refusal(clips - agreeing, clips, self.cfg.parity_min_agreement, self.cfg.parity_confidence)
            if refusal is not None:
                raise ParityGateFailed(agreement, refusal)
            metrics = self._heldout_metrics(session)
            names = [i.name for i in session.get_inputs()]
            latency = single_clip_latency_ms(session, dict(zip(names, (t.numpy() for t in example_inputs(self.cfg, 1)))))
            fp32_size = paths["fp32"].stat().st_size
            paths[quantization].rename(staging / MODEL_FILE)
            paths["fp32"].unlink()
            manifest = self._manifest(version, session, staging / MODEL_FILE, quantization, metrics)
            (staging / MANIFEST_FILE).write_bytes(sign_manifest(manifest, self.signing_key))
            self.registry.publish(staging, version)
        except ExportError as err:
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("model v%d not published: %s", version, err)
            return PublishOutcome(version, False, str(err), quantization, export_s=time.perf_counter() - start,
                                  argmax_agreement=getattr(err, "agreement", 0.0))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        outcome = PublishOutcome(version, True, "", quantization, manifest.model_file.size, fp32_size,
                                 agreement, metrics.get("accuracy"), time.perf_counter() - start, round(latency, 3))
        log.info("published model v%d: %s %.2f MB, agreement %.4f, held-out accuracy %s (%.1f s)",
                 version, quantization, outcome.size_bytes / 1e6, agreement, metrics.get("accuracy"), outcome.export_s)
        return outcome

    def _parity(self, model: MultimodalClassifier, session: ort.InferenceSession) -> tuple[int, int]:
        """On how many of how many held-out clips (random inputs without any) both models pick the same class."""
        if self.heldout is not None and len(self.heldout):
            data = self.heldout
            with torch.inference_mode():
                expected = torch.cat([model(b.frames, b.frame_mask, b.audio, b.audio_mask).argmax(dim=1)
                                      for b in data.batches(self.cfg.eval_batch_size)])
            got = onnx_logits(session, data, self.cfg.eval_batch_size).argmax(dim=1)
        else:
            inputs = example_inputs(self.cfg, 64, seed=7)
            with torch.inference_mode():
                expected = model(*inputs).argmax(dim=1)
            names = [i.name for i in session.get_inputs()]
            got = torch.from_numpy(session.run(list(OUTPUT_NAMES), dict(zip(names, (t.numpy() for t in inputs))))[0])
            got = got.argmax(dim=1)
        return int((expected == got).sum()), len(expected)

    def _heldout_metrics(self, session: ort.InferenceSession) -> dict[str, float]:
        if self.heldout is None or not len(self.heldout) or bool((self.heldout.labels < 0).any()):
            return {}
        result = evaluate_onnx(session, self.heldout, self.cfg.eval_batch_size)
        return {"accuracy": result.accuracy, "loss": result.loss, "examples": float(result.examples)}

    def _manifest(self, version: int, session: ort.InferenceSession, model_file: Path, quantization: str,
                  metrics: dict[str, float]) -> ModelManifest:
        def spec(arg: ort.NodeArg) -> TensorSpec:
            shape = [d if isinstance(d, int) else "batch" for d in arg.shape]
            return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

        return ModelManifest(
            version=version, base_version=self.base_fingerprint,
            files=[describe_file(model_file)],
            inputs=[spec(a) for a in session.get_inputs()], outputs=[spec(a) for a in session.get_outputs()],
            feature_config=self.cfg.feature_config(), labels=self.cfg.label_names, quantization=quantization,
            metrics=metrics, federation=self.cfg.federation,
        )


class BackgroundPublisher:
    """Runs `publisher.publish` off the caller's thread; only the newest pending version is kept."""

    def __init__(self, publisher: ModelPublisher, on_outcome: Callable[[PublishOutcome], None]) -> None:
        self.publisher = publisher
        self.on_outcome = on_outcome
        self._cv = threading.Condition()
        self._pending: tuple[int, dict] | None = None
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="model-export", daemon=True)
        self._thread.start()

    def submit(self, version: int, adapter: dict[str, torch.Tensor]) -> None:
        with self._cv:
            if self._pending is not None:
                log.info("export of v%d superseded by v%d", self._pending[0], version)
            self._pending = (version, {k: v.clone() for k, v in adapter.items()})
            self._cv.notify_all()

    def drain(self) -> None:
        """Wait until nothing is pending or running."""
        with self._cv:
            self._cv.wait_for(lambda: self._pending is None and not self._busy)

    def close(self) -> None:
        self.drain()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                version, adapter = self._pending
                self._pending, self._busy = None, True
            try:
                self.on_outcome(self.publisher.publish(version, adapter))
            except Exception:  # an export bug must not kill the federation
                log.exception("model export of v%d failed", version)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
