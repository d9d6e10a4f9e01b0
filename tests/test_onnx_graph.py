"""The exact graph passes between torch.onnx's output and quantization, on the exporter's real output."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgefed.cloud.publishing import onnx_graph
from edgefed.common.onnx_inference import open_session


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic_axis: int) -> onnx.ModelProto:
    """The way onnx_export.export_fp32 exports: dynamo, opset 23, the given axis dynamic."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, opset_version=23, input_names=["x"],
                                    output_names=["y"], dynamic_shapes=({dynamic_axis: torch.export.Dim("d", min=2)},),
                                    optimize=True, verbose=False)
    program.save(str(path))
    model = onnx.load(str(path))
    onnx_graph.strip_debug_info(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, path: Path) -> np.ndarray:
    onnx.save(model, str(path))
    return open_session(str(path), 1).run(None, {"x": x})[0]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, e = x.shape
        q, k, v = (t.view(b, s, self.heads, e // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, e))


class Layers(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_long_unmasked_attention_becomes_multihead_attention_and_short_ones_take_3d_inputs(tmp_path):
    torch.manual_seed(0)
    long = onnx_graph.MHA_MIN_TOKENS + 88
    cases = {long: (Layers(SelfAttention(32, 4), SelfAttention(32, 2)), "MultiHeadAttention"), 24: (SelfAttention(32, 4), "Attention")}
    for tokens, (module, op) in cases.items():
        x = torch.randn(2, tokens, 32)
        model = _export(module, x, tmp_path / "raw.onnx", dynamic_axis=0)  # the sequence is fixed, as in our models
        before = _run(model, x.numpy(), tmp_path / "before.onnx")
        rewritten = onnx_graph.attention_to_3d(model)
        assert rewritten[op] == len([m for m in module.modules() if isinstance(m, SelfAttention)])
        ops = [n.op_type for n in model.graph.node]
        assert "Transpose" not in ops, "the head split around attention is gone"
        if op == "MultiHeadAttention":  # each node its own head count: 4 then 2
            assert [a.i for n in model.graph.node if n.op_type == op for a in n.attribute if a.name == "num_heads"] == [4, 2]
        after = _run(model, x.numpy(), tmp_path / "after.onnx")
        np.testing.assert_allclose(after, before, atol=1e-5)
        np.testing.assert_allclose(after, module(x).detach().numpy(), atol=1e-5)


def test_one_dimensional_convolutions_become_matmuls_at_any_length(tmp_path):
    torch.manual_seed(0)
    module = Layers(
        nn.Conv1d(1, 128, 10, stride=5, bias=False),  # 10 taps: stays a Conv
        nn.GELU(),
        nn.Conv1d(128, 128, 3, stride=2, bias=False),  # wav2vec2's front-end shapes
        nn.GELU(),
        nn.Conv1d(128, 48, 2, stride=2),  # with a bias
        nn.Conv1d(48, 48, 3, padding=1),  # padded: stays a Conv
    )
    model = _export(module, torch.randn(2, 1, 4000), tmp_path / "raw.onnx", dynamic_axis=2)
    assert onnx_graph.conv1d_as_matmul(model) == 2
    assert [n.op_type for n in model.graph.node].count("Conv") == 2
    for length in (4000, 1601, 777):  # the time axis stays dynamic: odd lengths leave a remainder at every stride
        x = torch.randn(2, 1, length)
        got = _run(model, x.numpy(), tmp_path / "after.onnx")
        with torch.no_grad():
            expected = module(x).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_group_norm_with_a_channel_per_group_becomes_instance_norm(tmp_path):
    torch.manual_seed(0)
    module = Layers(nn.Conv1d(4, 16, 3), nn.GroupNorm(16, 16), nn.GELU(), nn.GroupNorm(4, 16))  # wav2vec2's, then not
    for norm in (module.layers[1], module.layers[3]):
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(2, 4, 300)
    model = _export(module, x, tmp_path / "raw.onnx", dynamic_axis=2)
    assert onnx_graph.group_norm_as_instance_norm(model) == 1
    assert [n.op_type for n in model.graph.node].count("GroupNormalization") == 1, "4 groups of 4 channels: kept"
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x.numpy(), tmp_path / "after.onnx"), module(x).numpy(), atol=1e-5)
