"""The model a device trains: built once per process, planned for the device's memory, quantized if the
plan says so, with its frozen-prefix cache.

    DeviceModel.build(cfg, memory_mb, cores, cache_dir)
        build_lora_model ──► base identity (of the float32 base: every precision shares it)
                         ──► Footprint + plan_training ──► quantize_frozen_base(plan.precision)
                         ──► PrefixCache(<cache-dir>/prefix) when the plan uses it

A simulated or real node handles many rounds in one process; `device_model` keeps the last one
built (rebuilt only when the model config or what the plan depends on changes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from edgefed.common.config import MODEL_FIELDS, EdgefedConfig
from edgefed.common.model.base_precision import quantize_frozen_base
from edgefed.common.model.lora import base_identity, build_lora_model, classifier_of
from edgefed.common.training import Forward
from edgefed.common.wire.capabilities import BASE_BITS
from edgefed.edge.training.plan import DeviceTooSmall, Footprint, TrainingPlan, plan_training
from edgefed.edge.training.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

PREFIX_FOLDER = "prefix"
PRECISION_BITS = {"fp32": 32, "int8": 8, "nf4": 4}


@dataclass
class DeviceModel:
    model: PeftModel
    identity: str  # the base's identity, which every node's must match
    plan: TrainingPlan
    prefix: PrefixCache | None
    starts: tuple[int, int] | None  # where each encoder's trainable top begins (lora-layers > 0), else None

    @classmethod
    def build(cls, cfg: EdgefedConfig, memory_mb: float | None, cores: int | None,
              cache_dir: Path | None) -> DeviceModel:
        # A device has no head file: the projections, fusion and head are trainable, so every instruction's
        # global adapter sets them; a warm start's head reaches devices as version 0.
        model = build_lora_model(cfg, load_head=False)
        # hashed once per build: a checkpoint base's files are re-checked by ensure_base on every message
        identity = base_identity(cfg, model)
        plan = plan_training(cfg, Footprint.of(model, cfg), memory_mb, cores)  # raises DeviceTooSmall
        quantize_frozen_base(model, plan.precision)
        starts = classifier_of(model).prefix_starts(cfg.lora_layers) if cfg.lora_layers else None
        prefix = None
        if plan.prefix_cache and cache_dir is not None and starts is not None:
            prefix = PrefixCache(cache_dir / PREFIX_FOLDER, cfg.prefix_cache_mb * 2**20, f"{identity}|{plan.precision}",
                                 starts)
        log.info("device training plan: %s", plan.describe())
        return cls(model, identity, plan, prefix, starts)

    def training_config(self, cfg: EdgefedConfig) -> EdgefedConfig:
        """`cfg` with the plan's batch size and threads."""
        return cfg.replace(batch_size=self.plan.batch_size, client_threads=self.plan.threads)

    @property
    def forward(self) -> Forward | None:
        """The training forward: from the prefix cache when the plan uses one; through the split without it
        when LoRA is on the last layers only (the prefix recomputed each step, the top as the cache's);
        else the model's own."""
        classifier, cache, starts = classifier_of(self.model), self.prefix, self.starts
        if cache is not None:
            return lambda batch: cache.forward(classifier, batch)
        if starts is not None:
            return lambda b: classifier.forward_split(b.frames, b.frame_mask, b.audio, b.audio_mask, starts)
        return None

    def metrics(self) -> dict[str, float]:
        """What the plan chose, for the reply's metrics (numbers only, as Flower's MetricRecord holds)."""
        out = {BASE_BITS: PRECISION_BITS[self.plan.precision], "train-batch-size": self.plan.batch_size,
               "plan-needed-mb": round(self.plan.needed_mb, 1)}
        if self.prefix is not None:
            out.update({"prefix-cache-hits": self.prefix.hits, "prefix-cache-misses": self.prefix.misses})
        return out


_CURRENT: dict[str, DeviceModel | DeviceTooSmall] = {}


def device_model(cfg: EdgefedConfig, memory_mb: float | None, cores: int | None, cache_dir: Path | None) -> DeviceModel:
    """This process's model for `cfg` on this device (built on first use, kept between messages)."""
    key = "|".join([cfg.fingerprint([*MODEL_FIELDS, "base_precision", "prefix_cache_mb", "memory_headroom",
                                     "batch_size", "client_threads"]), str(memory_mb), str(cores), str(cache_dir)])
    if key not in _CURRENT:
        _CURRENT.clear()
        try:
            _CURRENT[key] = DeviceModel.build(cfg, memory_mb, cores, cache_dir)
        except DeviceTooSmall as refusal:  # kept: the next instruction is refused without building the model again
            _CURRENT[key] = refusal
    current = _CURRENT[key]
    if isinstance(current, DeviceTooSmall):
        raise current
    return current
