"""Every supported encoder family through the model's whole loop, from a local checkpoint.

A tiny random checkpoint of each family (tests/checkpoints.py, `save_pretrained`) becomes the
base: a real clip is extracted with the checkpoint's own preprocessing, LoRA trains a few steps,
the merged model exports to ONNX and INT8, and the publisher's parity gate publishes it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgefed.cloud.publishing import onnx_export
from edgefed.cloud.publishing.onnx_export import QUANTIZED_MATMULS, example_inputs, export_quantized, merged_model
from edgefed.cloud.publishing.publisher import MODEL_FILE, ModelPublisher
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.config import ConfigError, EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.keys import init_keys, load_cloud_signing_key
from edgefed.common.model.classifier import _sounding_frames
from edgefed.common.model.inputs import model_inputs
from edgefed.common.model.lora import base_fingerprint, build_lora_model, get_adapter_state
from edgefed.common.onnx_inference import INPUT_NAMES, open_session
from edgefed.common.preprocessing import whisper_log_mel
from edgefed.common.training import train_adapter
from edgefed.edge.dataset import clip_features
from edgefed.simulations.media_cases import write_video
from tests.checkpoints import make_checkpoint

# Each frame family with the AST audio encoder, each audio family with ViT.
PAIRS = [(v, "ast") for v in ("vit", "vit-classifier", "deit", "dinov2", "clip", "siglip")] + [
    ("vit", a) for a in ("whisper", "wav2vec2", "hubert")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    kinds = {kind for pair in PAIRS for kind in pair}
    return {kind: make_checkpoint(kind, root / kind).path for kind in kinds}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [write_video(root / f"clip{i}.mp4", [12, 12 + 6 * i], width=96 + 32 * i, height=72, fps=8,
                        beep_ms=500.0 + 700 * i).path for i in range(3)]


def _config(checkpoints, video: str, audio: str, **overrides) -> EdgefedConfig:
    # audio-frames 32: 0.32 s raw-waveform windows (wav2vec2, HuBERT), 512 encoder frames; AST and Whisper take
    # their checkpoint's fixed length
    settings = dict(hidden_size=32, num_heads=2, intermediate_size=64, num_keyframes=2, learning_rate=0.01,
                    audio_frames=32)
    return EdgefedConfig(video_encoder=str(checkpoints[video]), audio_encoder=str(checkpoints[audio]),
                         **{**settings, **overrides})


@pytest.mark.parametrize(("video", "audio"), PAIRS, ids=[f"{v}+{a}" for v, a in PAIRS])
def test_a_checkpoint_pair_extracts_trains_exports_and_publishes(tmp_path, checkpoints, clips, video, audio):
    cfg = _config(checkpoints, video, audio)
    data = FeatureSet.concat([clip_features(str(c), cfg, label=i % cfg.num_classes) for i, c in enumerate(clips)])
    shapes = model_inputs(cfg).shapes()
    assert {name: tuple(getattr(data, name).shape[1:]) for name in shapes} == shapes
    assert bool(data.frame_mask.all()) and bool(data.audio_mask.any()), "every clip has frames and sound"

    model = build_lora_model(cfg)
    base, before = base_fingerprint(model), get_adapter_state(model)
    result = train_adapter(model, (data.batches(3) for _ in range(4)), cfg.training)
    after = get_adapter_state(model)
    assert np.isfinite(result.loss) and result.steps == 4
    for prefix in ("base_model.model.video_encoder.", "base_model.model.audio_encoder."):
        moved = [n for n in after if n.startswith(prefix) and "lora_B" in n and not torch.equal(after[n], before[n])]
        assert moved, f"no LoRA tensor of {prefix} trained"
    assert base_fingerprint(model) == base, "the frozen base moved"

    init_keys("cloud", tmp_path / "keys")
    registry = ModelRegistry(tmp_path / "models")
    publisher = ModelPublisher(cfg, registry, load_cloud_signing_key(tmp_path / "keys"), data, base)
    outcome = publisher.publish(1, after)  # merge, export, INT8, parity gate on these clips, sign
    assert outcome.published and outcome.argmax_agreement >= cfg.parity_min_agreement, outcome.reason
    published = onnx.load(str(registry.directory(1) / MODEL_FILE))
    assert any(n.op_type in QUANTIZED_MATMULS for n in published.graph.node)
    assert [tuple(d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim) for i in published.graph.input] \
        == [("batch", *shape) for shape in shapes.values()]


def test_attentions_of_different_head_counts_export_correctly(tmp_path, checkpoints):
    """The fusion's 4 heads beside the encoders' 2: one head count for every attention would be wrong."""
    cfg = _config(checkpoints, "dinov2", "ast", num_heads=4)
    model = merged_model(cfg, get_adapter_state(build_lora_model(cfg)))
    paths = export_quantized(model, cfg, tmp_path, ())
    inputs = example_inputs(cfg, 2)
    with torch.inference_mode():
        expected = model(*inputs).numpy()
    got = open_session(str(paths["fp32"]), 1).run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))[0]
    assert np.abs(got - expected).max() < 1e-4


def test_an_export_whose_inputs_lost_their_shape_is_refused(tmp_path, checkpoints, monkeypatch):
    cfg = _config(checkpoints, "vit", "whisper")
    model = merged_model(cfg, get_adapter_state(build_lora_model(cfg)))
    real = onnx_export.model_inputs

    def other_window(c):  # what the exporter would have fixed had it taken the sample's time axis
        inputs = real(c)
        return type(inputs)(inputs.frames, type(inputs.audio)(inputs.audio.preprocessing, 1, 1, (16, 31)),
                            inputs.num_keyframes)

    paths = export_quantized(model, cfg, tmp_path / "ok", ())
    assert paths["fp32"].exists()
    monkeypatch.setattr(onnx_export, "model_inputs", other_window)
    with pytest.raises(onnx_export.ExportError, match="exported input audio has shape"):
        onnx_export._check_input_shapes(onnx.load(str(paths["fp32"])), cfg)


def test_an_int8_export_without_quantized_matmuls_is_refused(tmp_path, checkpoints, monkeypatch):
    cfg = _config(checkpoints, "vit", "ast")
    model = merged_model(cfg, get_adapter_state(build_lora_model(cfg)))
    paths = export_quantized(model, cfg, tmp_path / "fp32", ())
    monkeypatch.setattr(onnx_export, "_quantize_int8", lambda src, dst: dst.write_bytes(src.read_bytes()))
    with pytest.raises(onnx_export.ExportError, match="left no MatMul quantized"):
        onnx_export.quantize(paths["fp32"], tmp_path / "int8.onnx", "int8")


def test_an_encoder_of_the_wrong_modality_or_sample_rate_is_refused(checkpoints):
    with pytest.raises(ConfigError, match="is for audio"):
        model_inputs(_config(checkpoints, "ast", "ast"))
    with pytest.raises(ConfigError, match="is for images"):
        model_inputs(_config(checkpoints, "vit", "vit"))
    with pytest.raises(ConfigError, match="set sample-rate = 16000"):
        model_inputs(_config(checkpoints, "vit", "ast", sample_rate=22050))


def test_whisper_is_read_out_over_the_frames_that_hold_sound_not_its_padding(checkpoints):
    """Whisper pads every input to its chunk; the audio token of a short clip must not be mostly padding."""
    cfg = _config(checkpoints, "vit", "whisper")
    model = build_lora_model(cfg).base_model.model.eval()
    settings = model_inputs(cfg).audio.preprocessing
    tone = np.sin(np.arange(settings.n_samples // 2) * 0.3).astype(np.float32)  # half the chunk holds sound
    features = whisper_log_mel(tone, settings, cfg.sample_rate)  # [1, M, T]
    assert _sounding_frames(features)[0].float().mean() == pytest.approx(0.5, abs=0.1)
    present = torch.ones(1, 1, dtype=torch.bool)
    with torch.inference_mode():
        token = model.encode_audio(features[:, None], present)
        hidden = model.audio_encoder(input_features=features).last_hidden_state  # [1, T/2, D]
        kept = model.encoders["audio_encoder"].frame_mask(_sounding_frames(features), hidden.shape[1])[..., None]
        sounding = (hidden * kept).sum(dim=1) / kept.sum()
    assert 0.4 < float(kept.float().mean()) < 0.65
    assert torch.allclose(token, model.audio_proj(sounding), atol=1e-2)
    assert not torch.allclose(token, model.audio_proj(hidden.mean(dim=1)), atol=1e-2)
