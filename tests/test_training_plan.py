"""A device plans its training for the memory it offers: the float base while it fits, then a smaller batch,
then int8, then NF4, and a clear refusal when nothing fits. The device model applies the plan."""

from __future__ import annotations

import pytest
import torch

from edgefed.common.config import EdgefedConfig
from edgefed.common.model.base_precision import Int8Linear, NF4Linear
from edgefed.common.model.lora import build_lora_model
from edgefed.common.wire.capabilities import TOO_SMALL
from edgefed.edge.training.device_model import DeviceModel, device_model
from edgefed.edge.training.plan import RUNTIME_MB, DeviceTooSmall, Footprint, plan_training
from tests.test_prefix_cache import SMALL, _features

# A base that dominates its activations, as a real encoder pair does: wider tiny encoders, LoRA on the last layer.
BIG = {**SMALL, "hidden_size": 256, "num_heads": 4, "intermediate_size": 1024, "batch_size": 8}


@pytest.fixture(scope="module")
def footprint() -> Footprint:
    cfg = EdgefedConfig(**BIG)
    return Footprint.of(build_lora_model(cfg), cfg)


def _between(footprint: Footprint, low: tuple[str, int], high: tuple[str, int], headroom: float = 0.15) -> float:
    """A memory (MB) that holds plan `low` and not plan `high`."""
    need_low, need_high = footprint.needed_mb(*low), footprint.needed_mb(*high)
    assert need_low < need_high
    return (need_low + need_high) / 2 / (1 - headroom)


def test_the_footprint_counts_the_model_and_the_quantized_bases_are_smaller(footprint):
    cfg = EdgefedConfig(**BIG)
    model = build_lora_model(cfg)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert footprint.frozen_linear_params + footprint.other_frozen_params >= frozen
    assert footprint.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert footprint.frozen_linear_params > 0.8 * frozen  # the Linear weights are the base
    fp32, int8, nf4 = (footprint.base_mb(p) for p in ("fp32", "int8", "nf4"))
    assert int8 < 0.4 * fp32 and nf4 < int8
    assert footprint.activation_mb_per_clip > 0
    assert footprint.needed_mb("fp32", 2) - footprint.needed_mb("fp32", 1) == pytest.approx(
        footprint.activation_mb_per_clip)


def test_plenty_of_memory_or_none_known_keeps_the_configured_plan(footprint):
    cfg = EdgefedConfig(**BIG, client_threads=4)
    plan = plan_training(cfg, footprint, 64_000, cores=2)
    assert (plan.precision, plan.batch_size, plan.threads, plan.prefix_cache) == ("fp32", 8, 2, True)
    unknown = plan_training(cfg, footprint, None, None)
    assert (unknown.precision, unknown.batch_size, unknown.threads, unknown.memory_mb) == ("fp32", 8, 4, None)


def test_the_float_base_is_kept_with_a_smaller_batch_while_one_fits(footprint):
    cfg = EdgefedConfig(**BIG)
    memory = _between(footprint, ("fp32", 2), ("fp32", 4))
    plan = plan_training(cfg, footprint, memory, None)
    assert (plan.precision, plan.batch_size) == ("fp32", 2)
    assert plan.needed_mb <= memory * 0.85


def test_a_device_that_cannot_hold_the_float_base_gets_int8_then_nf4(footprint):
    cfg = EdgefedConfig(**BIG)
    memory = _between(footprint, ("int8", 8), ("fp32", 1))
    assert plan_training(cfg, footprint, memory, None).precision == "int8"
    memory = _between(footprint, ("nf4", 1), ("int8", 1))
    plan = plan_training(cfg, footprint, memory, None)
    assert plan.precision == "nf4" and plan.batch_size >= 1


def test_a_device_that_holds_no_base_is_refused_with_the_numbers(footprint):
    cfg = EdgefedConfig(**BIG)
    with pytest.raises(DeviceTooSmall) as refusal:
        plan_training(cfg, footprint, RUNTIME_MB * 0.9, None)
    message = str(refusal.value)
    assert message.startswith(TOO_SMALL) and "nf4 base, batch 1" in message and f"{RUNTIME_MB * 0.9:.0f} MB" in message


def test_a_forced_precision_is_the_only_one_tried(footprint):
    memory = _between(footprint, ("int8", 8), ("fp32", 1))
    with pytest.raises(DeviceTooSmall, match="base-precision fp32"):
        plan_training(EdgefedConfig(**BIG, base_precision="fp32"), footprint, memory, None)
    assert plan_training(EdgefedConfig(**BIG, base_precision="nf4"), footprint, 64_000, None).precision == "nf4"


def test_the_device_model_applies_its_plan(footprint, tmp_path):
    cfg = EdgefedConfig(**BIG)
    memory = _between(footprint, ("nf4", 1), ("int8", 1))
    held = DeviceModel.build(cfg, memory, 1, tmp_path)
    assert held.plan.precision == "nf4"
    assert any(isinstance(m, NF4Linear) for m in held.model.modules())
    assert not any(isinstance(m, Int8Linear) for m in held.model.modules())
    assert held.prefix is not None and held.prefix.folder == tmp_path / "prefix"
    data = _features(cfg, 4)
    train_cfg = held.training_config(cfg)
    assert train_cfg.batch_size == held.plan.batch_size and train_cfg.client_threads == 1
    with torch.no_grad():
        logits = held.forward(data)  # through the cache, on the quantized base
    assert logits.shape == (4, cfg.num_classes) and torch.isfinite(logits).all()
    assert held.metrics()["base-bits"] == 4 and held.metrics()["prefix-cache-misses"] == 4
    without_cache = DeviceModel.build(cfg.replace(prefix_cache_mb=0), memory, 1, tmp_path)
    assert without_cache.prefix is None and without_cache.starts == held.starts  # still trains through the split
    without_cache.model.eval()
    with torch.no_grad():
        split = without_cache.forward(data)
        whole = without_cache.model(data.frames, data.frame_mask, data.audio, data.audio_mask)
    assert torch.allclose(split, whole, atol=1e-5)
    assert DeviceModel.build(cfg.replace(lora_layers=0), None, 1, tmp_path).forward is None  # the model's own


def test_a_refusal_is_remembered_not_rebuilt(footprint, tmp_path, monkeypatch):
    cfg = EdgefedConfig(**BIG)
    builds = []
    original = DeviceModel.build.__func__
    monkeypatch.setattr(DeviceModel, "build", classmethod(lambda cls, *a: builds.append(1) or original(cls, *a)))
    for _ in range(2):
        with pytest.raises(DeviceTooSmall):
            device_model(cfg, 100.0, None, tmp_path)
    assert len(builds) == 1


def test_a_simulated_fleet_trains_each_device_at_the_precision_its_memory_holds_and_leaves_out_one_that_holds_none(
        tmp_path, footprint):
    """memory-tiers, 4 devices: the two workstations hold the float base, the phone only int8, the watch nothing
    (budgets set for this small model with `device-memory`); the watch refuses with its reason, gets no more
    work, and the versions keep coming from the other three. One task at a time (`concurrency` 1), given least
    served first: the first four tasks reach the four devices, so by version 4 (eight updates) each of the three
    that can train has reported its plan, however fast or slow each one is."""
    from edgefed.simulations.prepare import prepare
    from edgefed.simulations.runner import run_federation
    from edgefed.simulations.synthetic import SyntheticSpec

    int8_only = _between(footprint, ("int8", BIG["batch_size"]), ("fp32", 1))
    cfg = EdgefedConfig(**BIG, out_dir=str(tmp_path / "runs"), run_id="memory", max_versions=4, buffer_size=2,
                        local_epochs=1, min_clients=4, concurrency=1, seed=3, device_profile="memory-tiers",
                        device_memory=f"phone={int8_only:.0f},watch={RUNTIME_MB / 2:.0f}")
    spec = SyntheticSpec(num_clips=32, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=3)
    data = prepare(tmp_path / "data", cfg, num_clients=4, alpha=10.0, synthetic=spec)

    run = run_federation(cfg.replace(data_dir=str(data.layout.root)), num_clients=4)

    versions = run.read_metrics()
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    refused = versions[-1]["refused_devices"]
    assert len(refused) == 1 and next(iter(refused.values())).startswith(TOO_SMALL)
    (watch,) = refused
    assert sum(v["failure_kinds"].get("too-small", 0) for v in versions) == 1  # refused once, then left out
    assert all(watch not in map(str, v["devices"]) for v in versions)
    assert sorted(versions[-1]["base_bits_by_device"].values()) == [8, 32, 32]
