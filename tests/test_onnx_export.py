"""Export, quantization and the parity gate on the real default model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgefed.cloud.publishing import onnx_export
from edgefed.cloud.publishing.onnx_export import example_inputs, export_quantized, merged_model
from edgefed.cloud.publishing.publisher import ModelPublisher
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import init_keys, load_cloud_signing_key
from edgefed.common.model.lora import build_lora_model, get_adapter_state
from edgefed.common.onnx_inference import INPUT_NAMES, open_session


def trained_like_adapter(cfg: EdgefedConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An adapter with non-zero LoRA B (as after training), so the merge changes the base."""
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter_state(build_lora_model(cfg))
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if "lora_B" in k else v) for k, v in adapter.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = EdgefedConfig()
    model = merged_model(cfg, trained_like_adapter(cfg))
    paths = export_quantized(model, cfg, tmp_path_factory.mktemp("export"), ("int8", "int4"))
    return cfg, model, paths


def _run(path, inputs) -> np.ndarray:
    return open_session(str(path), 1).run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))[0]


def test_fp32_export_matches_pytorch_at_any_batch_size(exported):
    cfg, model, paths = exported
    for batch in (1, 3, 8):  # the batch axis is dynamic
        inputs = example_inputs(cfg, batch, seed=batch)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        np.testing.assert_allclose(_run(paths["fp32"], inputs), expected, atol=1e-4, rtol=1e-4)


def test_quantized_models_are_smaller_and_agree_with_pytorch(exported):
    cfg, model, paths = exported
    fp32_size = paths["fp32"].stat().st_size
    assert paths["int8"].stat().st_size <= 0.3 * fp32_size
    assert paths["int4"].stat().st_size < 0.3 * fp32_size
    inputs = example_inputs(cfg, 32, seed=11)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    for q in ("int8", "int4"):
        got = _run(paths[q], inputs)
        assert np.isfinite(got).all()
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9, q
    ops = {n.op_type for n in onnx.load(str(paths["int8"])).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(paths["int4"])).graph.node}


def test_export_leaves_no_debug_metadata_and_simplifies_attention(exported):
    _, _, paths = exported
    graph = onnx.load(str(paths["fp32"])).graph
    assert not any(n.metadata_props for n in graph.node)  # no stack traces or source paths shipped
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert attention and all(any(a.name == "q_num_heads" for a in n.attribute) for n in attention[:8])


def _publisher(tmp_path, cfg) -> tuple[ModelPublisher, ModelRegistry]:
    init_keys("cloud", tmp_path / "keys")
    registry = ModelRegistry(tmp_path / "models")
    return ModelPublisher(cfg, registry, load_cloud_signing_key(tmp_path / "keys"), None, "base"), registry


def test_parity_gate_refuses_a_broken_quantized_model(tmp_path, monkeypatch):
    cfg = EdgefedConfig()
    publisher, registry = _publisher(tmp_path, cfg)

    def broken_export(model, cfg, out_dir, quantizations):
        paths = export_quantized(model, cfg, out_dir, quantizations)
        graph = onnx.load(str(paths["int8"]))
        for init in graph.graph.initializer:  # scramble every INT8 weight: a quantizer bug
            if init.data_type == onnx.TensorProto.INT8 and init.raw_data:
                raw = np.frombuffer(init.raw_data, dtype=np.int8)
                init.raw_data = np.random.default_rng(0).permutation(raw).tobytes()
        onnx.save(graph, str(paths["int8"]))
        return paths

    monkeypatch.setattr("edgefed.cloud.publishing.publisher.export_quantized", broken_export)
    outcome = publisher.publish(1, trained_like_adapter(cfg))
    assert not outcome.published and "agreement" in outcome.reason
    assert f"agreement with PyTorch FP32 {outcome.argmax_agreement:.4f} (" in outcome.reason  # the figure, recorded
    assert registry.latest_version() == 0
    assert not [p for p in registry.root.iterdir()], "the staging folder is cleaned up"


def test_publish_writes_a_signed_manifest_with_the_feature_config(tmp_path):
    from edgefed.common.keys import load_cloud_public
    from edgefed.common.wire.model_manifest import MANIFEST_FILE, verify_manifest

    cfg = EdgefedConfig()
    publisher, registry = _publisher(tmp_path, cfg)
    outcome = publisher.publish(7, trained_like_adapter(cfg))
    assert outcome.published and outcome.argmax_agreement >= 0.99
    manifest = verify_manifest((registry.directory(7) / MANIFEST_FILE).read_bytes(), load_cloud_public(tmp_path / "keys"))
    assert manifest.version == 7 and manifest.feature_config == cfg.feature_config()
    assert [t.name for t in manifest.inputs] == list(INPUT_NAMES) and manifest.inputs[0].shape[0] == "batch"
    assert manifest.labels == cfg.label_names and manifest.quantization == "int8"
    manifest.check_files(registry.directory(7))


def test_unknown_quantization_is_an_export_error(tmp_path):
    with pytest.raises(onnx_export.ExportError, match="int8 or int4"):
        onnx_export.quantize(tmp_path / "a.onnx", tmp_path / "b.onnx", "int2")
