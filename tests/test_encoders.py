"""The encoder registry loads every family's real weights, reads each out to one vector, puts LoRA
exactly on the attention projections asked for, and refuses what would otherwise go wrong silently.

Checkpoints are tiny random ones written with `save_pretrained` (tests/checkpoints.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders import (
    REGISTRY,
    SUPPORTED_MODEL_TYPES,
    TINY_MARKER,
    TINY_SPECS,
    EncoderCheckpointError,
    base_fingerprint_of_checkpoint,
    check_lora_targets,
    load_encoder,
    lora_targets,
    readout,
    save_encoder,
)
from edgefed.common.encoders.audio import WHISPER_ENCODER_PREFIXES
from edgefed.common.encoders.checkpoint import verify_against_files
from edgefed.common.model.classifier import MultimodalClassifier
from tests.checkpoints import FAMILIES, LAYERS, Checkpoint, make_checkpoint, rewrite_weights

BATCH = 2
RAW_SAMPLES = 400  # wav2vec2/HuBERT take any length: 40 frames through the tiny conv stack


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("checkpoints")
    kinds = (*FAMILIES, "vit-classifier", "whisper-generation", "siglip-headless", "bert")
    return {kind: make_checkpoint(kind, root) for kind in kinds}


def _copy(checkpoint: Checkpoint, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint.path, tmp_path / checkpoint.path.name))


def _inputs(loaded, seed: int = 0) -> torch.Tensor:
    shape = [RAW_SAMPLES if size is None else size for size in loaded.input_shape]
    return torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(seed))


def _assert_same_weights(loaded_module: torch.nn.Module, saved: torch.nn.Module) -> None:
    loaded, reference = loaded_module.state_dict(), saved.state_dict()
    assert set(loaded) <= set(reference), sorted(set(loaded) - set(reference))[:5]
    for name, tensor in loaded.items():
        assert torch.equal(tensor, reference[name]), name


def test_the_registry_covers_the_families_by_model_type():
    assert set(SUPPORTED_MODEL_TYPES) == {
        "vit", "deit", "dinov2", "clip", "clip_vision_model", "siglip", "siglip_vision_model",
        "audio-spectrogram-transformer", "whisper", "wav2vec2", "hubert",
    }
    assert {REGISTRY[t].modality for t in ("vit", "deit", "dinov2", "clip", "siglip")} == {"frames"}
    assert {REGISTRY[t].modality for t in ("audio-spectrogram-transformer", "whisper", "wav2vec2", "hubert")} == {"audio"}
    assert REGISTRY["clip"] is REGISTRY["clip_vision_model"] and REGISTRY["siglip"] is REGISTRY["siglip_vision_model"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_family_loads_the_saved_weights_not_random_ones(checkpoints, kind):
    checkpoint = checkpoints[kind]
    loaded = load_encoder(checkpoint.path, checkpoint.modality)
    assert loaded.spec is REGISTRY[checkpoint.model_type]
    assert loaded.checkpoint_path == checkpoint.path
    _assert_same_weights(loaded.module, checkpoint.encoder)
    # every tensor of the saved encoder arrived, except a pooler ViT/DeiT never build
    absent = set(checkpoint.encoder.state_dict()) - set(loaded.module.state_dict())
    assert {name.split(".")[0] for name in absent} <= {"pooler"}
    assert loaded.num_layers == LAYERS and loaded.hidden_size == 32


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_forward_with_the_spec_input_shape_reads_out_one_vector_per_input(checkpoints, kind):
    checkpoint = checkpoints[kind]
    loaded = load_encoder(checkpoint.path, checkpoint.modality)
    inputs = _inputs(loaded)
    with torch.no_grad():
        vectors = loaded.encode(inputs)
        outputs = loaded.module(**{loaded.spec.input_name: inputs})
    assert vectors.shape == (BATCH, loaded.hidden_size)
    assert torch.isfinite(vectors).all()
    assert not torch.allclose(vectors[0], vectors[1])  # the content of each input, not a constant
    assert torch.equal(vectors, readout(loaded.spec, outputs))


def test_each_readout_is_the_one_its_family_was_trained_to_give(checkpoints):
    def run(kind):
        loaded = load_encoder(checkpoints[kind].path, checkpoints[kind].modality)
        inputs = _inputs(loaded)
        with torch.no_grad():
            return loaded, loaded.encode(inputs), loaded.module(**{loaded.spec.input_name: inputs})

    for kind in ("vit", "deit", "dinov2"):  # the CLS token after the final layernorm
        _, vectors, outputs = run(kind)
        assert torch.equal(vectors, outputs.last_hidden_state[:, 0])
    for kind in ("clip", "siglip", "ast"):  # the model's own pooler (CLIP: post-layernorm CLS; SigLIP: its head)
        _, vectors, outputs = run(kind)
        assert torch.equal(vectors, outputs.pooler_output)
    loaded, vectors, outputs = run("siglip-headless")  # no head: the token mean
    assert loaded.spec.readout == "mean" and torch.allclose(vectors, outputs.last_hidden_state.mean(1))


def test_whisper_reads_out_the_mean_of_the_frames_that_hold_audio(checkpoints):
    loaded = load_encoder(checkpoints["whisper"].path, "audio")
    features = _inputs(loaded)  # [B, 16 mel bins, 32 frames]
    mask = torch.ones(BATCH, 32, dtype=torch.bool)
    mask[1, 12:] = False  # the second clip is 12 mel frames of audio, then padding
    with torch.no_grad():
        vectors = loaded.encode(features, mask)
        hidden = loaded.module(input_features=features).last_hidden_state  # [B, 16, D]
    assert torch.allclose(vectors[0], hidden[0].mean(0))
    assert torch.allclose(vectors[1], hidden[1, :6].mean(0))  # stride 2: 6 encoder frames


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_wav2vec2_and_hubert_read_out_the_masked_mean_of_real_samples(checkpoints, kind):
    loaded = load_encoder(checkpoints[kind].path, "audio")
    waves = _inputs(loaded)  # [B, 400]
    mask = torch.ones(BATCH, RAW_SAMPLES, dtype=torch.bool)
    mask[1, 200:] = False
    with torch.no_grad():
        vectors = loaded.encode(waves, mask)
        hidden = loaded.module(input_values=waves).last_hidden_state  # [B, 39, D]
    frames = int(loaded.module._get_feat_extract_output_lengths(torch.tensor(200)))
    assert 0 < frames < hidden.shape[1]
    assert torch.allclose(vectors[0], hidden[0].mean(0), atol=1e-6)
    assert torch.allclose(vectors[1], hidden[1, :frames].mean(0), atol=1e-6)


def _lora_modules(model) -> dict[str, torch.nn.Module]:
    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("layers", [None, 1])
def test_lora_hits_exactly_the_attention_projections_of_the_layers_asked_for(checkpoints, kind, layers):
    checkpoint = checkpoints[kind]
    loaded = load_encoder(checkpoint.path, checkpoint.modality)
    targets = lora_targets(loaded, layers)
    spec = loaded.spec
    chosen_layers = spec.layer_names(loaded.config)[-(layers or LAYERS):]
    assert targets == [f"{layer}.{p}" for layer in chosen_layers for p in spec.projections]
    assert len(targets) == 4 * (layers or LAYERS)

    model = get_peft_model(loaded.module, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    assert sorted(_lora_modules(model)) == sorted(targets)

    loaded.encode(_inputs(loaded)).square().sum().backward()  # eval mode: no dropout, no layerdrop
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; its gradient is (dL/dy)(Ax), nonzero when LoRA is in the path
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif "lora_A" not in name:
            assert not param.requires_grad and param.grad is None, name


def test_the_targets_of_the_tiny_encoders_are_those_of_common_lora():
    """The tiny encoders use the same projection names as today's regex over `cfg.lora_targets`."""
    cfg = EdgefedConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, image_size=32, n_mels=16,
                        audio_frames=32, patch_size=8, lora_targets="q_proj,v_proj")
    regex = re.compile(rf".*\.({'|'.join(cfg.lora_target_modules)})$")
    for modality in ("frames", "audio"):
        loaded = load_encoder("tiny", modality, cfg)
        expected = [name for name, _ in loaded.module.named_modules() if regex.fullmatch(name)]
        assert lora_targets(loaded, None, projections=cfg.lora_target_modules) == expected
        assert len(expected) == 2 * cfg.num_layers

    # inside the classifier, with the attribute as prefix, peft hits exactly what common/model/lora.py's regex hits
    model = MultimodalClassifier(cfg)
    ours = LoraConfig(target_modules=[
        *lora_targets(load_encoder("tiny", "frames", cfg), prefix="video_encoder.", projections=cfg.lora_target_modules),
        *lora_targets(load_encoder("tiny", "audio", cfg), prefix="audio_encoder.", projections=cfg.lora_target_modules),
    ])
    today = LoraConfig(target_modules=rf".*_encoder\..*\.({'|'.join(cfg.lora_target_modules)})$")
    names = [name for name, _ in model.named_modules()]
    assert [n for n in names if check_target_module_exists(ours, n)] == [n for n in names if check_target_module_exists(today, n)]


def test_the_tiny_encoders_are_those_of_common_model_under_the_same_seed():
    cfg = EdgefedConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, image_size=32, n_mels=16,
                        audio_frames=32, patch_size=8)
    torch.manual_seed(cfg.model_seed)
    frames, audio = load_encoder("tiny", "frames", cfg), load_encoder("tiny", "audio", cfg)
    torch.manual_seed(cfg.model_seed)
    model = MultimodalClassifier(cfg).eval()
    _assert_same_weights(frames.module, model.video_encoder)
    _assert_same_weights(audio.module, model.audio_encoder)
    assert frames.checkpoint_path is None and frames.source == "tiny"
    assert frames.input_shape == (3, 32, 32) and audio.input_shape == (32, 16)
    assert (frames.spec.preprocessing, audio.spec.preprocessing) == ("tiny-image", "tiny-logmel")

    pixels = torch.rand(BATCH, 1, 3, 32, 32) * 255
    logmel = torch.randn(BATCH, 1, 32, 16)
    one = torch.ones(BATCH, 1, dtype=torch.bool)
    with torch.no_grad():  # the readout is today's patch mean
        assert torch.allclose(frames.encode(pixels[:, 0] / 127.5 - 1.0), model.encode_video(pixels, one), atol=1e-6)
        values = (logmel[:, 0] - (-6.0)) / 4.0
        assert torch.allclose(audio.encode(values), model.encode_audio(logmel, one), atol=1e-6)
    with pytest.raises(ValueError, match="pass cfg"):
        load_encoder("tiny", "frames")


# --- refusals ---------------------------------------------------------------------------------


def test_a_directory_without_config_json_is_refused(checkpoints, tmp_path):
    path = _copy(checkpoints["vit"], tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(EncoderCheckpointError, match="no config.json") as err:
        load_encoder(path, "frames")
    assert str(path) in str(err.value)


def test_an_unsupported_model_type_is_refused_with_the_supported_ones_listed(checkpoints):
    with pytest.raises(EncoderCheckpointError, match="'bert' is not a supported encoder") as err:
        load_encoder(checkpoints["bert"].path, "frames")
    assert str(checkpoints["bert"].path) in str(err.value)
    assert all(model_type in str(err.value) for model_type in SUPPORTED_MODEL_TYPES)


def test_a_checkpoint_of_the_other_modality_is_refused(checkpoints):
    with pytest.raises(EncoderCheckpointError, match="is a frames encoder, not audio"):
        load_encoder(checkpoints["vit"].path, "audio")
    with pytest.raises(EncoderCheckpointError, match="is a audio encoder, not frames"):
        load_encoder(checkpoints["whisper"].path, "frames")


@pytest.mark.parametrize("kind", ["vit", "clip", "whisper", "wav2vec2"])
def test_a_checkpoint_missing_one_encoder_weight_is_refused(checkpoints, tmp_path, kind):
    path = _copy(checkpoints[kind], tmp_path)
    dropped = []

    def drop_one_layer_1_weight(tensors):
        # the file's names are transformers' on-disk ones (ViT: encoder.layer.1.attention.attention.query)
        name = next(n for n in sorted(tensors) if re.search(r"layers?\.1\.", n) and n.endswith("weight")
                    and "text_model" not in n and "decoder" not in n)
        dropped.append(name)
        del tensors[name]

    rewrite_weights(path, drop_one_layer_1_weight)
    with pytest.raises(EncoderCheckpointError, match="missing from the checkpoint") as err:
        load_encoder(path, checkpoints[kind].modality)
    assert str(path) in str(err.value) and ".1." in str(err.value)


def test_a_weight_of_the_wrong_shape_is_refused_by_name(checkpoints, tmp_path):
    path = _copy(checkpoints["vit"], tmp_path)
    rewrite_weights(path, lambda t: t.__setitem__("encoder.layer.1.attention.attention.query.weight", torch.zeros(16, 32)))
    with pytest.raises(EncoderCheckpointError, match=r"layers\.1\.attention\.q_proj\.weight is \(16, 32\) in the checkpoint"):
        load_encoder(path, "frames")


def test_other_parts_of_a_full_checkpoint_are_ignored(checkpoints):
    """CLIP's text tower, Whisper's decoder and a classifier head are in the files, not in the encoder."""
    for kind, foreign in (("clip", "text_model"), ("whisper", "decoder"), ("vit-classifier", "classifier")):
        loaded = load_encoder(checkpoints[kind].path, checkpoints[kind].modality)
        assert not any(foreign in name for name in loaded.module.state_dict())


def test_whisper_encoder_from_pretrained_on_a_full_checkpoint_is_random_but_ours_is_real(checkpoints):
    for kind in ("whisper", "whisper-generation"):
        checkpoint = checkpoints[kind]
        saved = checkpoint.encoder.layers[0].self_attn.q_proj.weight
        # the trap: the naive call "succeeds" and leaves every encoder weight random
        naive, info = WhisperEncoder.from_pretrained(checkpoint.path, local_files_only=True, output_loading_info=True)
        assert not torch.equal(naive.layers[0].self_attn.q_proj.weight, saved)
        assert "layers.0.self_attn.q_proj.weight" in info["missing_keys"]
        loaded = load_encoder(checkpoint.path, "audio")
        assert isinstance(loaded.module, WhisperEncoder)  # the encoder alone: no decoder built
        _assert_same_weights(loaded.module, checkpoint.encoder)


def test_the_whisper_encoder_is_also_checked_against_the_files_tensor_by_tensor(checkpoints):
    """Not only transformers' load report: a random or altered encoder weight is caught by reading the files."""
    path = checkpoints["whisper"].path
    naive = WhisperEncoder.from_pretrained(path, local_files_only=True)
    with pytest.raises(EncoderCheckpointError, match="differs from the checkpoint's encoder"):
        verify_against_files(naive, path, WHISPER_ENCODER_PREFIXES)
    loaded = load_encoder(path, "audio")
    verify_against_files(loaded.module, path, WHISPER_ENCODER_PREFIXES)
    with torch.no_grad():
        loaded.module.layers[1].fc1.bias[0] += 1.0
    with pytest.raises(EncoderCheckpointError, match=r"layers\.1\.fc1\.bias differs"):
        verify_against_files(loaded.module, path, WHISPER_ENCODER_PREFIXES)
    with pytest.raises(EncoderCheckpointError, match="not in the checkpoint under"):
        verify_against_files(loaded.module, path, ("nothing.",))


def test_a_vit_classification_checkpoint_loads_without_a_random_pooler(checkpoints):
    checkpoint = checkpoints["vit-classifier"]
    loaded = load_encoder(checkpoint.path, "frames")
    assert loaded.module.pooler is None
    assert not any(name.startswith("pooler") for name in loaded.module.state_dict())
    _assert_same_weights(loaded.module, checkpoint.encoder)
    assert set(loaded.module.state_dict()) == set(checkpoint.encoder.state_dict())


def test_targets_that_hit_siglips_pooling_head_are_refused_because_lora_there_trains_nothing(checkpoints):
    loaded = load_encoder(checkpoints["siglip"].path, "frames")
    bare = ["q_proj", "k_proj", "v_proj", "out_proj"]
    with pytest.raises(EncoderCheckpointError, match=r"head\.attention\.out_proj.*MultiheadAttention"):
        check_lora_targets(loaded, bare)
    assert not any(t.startswith("head") for t in lora_targets(loaded))

    # the trap is real: peft wraps the head's out_proj, and it gets no gradient
    model = get_peft_model(loaded.module, LoraConfig(r=2, target_modules=bare, init_lora_weights=False))
    assert "head.attention.out_proj" in _lora_modules(model)
    loaded.encode(_inputs(loaded)).sum().backward()
    head = {n: p.grad for n, p in model.named_parameters() if "lora" in n and "head.attention" in n}
    assert head and all(grad is None for grad in head.values())


def test_targets_that_give_a_layer_only_some_projections_or_hit_other_modules_are_refused(checkpoints):
    loaded = load_encoder(checkpoints["vit"].path, "frames")
    with pytest.raises(EncoderCheckpointError, match="miss projections of targeted layers"):
        check_lora_targets(loaded, ["layers.0.attention.q_proj", *lora_targets(loaded, 1)])
    with pytest.raises(EncoderCheckpointError, match="not attention projections"):
        check_lora_targets(loaded, ["projection"])  # the patch embedding's conv
    with pytest.raises(EncoderCheckpointError, match="match no module"):
        check_lora_targets(loaded, ["query"])  # transformers 4's name
    with pytest.raises(EncoderCheckpointError, match="are not all among"):
        lora_targets(loaded, projections=["out_proj"])  # CLIP's name, not ViT's
    assert check_lora_targets(loaded, r".*\.attention\.(q|k|v|o)_proj") == lora_targets(loaded)


@pytest.mark.parametrize("layers", [0, LAYERS + 1, -1])
def test_lora_layers_outside_one_to_num_layers_is_refused(checkpoints, layers):
    loaded = load_encoder(checkpoints["clip"].path, "frames")
    with pytest.raises(EncoderCheckpointError, match=rf"lora-layers {layers} is outside 1\.\.{LAYERS}") as err:
        lora_targets(loaded, layers)
    assert str(checkpoints["clip"].path) in str(err.value)


def test_a_prefix_names_the_targets_inside_a_bigger_model(checkpoints):
    loaded = load_encoder(checkpoints["ast"].path, "audio")
    assert lora_targets(loaded, 1, prefix="audio_encoder.")[0] == "audio_encoder.layers.1.attention.q_proj"


# --- fingerprint ------------------------------------------------------------------------------


def test_the_fingerprint_covers_weights_and_preprocessing_but_not_where_the_directory_is(checkpoints, tmp_path):
    original = checkpoints["whisper"].path
    fingerprint = base_fingerprint_of_checkpoint(original)
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    copy = _copy(checkpoints["whisper"], tmp_path)
    assert base_fingerprint_of_checkpoint(copy) == fingerprint
    (copy / "README.md").write_text("not part of the model")
    assert base_fingerprint_of_checkpoint(copy) == fingerprint

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor
    weights.write_bytes(bytes(data))
    flipped = base_fingerprint_of_checkpoint(copy)
    assert flipped != fingerprint

    preprocessor = copy / "preprocessor_config.json"
    settings = json.loads(preprocessor.read_text())
    preprocessor.write_text(json.dumps({**settings, "padding_value": 1.0}))
    assert base_fingerprint_of_checkpoint(copy) not in (fingerprint, flipped)


def test_the_fingerprint_refuses_a_directory_without_weights(checkpoints, tmp_path):
    path = _copy(checkpoints["vit"], tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(EncoderCheckpointError, match="no weight file"):
        base_fingerprint_of_checkpoint(path)
    with pytest.raises(EncoderCheckpointError, match="cannot read the weights"):
        load_encoder(path, "frames")


# --- writing an encoder back as a checkpoint (the cloud trainer's output) ------------------------
@pytest.mark.parametrize("kind", [*FAMILIES, "whisper-generation"])
def test_a_saved_family_encoder_loads_back_as_itself_with_its_preprocessing(checkpoints, kind, tmp_path):
    checkpoint = checkpoints[kind]
    loaded = load_encoder(checkpoint.path, checkpoint.modality)
    saved = save_encoder(loaded, tmp_path / "saved")
    back = load_encoder(saved, checkpoint.modality)
    assert back.spec is loaded.spec
    assert _state(back.module) == _state(loaded.module)
    assert (saved / "preprocessor_config.json").read_bytes() == (checkpoint.path / "preprocessor_config.json").read_bytes()


@pytest.mark.parametrize("modality", ["frames", "audio"])
def test_a_saved_tiny_encoder_loads_back_as_tiny_not_as_vit_or_ast(modality, tmp_path):
    cfg = EdgefedConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1, image_size=32)
    loaded = load_encoder("tiny", modality, cfg)
    saved = save_encoder(loaded, tmp_path / "saved")
    back = load_encoder(saved, modality, cfg)
    assert back.spec is TINY_SPECS[modality] and back.checkpoint_path == saved
    assert _state(back.module) == _state(loaded.module)
    unmarked = json.loads((saved / "config.json").read_text())
    del unmarked[TINY_MARKER]
    (saved / "config.json").write_text(json.dumps(unmarked))
    assert load_encoder(saved, modality).spec is REGISTRY[unmarked["model_type"]], "the marker is what makes it tiny"


def test_a_saved_tiny_encoder_is_refused_with_a_run_config_of_another_shape(tmp_path):
    cfg = EdgefedConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1, image_size=32)
    saved = save_encoder(load_encoder("tiny", "audio", cfg), tmp_path / "saved")
    with pytest.raises(EncoderCheckpointError, match=r"num_mel_bins 64, the run config gives 32 \(n-mels\)"):
        load_encoder(saved, "audio", cfg.replace(n_mels=32))
    with pytest.raises(EncoderCheckpointError, match="cannot be the frames encoder"):
        load_encoder(saved, "frames", cfg)


def _state(module: torch.nn.Module) -> dict[str, list]:
    return {name: tensor.tolist() for name, tensor in module.state_dict().items()}
