import copy

import pytest
import torch

from edgefed.common.config import EdgefedConfig
from edgefed.common.model.lora import (
    AdapterMismatchError,
    base_fingerprint,
    build_lora_model,
    get_adapter_state,
    merge_adapter,
    set_adapter_state,
)

SMALL = EdgefedConfig(num_layers=2, hidden_size=96, num_heads=3, intermediate_size=192, num_keyframes=3)


def _batch(cfg: EdgefedConfig, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (b, cfg.num_keyframes, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8)
    frame_mask = torch.ones(b, cfg.num_keyframes, dtype=torch.bool)
    audio = torch.randn(b, cfg.num_keyframes, cfg.audio_frames, cfg.n_mels, generator=g) * 3 - 6
    audio_mask = torch.ones(b, cfg.num_keyframes, dtype=torch.bool)
    return frames, frame_mask, audio, audio_mask


def _perturb_adapter(model, seed=1):
    """Non-zero LoRA B (peft starts it at zero, which would make merge trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("b", [1, 4])
def test_forward_with_both_modalities(b):
    model = build_lora_model(SMALL)
    logits = model(*_batch(SMALL, b))
    assert logits.shape == (b, SMALL.num_classes)
    assert torch.isfinite(logits).all()


def test_missing_audio_is_a_mask_and_changes_nothing_else():
    """Masked audio must not influence the output: garbage audio under the mask gives the same logits."""
    model = build_lora_model(SMALL).eval()
    frames, fmask, audio, _ = _batch(SMALL, 3)
    off = torch.zeros(3, SMALL.num_keyframes, dtype=torch.bool)
    a = model(frames, fmask, audio, off)
    b = model(frames, fmask, torch.randn_like(audio) * 50, off)
    with_audio = model(frames, fmask, audio, torch.ones_like(off))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, with_audio)


def test_missing_video_and_both_missing_stay_finite():
    model = build_lora_model(SMALL).eval()
    frames, fmask, audio, amask = _batch(SMALL, 2)
    none = torch.zeros_like(fmask)
    assert torch.isfinite(model(frames, none, audio, amask)).all()
    assert torch.isfinite(model(frames, none, audio, torch.zeros_like(amask))).all()


def test_adapter_state_is_exactly_the_trainable_tensors():
    model = build_lora_model(SMALL)
    state = get_adapter_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert all("lora_" in n or ".fusion." in n or ".head." in n for n in state)
    # both encoders carry LoRA on their attention projections
    assert any("video_encoder" in n and "q_proj.lora_A" in n for n in state)
    assert any("audio_encoder" in n and "v_proj.lora_B" in n for n in state)


def test_default_adapter_is_a_small_fraction_of_the_model():
    model = build_lora_model(EdgefedConfig())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in get_adapter_state(model).values()) < frozen / 5


def test_adapter_round_trip_is_exact():
    source = build_lora_model(SMALL)
    _perturb_adapter(source)
    target = build_lora_model(SMALL)
    set_adapter_state(target, get_adapter_state(source))
    for (n, a), (_, b) in zip(get_adapter_state(source).items(), get_adapter_state(target).items()):
        assert torch.equal(a, b), n
    batch = _batch(SMALL, 2)
    assert torch.equal(source.eval()(*batch), target.eval()(*batch))


def test_set_adapter_rejects_wrong_names_and_shapes():
    model = build_lora_model(SMALL)
    state = get_adapter_state(model)
    name = next(iter(state))
    with pytest.raises(AdapterMismatchError, match="missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != name})
    bad = dict(state)
    bad[name] = torch.zeros(3, 3)
    with pytest.raises(AdapterMismatchError, match="shape"):
        set_adapter_state(model, bad)


def test_merge_gives_the_same_logits():
    model = build_lora_model(SMALL)
    _perturb_adapter(model)
    batch = _batch(SMALL, 3)
    before = model.eval()(*batch)
    merged = merge_adapter(copy.deepcopy(model))
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(*batch), before, atol=1e-4, rtol=1e-4)


def test_every_node_builds_the_same_base():
    assert base_fingerprint(build_lora_model(SMALL)) == base_fingerprint(build_lora_model(SMALL))
    other = build_lora_model(SMALL.replace(model_seed=SMALL.model_seed + 1))
    assert base_fingerprint(other) != base_fingerprint(build_lora_model(SMALL))
