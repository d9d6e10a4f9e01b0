"""The frozen base in int8 or NF4 under float LoRA: close to the float base, smaller, and it still trains.

The built-in tiny encoders (random, from configs), LoRA on the last of 3 layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgefed.common.config import EdgefedConfig
from edgefed.common.model.base_precision import (
    Int8Linear,
    NF4Linear,
    frozen_linears,
    quantize_frozen_base,
)
from edgefed.common.model.lora import base_identity, build_lora_model, get_adapter_state
from edgefed.common.training import train_adapter
from tests.test_prefix_cache import SMALL, _features

CFG = EdgefedConfig(**SMALL)


def _logits(model: nn.Module, data) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(data.frames, data.frame_mask, data.audio, data.audio_mask)


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize(("kind", "max_rel_err", "bytes_per_weight"), [(Int8Linear, 0.01, 1.05), (NF4Linear, 0.12, 0.57)])
def test_a_quantized_linear_is_close_smaller_and_passes_gradients_to_its_input(kind, max_rel_err, bytes_per_weight):
    torch.manual_seed(0)
    linear = nn.Linear(96, 130)  # rows and weights that are not multiples of the NF4 block (int8: +4/96 for scales)
    nn.init.normal_(linear.weight, std=0.02)
    quantized = kind(linear)
    x = torch.randn(2, 7, 96, requires_grad=True)
    y, reference = quantized(x), linear(x)
    assert y.shape == reference.shape
    assert float((y - reference).norm() / reference.norm()) < max_rel_err
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    assert torch.allclose(x.grad, grad @ quantized.dequantized(), atol=1e-5)
    weights = sum(b.numel() * b.element_size() for n, b in quantized.named_buffers() if n != "bias")
    assert weights / linear.weight.numel() <= bytes_per_weight
    assert not any(p.requires_grad for p in quantized.parameters())


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_the_quantized_base_keeps_the_adapter_and_identity_and_still_learns(precision):
    model = build_lora_model(CFG)
    reference = build_lora_model(CFG)
    identity = base_identity(CFG, model)
    names, linears = list(get_adapter_state(model)), frozen_linears(model)
    full_bytes = _tensor_bytes(model)
    data = _features(CFG, 8)
    before = _logits(reference, data)

    assert quantize_frozen_base(model, precision) == len(linears) > 0
    assert list(get_adapter_state(model)) == names  # the update carries exactly what it did
    assert all(isinstance(model.get_submodule(n), Int8Linear | NF4Linear) for n in linears)
    assert any(".base_layer" in n for n in linears)  # LoRA's own frozen projections are quantized too
    assert base_identity(CFG, reference) == identity  # taken before quantizing: one identity for every precision
    assert _tensor_bytes(model) < 0.6 * full_bytes
    quantized = _logits(model, data)
    assert float((quantized - before).abs().max()) < 0.5  # a different function, but near the float one

    result = train_adapter(model, [list(data.batches(4, torch.Generator().manual_seed(s))) for s in range(6)],
                           CFG.training)
    trained = _logits(model, data)
    assert result.steps == 12 and torch.isfinite(trained).all()
    assert F.cross_entropy(trained, data.labels) < F.cross_entropy(quantized, data.labels)


def test_fp32_is_untouched_and_an_unknown_precision_is_refused():
    model = build_lora_model(CFG)
    assert quantize_frozen_base(model, "fp32") == 0
    assert not any(isinstance(m, Int8Linear | NF4Linear) for m in model.modules())
    with pytest.raises(ValueError, match="base precision must be one of"):
        quantize_frozen_base(model, "int3")


def test_the_fusion_attention_and_trainable_layers_are_not_quantized():
    model = build_lora_model(CFG)
    names = frozen_linears(model)
    assert not any("fusion" in n or "head" in n or "lora_" in n for n in names)
    quantize_frozen_base(model, "int8")
    assert isinstance(model.base_model.model.fusion.attn.out_proj, nn.Linear)
