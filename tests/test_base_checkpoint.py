"""The cloud's warm start as a base checkpoint directory: written by the trainer, loaded back as the same model.

`edgefed cloud train` writes <out>/checkpoint (video/, audio/: each encoder via save_pretrained; head.safetensors:
projections, fusion, head). A federation started from it with `base-checkpoint` loads both encoders through the
registry (a trained tiny encoder as tiny, a family encoder as its family), the head strictly, and devices get the
encoders from the model service like any checkpoint base.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgefed.cloud.publishing.base_registry import BaseRegistry
from edgefed.cloud.training.ddp_trainer import train
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.encoders import TINY_MARKER, EncoderCheckpointError, load_encoder
from edgefed.common.keys import init_keys, load_cloud_signing_key
from edgefed.common.model.base_checkpoint import HEAD_FILE, BaseCheckpointError, federation_settings
from edgefed.common.model.classifier import build_base_model
from edgefed.common.model.inputs import model_inputs
from edgefed.common.model.lora import (
    base_identity,
    build_lora_model,
    checkpoint_dirs,
    get_adapter_state,
    installed_base_config,
    set_adapter_state,
)
from tests.checkpoints import make_checkpoint
from tests.feature_batches import random_features

MODEL = ["hidden-size=32", "num-layers=1", "num-heads=2", "intermediate-size=64", "image-size=32", "n-mels=32",
         "audio-frames=32", "num-keyframes=2"]
TRAINER = ["trainer-batch-size=8", "trainer-steps=4", "trainer-warmup-steps=1", "trainer-learning-rate=0.002",
           "trainer-checkpoint-every=100"]


def _features(cfg: EdgefedConfig, n: int = 16, seed: int = 0) -> FeatureSet:
    return random_features(cfg, n, seed)


def _logits(model: torch.nn.Module, data: FeatureSet) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(data.frames, data.frame_mask, data.audio, data.audio_mask)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny base trained by the cloud trainer: (run config, data, trained model, its checkpoint)."""
    cfg = EdgefedConfig().with_overrides([*MODEL, *TRAINER])
    data = _features(cfg)
    summary, model = train(cfg, data, tmp_path_factory.mktemp("tiny-run"))
    return cfg, data, model, summary.base_checkpoint


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """The same on a ViT + AST checkpoint pair (tests/checkpoints.py)."""
    root = tmp_path_factory.mktemp("family-run")
    vit, ast = make_checkpoint("vit", root).path, make_checkpoint("ast", root).path
    cfg = EdgefedConfig().with_overrides([*MODEL, *TRAINER, f"video-encoder={vit}", f"audio-encoder={ast}"])
    data = _features(cfg)
    summary, model = train(cfg, data, root / "out")
    return cfg, data, model, summary.base_checkpoint


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of a base checkpoint to tamper with."""
    return Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))


# --- what train writes --------------------------------------------------------------------------
def test_train_writes_a_checkpoint_directory_of_marked_tiny_encoders_and_a_head(tiny_run):
    _, _, model, checkpoint = tiny_run
    assert sorted(p.name for p in checkpoint.iterdir()) == ["audio", HEAD_FILE, "video"]
    for part, model_type in (("video", "vit"), ("audio", "audio-spectrogram-transformer")):
        config = json.loads((checkpoint / part / "config.json").read_text())
        assert config["model_type"] == model_type and config[TINY_MARKER] == "tiny"
        assert (checkpoint / part / "model.safetensors").is_file()
        assert not (checkpoint / part / "preprocessor_config.json").exists()  # tiny features: the run config's
    head = load_file(str(checkpoint / HEAD_FILE))
    assert head and not any(name.startswith(("video_encoder.", "audio_encoder.")) for name in head)
    assert federation_settings(checkpoint, model) == [f"base-checkpoint={checkpoint}"]


def test_a_family_checkpoint_keeps_its_layout_and_preprocessing(family_run):
    cfg, _, model, checkpoint = family_run
    for part, source in (("video", Path(cfg.video_encoder)), ("audio", Path(cfg.audio_encoder))):
        saved = json.loads((checkpoint / part / "config.json").read_text())
        assert TINY_MARKER not in saved
        assert saved["model_type"] == json.loads((source / "config.json").read_text())["model_type"]
        assert filecmp.cmp(checkpoint / part / "preprocessor_config.json", source / "preprocessor_config.json",
                           shallow=False)
    assert federation_settings(checkpoint, model) == [
        f"base-checkpoint={checkpoint}", f"video-encoder={checkpoint / 'video'}", f"audio-encoder={checkpoint / 'audio'}"]


# --- loading it back ----------------------------------------------------------------------------
def test_a_tiny_base_checkpoint_loads_back_as_the_trained_model_and_as_tiny(tiny_run):
    cfg, data, model, checkpoint = tiny_run
    warm = build_base_model(cfg.replace(base_checkpoint=str(checkpoint)))
    assert torch.equal(_logits(warm, data), _logits(model, data))
    for loaded in warm.encoders.values():  # the tiny family's readout, not ViT's CLS or AST's pooler
        assert loaded.spec.name == "tiny" and loaded.spec.readout == "mean"
    assert not torch.equal(_logits(build_base_model(cfg), data), _logits(model, data)), "the cold base differs"


def test_a_family_base_checkpoint_loads_back_as_the_trained_model_in_its_family(family_run):
    cfg, data, model, checkpoint = family_run
    for settings in ([f"base-checkpoint={checkpoint}"],  # keeping the encoders it was trained from
                     federation_settings(checkpoint, model)):  # what `edgefed cloud train` prints
        warm_cfg = cfg.with_overrides(settings)
        warm = build_base_model(warm_cfg)
        assert torch.equal(_logits(warm, data), _logits(model, data)), settings
        assert {a: e.spec.name for a, e in warm.encoders.items()} == {"video_encoder": "vit", "audio_encoder": "ast"}
        assert model_inputs(warm_cfg) == model_inputs(cfg)


def test_a_device_runs_the_clouds_model_from_the_published_base(tiny_run, tmp_path):
    """What a device installs (the signed base package: the encoders, no head) plus the global adapter it is
    sent is the cloud's warm model, tensor for tensor."""
    cfg, data, _, checkpoint = tiny_run
    warm_cfg = cfg.replace(base_checkpoint=str(checkpoint))
    server = build_lora_model(warm_cfg)
    init_keys("cloud", tmp_path / "keys")
    manifest = BaseRegistry(tmp_path / "bases").publish(*checkpoint_dirs(warm_cfg), load_cloud_signing_key(tmp_path / "keys"))
    folder = BaseRegistry(tmp_path / "bases").directory(manifest.fingerprint)
    assert not (folder / HEAD_FILE).exists()

    device_cfg = installed_base_config(warm_cfg, folder)
    device = build_lora_model(device_cfg, load_head=False)
    assert base_identity(device_cfg, device) == base_identity(warm_cfg, server) == manifest.fingerprint
    set_adapter_state(device, get_adapter_state(server))  # version 0 of the federation
    assert all(torch.equal(t, server.state_dict()[n]) for n, t in device.state_dict().items())
    assert torch.equal(_logits(device, data), _logits(server, data))


# --- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tamper", ["missing", "unexpected", "shape", "dtype", "truncated"])
def test_a_tampered_or_mismatched_head_file_is_refused_naming_the_file_and_tensor(tiny_run, tmp_path, tamper):
    cfg, _, _, checkpoint = tiny_run
    copy = _copy(checkpoint, tmp_path)
    file = copy / HEAD_FILE
    head = load_file(str(file))
    name = "head.1.weight"
    if tamper == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
        expected = "unreadable"
    else:
        if tamper == "missing":
            del head[name]
        elif tamper == "unexpected":
            head["head.2.weight"] = head[name].clone()
            name = "head.2.weight"
        elif tamper == "shape":
            head[name] = head[name][:-1].clone()
        else:
            head[name] = head[name].half()
        save_file(head, str(file))
        expected = name
    with pytest.raises(BaseCheckpointError, match=expected) as err:
        build_base_model(cfg.replace(base_checkpoint=str(copy)))
    assert str(file) in str(err.value)


def test_a_head_of_another_model_config_is_refused(tiny_run):
    cfg, _, _, checkpoint = tiny_run
    with pytest.raises(BaseCheckpointError, match=r"head\.1\.bias is \(4,\) .* the run config builds \(3,\)"):
        build_base_model(cfg.with_overrides(["labels=a,b,c", f"base-checkpoint={checkpoint}"]))


def test_a_tiny_encoder_of_another_shape_than_the_run_config_is_refused(tiny_run):
    cfg, _, _, checkpoint = tiny_run
    with pytest.raises(EncoderCheckpointError, match=r"image_size 32, the run config gives 64 \(image-size\)"):
        build_base_model(cfg.replace(image_size=64, base_checkpoint=str(checkpoint)))
    with pytest.raises(EncoderCheckpointError, match=r"hidden_size 32, the run config gives 48 \(hidden-size\)"):
        build_base_model(cfg.replace(hidden_size=48, base_checkpoint=str(checkpoint)))


def test_a_tiny_encoder_is_never_loaded_as_the_other_modality(tiny_run):
    cfg, _, _, checkpoint = tiny_run
    with pytest.raises(EncoderCheckpointError, match="cannot be the audio encoder"):
        load_encoder(checkpoint / "video", "audio", cfg)


def test_encoder_settings_that_would_feed_another_input_are_refused(tiny_run, family_run):
    cfg, _, _, tiny = tiny_run
    with pytest.raises(BaseCheckpointError, match="trained tiny encoder, but video-encoder is .*: leave video-encoder at tiny"):
        build_base_model(cfg.replace(base_checkpoint=str(tiny), video_encoder=str(family_run[3] / "video")))
    family_cfg, _, _, family = family_run
    with pytest.raises(BaseCheckpointError, match=f"vit checkpoint, but video-encoder is tiny: set video-encoder={family}/video"):
        build_base_model(family_cfg.replace(base_checkpoint=str(family), video_encoder="tiny"))


def test_the_old_safetensors_file_is_refused_with_what_to_do(tiny_run, tmp_path):
    cfg, _, model, _ = tiny_run
    old = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old))
    with pytest.raises(BaseCheckpointError, match=r"is a file: .*edgefed cloud train --out DIR.* writes DIR/checkpoint"):
        build_base_model(cfg.replace(base_checkpoint=str(old)))


def test_a_directory_that_is_not_a_base_checkpoint_is_refused(tiny_run, tmp_path):
    cfg, _, _, checkpoint = tiny_run
    copy = _copy(checkpoint, tmp_path)
    (copy / HEAD_FILE).unlink()
    with pytest.raises(BaseCheckpointError, match=f"no {HEAD_FILE}"):
        build_base_model(cfg.replace(base_checkpoint=str(copy)))
