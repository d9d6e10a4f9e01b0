"""The cloud's DDP trainer on CPU (gloo): rank agreement, 1 vs 2 ranks, resume on the same curve, its base checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgefed.cloud.training.ddp_trainer import TrainerConfigError, lr_at, micro_batch_indices, train
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet, save_features
from edgefed.common.model.base_checkpoint import BaseCheckpointError
from edgefed.common.model.classifier import build_base_model
from edgefed.common.wire.base_manifest import base_fingerprint_of_dirs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["hidden-size=32", "num-layers=1", "num-heads=2", "intermediate-size=64", "image-size=32", "n-mels=32",
        "audio-frames=32", "num-keyframes=2", "trainer-batch-size=8", "trainer-steps=6", "trainer-warmup-steps=2",
        "trainer-learning-rate=0.002", "trainer-checkpoint-every=3"]


def _data(n: int = 48, seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    frames = torch.randint(0, 256, (n, 2, 3, 32, 32), dtype=torch.uint8, generator=g)
    frames[:, :, 0] = (labels[:, None, None, None] * 60).to(torch.uint8)  # a learnable cue
    audio = (torch.randn(n, 2, 32, 32, generator=g) * 2 - 6).half()
    return FeatureSet(frames, torch.ones(n, 2, dtype=torch.bool), audio, torch.ones(n, 2, dtype=torch.bool), labels)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "trainer.jsonl").read_text().splitlines()]


def test_two_ranks_agree_with_each_other_and_with_one_rank(tmp_path):
    features = tmp_path / "features.safetensors"
    save_features(_data(), features)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                        str(ROOT / "tests" / "ddp_worker.py"), str(features), str(out), *TINY],
                       check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)
    rank0, rank1 = load_file(str(tmp_path / "r2" / "rank0.safetensors")), load_file(str(tmp_path / "r2" / "rank1.safetensors"))
    single = load_file(str(tmp_path / "r1" / "rank0.safetensors"))
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(value, single[name], atol=2e-4, rtol=1e-3, msg=f"{name}: 2 ranks vs 1")
    assert _losses(tmp_path / "r2") == pytest.approx(_losses(tmp_path / "r1"), abs=1e-4)
    # rank 0 wrote the base checkpoint of the model every rank holds
    warm = build_base_model(EdgefedConfig().with_overrides([*TINY, f"base-checkpoint={tmp_path / 'r2' / 'checkpoint'}"]))
    for name, value in warm.state_dict().items():
        assert torch.equal(value, rank0[name]), f"{name}: the base checkpoint is not the trained model"


def test_resume_continues_the_same_loss_curve(tmp_path):
    cfg = EdgefedConfig().with_overrides(TINY)
    data = _data()
    _, straight = train(cfg, data, tmp_path / "straight")
    train(cfg, data, tmp_path / "resumed", stop_after=3)  # preempted after a checkpoint
    assert len(_losses(tmp_path / "resumed")) == 3 and not (tmp_path / "resumed" / "checkpoint").exists()
    summary, resumed = train(cfg, data, tmp_path / "resumed")
    assert summary.steps == 3
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "straight"), abs=1e-6)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert _losses(tmp_path / "straight")[-1] < _losses(tmp_path / "straight")[0]


def test_ranks_split_the_global_batch_a_single_process_takes():
    n, step, per_rank, world = 40, 7, 4, 2
    union = torch.cat([micro_batch_indices(n, step, 0, 1, per_rank, world, r, seed=3) for r in range(world)])
    single = micro_batch_indices(n, step, 0, 1, per_rank * world, 1, 0, seed=3)
    assert sorted(union.tolist()) == sorted(single.tolist())


def test_schedule_and_batch_split(tmp_path):
    cfg = EdgefedConfig().with_overrides(["trainer-steps=100", "trainer-warmup-steps=10", "trainer-learning-rate=0.01"])
    assert lr_at(0, cfg.trainer) == pytest.approx(0.001) and lr_at(9, cfg.trainer) == pytest.approx(0.01)
    assert lr_at(55, cfg.trainer) == pytest.approx(0.005) and lr_at(99, cfg.trainer) < 1e-4
    with pytest.raises(TrainerConfigError, match="not divisible"):
        train(EdgefedConfig().with_overrides([*TINY, "trainer-batch-size=7", "trainer-grad-accum=2"]), _data(), tmp_path)


def test_a_warm_base_checkpoint_is_what_every_node_builds(tmp_path):
    from edgefed.common.model.lora import base_identity, build_lora_model

    cfg = EdgefedConfig().with_overrides(TINY)
    summary, _ = train(cfg, _data(), tmp_path)
    warm = cfg.replace(base_checkpoint=str(summary.base_checkpoint))
    fingerprint = base_identity(warm, build_lora_model(warm))
    # the hash of its encoders' files, as for any checkpoint base: what the model service ships
    assert fingerprint == base_fingerprint_of_dirs(summary.base_checkpoint / "video", summary.base_checkpoint / "audio")
    assert fingerprint != base_identity(cfg, build_lora_model(cfg))
    assert base_identity(warm, build_lora_model(warm)) == fingerprint
    with pytest.raises(BaseCheckpointError, match="no such directory"):
        build_lora_model(cfg.replace(base_checkpoint=str(tmp_path / "missing")))


def test_training_again_replaces_the_base_checkpoint_only_with_a_finished_one(tmp_path):
    cfg = EdgefedConfig().with_overrides(TINY)
    first, _ = train(cfg, _data(), tmp_path)
    head = (first.base_checkpoint / "head.safetensors").read_bytes()
    longer = cfg.replace(trainer_steps=8)
    train(longer, _data(), tmp_path, stop_after=1)  # preempted: the finished checkpoint stays
    assert (first.base_checkpoint / "head.safetensors").read_bytes() == head
    second, model = train(longer, _data(), tmp_path)
    assert second.base_checkpoint == first.base_checkpoint
    reloaded = build_base_model(longer.replace(base_checkpoint=str(second.base_checkpoint)))
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in reloaded.state_dict().items())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging folder left behind"
