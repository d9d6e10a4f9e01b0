"""Global adapter -> merged PyTorch model -> ONNX FP32 -> INT8 (or INT4 weight-only).

    merge_and_unload ─► torch.onnx.export (dynamo, opset 23, dynamic batch)
                     ─► strip debug info, fold constant splits, onnxruntime's
                        transformer fusions (BiasGelu), 3-D attention (cloud/publishing/onnx_graph.py)
                     ─► quantize_dynamic (INT8 MatMul/Gemm weights, per channel)
                        or MatMulNBitsQuantizer (INT4 blocks of 32)

The patch-embedding convolutions compute in float: ConvInteger is 5x slower
than the float Conv on this model (1.6 ms vs 0.3 ms at batch 1); their
weights are stored as INT8 all the same (dequantized once at load). Every file is self-contained (no external data): the
models are a few MB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from edgefed.cloud.publishing import onnx_graph
from edgefed.common.config import EdgefedConfig
from edgefed.common.model.classifier import MultimodalClassifier
from edgefed.common.model.inputs import model_inputs
from edgefed.common.model.lora import build_lora_model, merge_adapter, set_adapter_state
from edgefed.common.onnx_inference import INPUT_NAMES, OUTPUT_NAMES

log = logging.getLogger(__name__)

OPSET = 23  # the first with a native Attention op: the exporter maps SDPA onto it
QUANTIZATIONS = ("fp32", "int8", "int4")


class ExportError(RuntimeError):
    """The model could not be exported or quantized."""


def merged_model(cfg: EdgefedConfig, adapter: dict[str, torch.Tensor]) -> MultimodalClassifier:
    """The base with the global adapter folded in: what devices run. A non-finite adapter is refused."""
    bad = [name for name, t in adapter.items() if not torch.isfinite(t).all()]
    if bad:
        raise ExportError(f"the adapter holds NaN or Inf ({bad[0]}{' and more' if len(bad) > 1 else ''}): "
                          "never exported, signed or published")
    model = build_lora_model(cfg)
    set_adapter_state(model, adapter)
    return merge_adapter(model)


def example_inputs(cfg: EdgefedConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random but valid inputs: some audio windows masked, as on real devices."""
    g = torch.Generator().manual_seed(seed)
    inputs = model_inputs(cfg)
    shapes = inputs.shapes()
    frames = torch.randint(0, 256, (batch, *shapes["frames"]), dtype=torch.uint8, generator=g)
    frame_mask = torch.ones(batch, *shapes["frame_mask"], dtype=torch.bool)
    audio = torch.randn(batch, *shapes["audio"], generator=g)
    if inputs.audio.preprocessing is None:
        audio = audio * 4.0 - 6.0  # the tiny log-mel's range
    audio_mask = torch.rand(batch, *shapes["audio_mask"], generator=g) > 0.25
    return frames, frame_mask, audio, audio_mask


def export_fp32(model: MultimodalClassifier, cfg: EdgefedConfig, path: str | Path) -> Path:
    """Export to one ONNX file with a dynamic batch axis, cleaned up for quantization and speed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet("onnxscript", "onnx_ir", "torch.onnx"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.eval(), example_inputs(cfg, 2), dynamo=True, opset_version=OPSET,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},) * len(INPUT_NAMES), optimize=True, verbose=False,
            )
    except Exception as err:  # the exporter raises many types; the caller needs one
        raise ExportError(f"torch.onnx.export failed: {err}") from err
    with tempfile.TemporaryDirectory() as tmp:  # the program's proto keeps weights aside until saved
        raw = os.path.join(tmp, "raw.onnx")
        program.save(raw)
        graph = onnx.load(raw)
        onnx_graph.strip_debug_info(graph)
        onnx_graph.fold_constant_splits(graph)
        onnx_graph.conv1d_as_matmul(graph)
        onnx_graph.group_norm_as_instance_norm(graph)
        onnx.save(graph, raw)
        heads = _attention_heads(model, cfg)
        graph = _transformer_fusions(raw, cfg, heads)
    rewritten = onnx_graph.attention_to_3d(graph)  # each node's own head count (ViT-B/16 12, the fusion 3)
    _check_input_shapes(graph, cfg)
    onnx_graph.strip_debug_info(graph)
    log.debug("export: attention nodes rewritten to take 3-D inputs: %s", rewritten)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path


def _check_input_shapes(graph: onnx.ModelProto, cfg: EdgefedConfig) -> None:
    """Every input is [batch, *the per-clip shape model_inputs gives]: the dynamo exporter has silently fixed
    a dynamic axis to the sample's size (DINOv2's height and width, Whisper's time) or made a fixed one symbolic."""
    expected = model_inputs(cfg).shapes()
    for arg in graph.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in arg.type.tensor_type.shape.dim]
        if not dims or isinstance(dims[0], int) or list(dims[1:]) != list(expected[arg.name]):
            raise ExportError(f"exported input {arg.name} has shape {dims}, expected [batch, "
                              f"{', '.join(map(str, expected[arg.name]))}]")


def _attention_heads(model: MultimodalClassifier, cfg: EdgefedConfig) -> int:
    """The head count every attention of the model has, or 0 when they differ."""
    counts = {cfg.num_heads}
    for loaded in model.encoders.values():
        config = loaded.config
        counts.add(int(getattr(config, "num_attention_heads", 0) or getattr(config, "encoder_attention_heads", 0)))
    return counts.pop() if len(counts) == 1 else 0


def _transformer_fusions(path: str, cfg: EdgefedConfig, heads: int) -> onnx.ModelProto:
    """onnxruntime's offline transformer fusions (bias+GELU, skip+LayerNorm); `heads` 0: detected per node."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    options.enable_gelu_approximation = False  # tanh GELU measured no faster here; keep the exact one
    with _quiet("onnxruntime.transformers", "fusion_base", "fusion_skiplayernorm", "onnx_model_bert", "onnx_model"):
        optimized = optimize_model(path, model_type="vit", num_heads=heads, hidden_size=cfg.hidden_size if heads else 0,
                                   optimization_options=options)
    return optimized.model


# What quantize_dynamic (MatMulInteger, or the fused DynamicQuantizeMatMul) and the INT4 quantizer write.
QUANTIZED_MATMULS = {"MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "MatMulNBits"}


def quantize(fp32_path: str | Path, out_path: str | Path, quantization: str) -> Path:
    """Write the quantized model; `quantization` is int8 (dynamic) or int4 (weight-only)."""
    out_path = Path(out_path)
    if quantization == "int8":
        _quantize_int8(Path(fp32_path), out_path)
    elif quantization == "int4":
        _quantize_int4(Path(fp32_path), out_path)
    else:
        raise ExportError(f"quantization must be int8 or int4, got {quantization!r}")
    model = onnx.load(str(out_path))
    onnx_graph.conv_weights_int8(model)  # neither quantizer touches the float convolutions' weights
    # onnxruntime has once stopped quantizing transformer layers without an error: count them
    quantized = sum(n.op_type in QUANTIZED_MATMULS for n in model.graph.node)
    if quantized == 0:
        raise ExportError(f"{quantization} quantization left no MatMul quantized")
    onnx.save(model, str(out_path))
    return out_path


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet(""):  # the quantizer warns "consider pre-processing" on the root logger
            quantize_dynamic(
                str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                # 7-bit weights: on x86 without VNNI (AVX2 only) onnxruntime's u8 x s8 kernel (VPMADDUBSW) saturates
                # its int16 pair sums with 8-bit weights; measured: INT8 argmax agreement 1 of 3 on an AVX2 EPYC for
                # a model that agrees on every clip on AVX512-VNNI. The gate runs on the cloud's CPU, the model runs
                # on whatever devices have, so the model must be exact on all of them.
                reduce_range=True,
                # per output channel: 4x smaller logit error than per tensor (measured), +1.6% size
                per_channel=True,
                # contrib ops from the fusions have no ONNX type inference
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except Exception as err:
        raise ExportError(f"INT8 quantization failed: {err}") from err


def _quantize_int4(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as err:
        raise ExportError(f"INT4 quantization failed: {err}") from err


def export_quantized(model: MultimodalClassifier, cfg: EdgefedConfig, out_dir: str | Path,
                     quantizations: tuple[str, ...] = ("int8",)) -> dict[str, Path]:
    """FP32 export plus each quantization, as `model_<q>.onnx` files in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": export_fp32(model, cfg, out_dir / "model_fp32.onnx")}
    for q in quantizations:
        if q != "fp32":
            paths[q] = quantize(paths["fp32"], out_dir / f"model_{q}.onnx", q)
    return paths


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise these loggers to ERROR for the duration: the exporter and quantizers narrate every pass."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def scratch_dir(parent: str | Path) -> Path:
    """A private staging folder next to where the result will live (same filesystem: renames are atomic)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".export-", dir=parent))


def file_size(path: str | Path) -> int:
    return os.stat(path).st_size
