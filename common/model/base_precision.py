"""The frozen base at a lower precision on a device (QLoRA-style): int8 weight-only or 4-bit NF4.

    build_lora_model(cfg) ──► quantize_frozen_base(model, "int8" | "nf4") ──► train as ever

Every frozen `nn.Linear` of the base - the attention projections under LoRA (their `base_layer`)
and the MLPs of both encoders - is replaced by its quantized form; LoRA's A and B, the
projections, the fusion and the head (everything trainable) stay float32, and so does every
other frozen tensor (embeddings, norms, convolutions: a few percent of the weights). The adapter
that trains on top, the update it makes and its aggregation are unchanged: they carry only the
trainable tensors. What changes is the base the adapter is trained against, so a device on a
quantized base sends updates for a slightly different function: bench_edge_training measures
the accuracy that costs a federation.

    int8  per-output-channel symmetric int8 weights (1 byte a weight + a float scale a row)
    nf4   4-bit NormalFloat (QLoRA's code: the 16 quantiles of a normal distribution), blocks of
          64 weights with a float absmax each (0.56 bytes a weight)

Both dequantize one layer's weight for its float32 matmul and drop it after the call (what
bitsandbytes' CPU backend does without its extra kernels; torch's int8 weight-only kernel,
`_weight_int8pack_mm`, measured 20x slower than that on float32 input here).

The gradient that reaches the input of a quantized layer (LoRA below it needs it) is computed
against the same dequantized weight the forward used; no float copy of a weight outlives its
call. Both are written here rather than taken from torchao / bitsandbytes: importing those
(peft imports them whenever they are installed) added 3.5 s to every process that imports peft.

The base's identity (common/model/lora.py `base_identity`) is taken before quantizing: devices at
different precisions share one base and one federation.

Memory: a checkpoint's float32 weights are views of its mmapped safetensors file until they are
replaced; `release_file_pages` copies what is left out of the mapping so that the file's pages
(every weight's, once read) stop counting in the process's resident memory.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

BasePrecision = Literal["fp32", "int8", "nf4"]
NF4_BLOCK = 64
# QLoRA's NF4 code (Dettmers et al. 2023, appendix E; bitsandbytes' table): normal quantiles scaled to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T for a quantized W, dequantized for the call; dX from the same W (no dW: it is frozen). Only the
    quantized weight is kept for backward, never a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized(), None


class _QuantizedLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized (buffers: nothing here trains)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and flat.requires_grad:
            y = _QuantizedMatmul.apply(flat, self)
        else:
            y = F.linear(flat, self.dequantized())
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantizedLinear):
    """Per-output-channel symmetric int8 weight: w = q * scale[row]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


class NF4Linear(_QuantizedLinear):
    """4-bit NF4 weight in blocks of NF4_BLOCK, two codes a byte, with a float absmax a block."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = linear.weight.detach().float().reshape(-1)
        pad = (-w.numel()) % (2 * NF4_BLOCK)
        blocks = F.pad(w, (0, pad)).reshape(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
        midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
        codes = torch.bucketize(blocks / absmax[:, None], midpoints).to(torch.uint8).reshape(-1)  # nearest code
        self.register_buffer("packed", codes[0::2] << 4 | codes[1::2])
        self.register_buffer("absmax", absmax)
        self.numel = w.numel()

    def dequantized(self) -> torch.Tensor:
        pairs = torch.index_select(_nf4_pairs(), 0, self.packed.int())  # [n / 2, 2]: both codes of each byte
        values = (pairs.reshape(-1, NF4_BLOCK) * self.absmax[:, None]).reshape(-1)
        return values[: self.numel].reshape(self.out_features, self.in_features)


@functools.cache
def _nf4_pairs() -> torch.Tensor:
    """[256, 2]: the (high, low) NF4 values of every byte."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0x0F]], dim=1)


QUANTIZED: dict[str, type[_QuantizedLinear]] = {"int8": Int8Linear, "nf4": NF4Linear}


def frozen_linears(model: nn.Module) -> list[str]:
    """Names of the Linear modules whose weight does not train (LoRA's own A/B, the fusion and head do).

    nn.MultiheadAttention's out_proj is left alone: its forward reads the weight, never calls the module."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not module.weight.requires_grad
            and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)]


def quantize_frozen_base(model: nn.Module, precision: BasePrecision) -> int:
    """Replace every frozen Linear of `model` by its `precision` form in place; returns how many."""
    if precision not in get_args(BasePrecision):
        raise ValueError(f"base precision must be one of {', '.join(get_args(BasePrecision))}, got {precision!r}")
    if precision == "fp32":
        return 0
    names = frozen_linears(model)
    kind = QUANTIZED[precision]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, kind(model.get_submodule(name)))
    release_file_pages(model)
    log.info("base quantized to %s: %d frozen Linear layers", precision, len(names))
    return len(names)


def release_file_pages(model: nn.Module) -> None:
    """Copy the float tensors left in the model into anonymous memory and let the allocator give back what the
    replaced weights held: the checkpoint file's mapping is then unmapped and no longer resident."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if type(tensor) in (torch.Tensor, nn.Parameter):
                tensor.data = tensor.data.clone()
    trim_allocator()


def trim_allocator() -> None:
    """Collect garbage and hand the heap pages glibc keeps after frees back to the system (other libcs: no-op)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
