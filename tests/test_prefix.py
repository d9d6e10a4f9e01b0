"""An encoder split at a layer gives what the whole encoder gives: every family, every split point.

Checkpoints are tiny random ones written with `save_pretrained` (tests/checkpoints.py).
"""

from __future__ import annotations

import pytest
import torch

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders import load_encoder
from edgefed.common.encoders.prefix import PrefixUnsupportedError, check_split, encode_from, hidden_before
from tests.checkpoints import FAMILIES, LAYERS, Checkpoint, make_checkpoint

BATCH = 3
RAW_SAMPLES = 400
TINY = EdgefedConfig(num_layers=3, hidden_size=32, num_heads=2, intermediate_size=64, image_size=32, n_mels=16,
                     audio_frames=32, patch_size=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: make_checkpoint(kind, root) for kind in (*FAMILIES, "siglip-headless")}


def _inputs(loaded) -> torch.Tensor:
    shape = [RAW_SAMPLES if size is None else size for size in loaded.input_shape]
    return torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(0))


def _assert_split_matches(loaded, mask: torch.Tensor | None = None) -> None:
    x = _inputs(loaded)
    with torch.no_grad():
        whole = loaded.encode(x, mask)
        for start in range(loaded.num_layers):
            hidden = hidden_before(loaded, x, start)
            assert hidden.ndim == 3 and hidden.shape[0] == BATCH
            split = encode_from(loaded, hidden, start, mask)
            assert torch.allclose(split, whole, atol=1e-5), (loaded.spec.name, start, (split - whole).abs().max())


@pytest.mark.parametrize("kind", (*FAMILIES, "siglip-headless"))
def test_each_family_split_at_any_layer_encodes_as_the_whole_forward(checkpoints, kind):
    checkpoint = checkpoints[kind]
    loaded = load_encoder(checkpoint.path, checkpoint.modality)
    assert loaded.num_layers == LAYERS
    _assert_split_matches(loaded)


def test_whispers_masked_readout_takes_the_mask_after_the_split(checkpoints):
    loaded = load_encoder(checkpoints["whisper"].path, "audio")
    mask = torch.zeros(BATCH, loaded.input_shape[1], dtype=torch.bool)
    mask[0, :10], mask[1, :20], mask[2] = True, True, True
    _assert_split_matches(loaded, mask)


@pytest.mark.parametrize("modality", ["frames", "audio"])
def test_the_tiny_encoders_split_too(modality):
    torch.manual_seed(TINY.model_seed)
    _assert_split_matches(load_encoder("tiny", modality, TINY))


@pytest.mark.parametrize(("kind", "read"), [("vit", 1), ("deit", 1), ("ast", 2)])
def test_a_readout_of_the_first_tokens_runs_the_last_layers_mlp_on_those_alone(checkpoints, kind, read):
    checkpoint = checkpoints[kind]
    loaded = load_encoder(checkpoint.path, checkpoint.modality)
    seen = []
    last = loaded.module.get_submodule(loaded.spec.layer_names(loaded.config)[-1])
    handle = last.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x = _inputs(loaded)
    try:
        with torch.no_grad():
            whole = loaded.encode(x)
            tokens = seen.pop()  # the whole forward's last MLP: every token
            split = encode_from(loaded, hidden_before(loaded, x, 1), 1)
    finally:
        handle.remove()
    assert seen == [read] and tokens > read
    assert torch.allclose(split, whole, atol=1e-5)


def test_the_prefix_is_computed_in_eval_mode_and_leaves_the_mode_as_it_was(checkpoints):
    loaded = load_encoder(checkpoints["wav2vec2"].path, "audio")  # time masking and LayerDrop in train mode
    loaded.module.train()
    x = _inputs(loaded)
    first, second = hidden_before(loaded, x, 1), hidden_before(loaded, x, 1)
    assert torch.equal(first, second) and loaded.module.training
    assert not first.requires_grad


def test_a_split_with_something_trainable_before_it_is_refused(checkpoints):
    loaded = load_encoder(checkpoints["vit"].path, "frames")
    for p in loaded.module.parameters():
        p.requires_grad_(False)
    check_split(loaded, 1)
    next(loaded.module.get_submodule("layers.0").parameters()).requires_grad_(True)
    with pytest.raises(PrefixUnsupportedError, match="sits before layer 1"):
        check_split(loaded, 1)
    check_split(loaded, 0)
    with pytest.raises(PrefixUnsupportedError, match="split at layer 2"):
        check_split(loaded, LAYERS)


def test_a_layer_called_with_an_attention_mask_is_refused_not_replayed_without_it(checkpoints):
    loaded = load_encoder(checkpoints["vit"].path, "frames")
    x = _inputs(loaded)
    # as wav2vec2 "large" would with a padding mask: the layer receives a mask tensor
    handle = loaded.module.get_submodule("layers.1").register_forward_pre_hook(lambda m, args: (args[0], torch.ones(1)))
    try:
        with pytest.raises(PrefixUnsupportedError, match="more than its hidden states"):
            hidden_before(loaded, x, 1)
    finally:
        handle.remove()
