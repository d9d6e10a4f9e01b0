"""A device's training plan: base precision, batch size, threads and the prefix cache, fitted to its memory.

    Footprint.of(model, cfg)            what the built (float32) model needs: its frozen Linear weights,
                                        the rest of the base, the trainable tensors with their gradients
                                        and AdamW state, and an estimate of one clip's activations
    plan_training(cfg, footprint,       the first (precision, batch) that fits memory x (1 - headroom):
                  memory_mb, cores)     precisions in order fp32, int8, nf4 (or only `base-precision`);
                                        for each, the configured batch, halved down to 1
    DeviceTooSmall                      nothing fits: the reason names what the smallest plan needs

The order keeps the exact base as long as any batch fits it: a smaller batch changes only how
the same clips are stepped through, a quantized base changes the function the adapter is
trained against (bench_edge_training measures what that costs a federation).

The estimate (MB):
    runtime                 RUNTIME_MB: the interpreter with torch, transformers, peft and edgefed
                            imported (bench_edge_training's runtime_rss_mb: 491 MB), with room for the
                            Flower client and the node's features
    base                    frozen Linear weights x bytes per weight at the precision (fp32 4, int8 1
                            + a float scale a row, nf4 0.5 + a float a block of 64) + every other
                            frozen tensor at 4 bytes
    trainable               4 x 4 bytes a trainable value (weight, gradient, AdamW's two moments)
    activations per clip    per encoder input (keyframe or audio window) of T tokens, width D,
                            H heads: T x (ACTIVATION_FLOATS x D + H x T) floats saved for backward per
                            trained layer (the layers from the split: LoRA's), 4 bytes each; set from
                            ViT-B/16 + AST-base, LoRA on the last 2 layers, batch 4 (bench_edge_training:
                            a training step's peak 2374 MB over the 693 MB base, 420 MB a clip; this
                            gives 431, with LoRA on all 12 layers 2584)
The memory a device offers is its agent's `memory-mb` (all the device has by default), or the
device class's budget in a simulation; without one the plan is the configured one in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders.prefix import hidden_before
from edgefed.common.model.base_precision import NF4_BLOCK, BasePrecision, frozen_linears
from edgefed.common.model.classifier import MultimodalClassifier
from edgefed.common.model.inputs import model_inputs
from edgefed.common.model.lora import classifier_of
from edgefed.common.wire.capabilities import TOO_SMALL

RUNTIME_MB = 600.0
ACTIVATION_FLOATS = 24  # per token, per unit of width, per trained layer (see the module docstring)
PRECISIONS: tuple[BasePrecision, ...] = ("fp32", "int8", "nf4")
MB = 2**20


class DeviceTooSmall(RuntimeError):
    """No plan fits the device's memory: it must not start training (the OOM killer would end it mid-round)."""


@dataclass(frozen=True)
class Footprint:
    """What the model needs in memory, from the built float32 model (before any quantization)."""

    frozen_linear_params: int  # weights of the frozen Linear layers: what int8 / nf4 store smaller
    frozen_linear_rows: int  # their output rows (int8 keeps a float scale per row)
    other_frozen_params: int  # every other frozen tensor (embeddings, norms, biases, convolutions)
    trainable_params: int
    activation_mb_per_clip: float

    @classmethod
    def of(cls, model: nn.Module, cfg: EdgefedConfig) -> Footprint:
        linears = [model.get_submodule(name) for name in frozen_linears(model)]
        linear_weights = {id(m.weight) for m in linears}
        frozen = [t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad]
        return cls(
            frozen_linear_params=sum(m.weight.numel() for m in linears),
            frozen_linear_rows=sum(m.out_features for m in linears),
            other_frozen_params=sum(t.numel() for t in frozen if id(t) not in linear_weights),
            trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            activation_mb_per_clip=_activation_mb(classifier_of(model), cfg),
        )

    def base_mb(self, precision: BasePrecision) -> float:
        linear = {"fp32": 4.0 * self.frozen_linear_params,
                  "int8": self.frozen_linear_params + 4.0 * self.frozen_linear_rows,
                  "nf4": 0.5 * self.frozen_linear_params + 4.0 * self.frozen_linear_params / NF4_BLOCK}[precision]
        return (linear + 4.0 * self.other_frozen_params) / MB

    def needed_mb(self, precision: BasePrecision, batch: int) -> float:
        return (RUNTIME_MB + self.base_mb(precision) + 16.0 * self.trainable_params / MB
                + batch * self.activation_mb_per_clip)


@dataclass(frozen=True)
class TrainingPlan:
    precision: BasePrecision
    batch_size: int
    threads: int
    prefix_cache: bool
    needed_mb: float  # the estimate for this plan
    memory_mb: float | None  # what the device offers; None: not known, the configured plan

    def describe(self) -> str:
        memory = f" of {self.memory_mb:.0f} MB" if self.memory_mb else ""
        return (f"{self.precision} base, batch {self.batch_size}, {self.threads} threads, prefix cache "
                f"{'on' if self.prefix_cache else 'off'} (needs ~{self.needed_mb:.0f} MB{memory})")


def plan_training(cfg: EdgefedConfig, footprint: Footprint, memory_mb: float | None,
                  cores: int | None) -> TrainingPlan:
    """The plan for this device (module docstring); DeviceTooSmall when none fits."""
    threads = max(1, min(cfg.client_threads, cores)) if cores else cfg.client_threads
    prefix = cfg.lora_layers > 0 and cfg.prefix_cache_mb > 0
    precisions = PRECISIONS if cfg.base_precision == "auto" else (cfg.base_precision,)
    if not memory_mb:
        precision = precisions[0]
        return TrainingPlan(precision, cfg.batch_size, threads, prefix, footprint.needed_mb(precision, cfg.batch_size),
                            None)
    usable = memory_mb * (1.0 - cfg.memory_headroom)
    for precision in precisions:
        batch = cfg.batch_size
        while batch >= 1:
            needed = footprint.needed_mb(precision, batch)
            if needed <= usable:
                return TrainingPlan(precision, batch, threads, prefix, needed, memory_mb)
            batch //= 2
    smallest = min(precisions, key=footprint.base_mb)
    raise DeviceTooSmall(
        f"{TOO_SMALL}: the model does not fit this device: the smallest plan ({smallest} base, batch 1) needs "
        f"~{footprint.needed_mb(smallest, 1):.0f} MB, the device offers {memory_mb:.0f} MB with "
        f"{cfg.memory_headroom:.0%} kept free (usable {usable:.0f} MB; base-precision {cfg.base_precision})")


def _activation_mb(model: MultimodalClassifier, cfg: EdgefedConfig) -> float:
    """Activations saved for backward per clip (module docstring): token counts from one embedding pass each."""
    shapes = model_inputs(cfg).shapes()
    floats = 0.0
    for loaded, shape in ((model.encoders["video_encoder"], shapes["frames"]),
                          (model.encoders["audio_encoder"], shapes["audio"])):
        inputs, sample = shape[0], tuple(shape[1:])
        probe = torch.zeros(1, *sample)
        if loaded.spec.preprocessing in ("tiny-image", "vit-image"):
            probe = model.pixels(probe.to(torch.uint8))
        tokens, width = hidden_before(loaded, probe, 0).shape[1:]
        config = loaded.config
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "encoder_attention_heads", 1))
        trained = min(cfg.lora_layers, loaded.num_layers) if cfg.lora_layers else loaded.num_layers
        floats += inputs * tokens * trained * (ACTIVATION_FLOATS * width + heads * tokens)
    return 4.0 * floats / MB
