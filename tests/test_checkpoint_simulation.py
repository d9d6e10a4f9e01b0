"""Integration: `edgefed simulate` on a base of two encoder checkpoints (a tiny ViT and a tiny AST), and on
the base checkpoint `edgefed cloud train` writes (a warm start).

The cloud ships the base through the model service; every device fetches and verifies it, trains
LoRA on it, and installs and scores the deployed INT8 model.
"""

from __future__ import annotations

import filecmp

import pytest

from edgefed.cloud.training.ddp_trainer import train
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import load_features
from edgefed.common.evaluation import evaluate
from edgefed.common.model.base_checkpoint import HEAD_FILE
from edgefed.common.wire.base_manifest import base_fingerprint_of_dirs
from edgefed.simulations.prepare import prepare
from edgefed.simulations.runner import run_federation
from edgefed.simulations.synthetic import SyntheticSpec
from tests.checkpoints import make_checkpoint

pytestmark = pytest.mark.integration


def _checkpoint_federation(tmp_path, clients: int = 2, **overrides):
    vit, ast = make_checkpoint("vit", tmp_path / "vit").path, make_checkpoint("ast", tmp_path / "ast").path
    settings = dict(out_dir=str(tmp_path / "runs"), run_id="checkpoints", video_encoder=str(vit),
                    audio_encoder=str(ast), hidden_size=32, num_heads=2, intermediate_size=64, max_versions=2,
                    buffer_size=2, local_epochs=1, min_clients=2, seed=5, export_every=2,
                    parity_min_agreement=0.5)  # 16 central clips; the gate itself is tested elsewhere
    cfg = EdgefedConfig(**{**settings, **overrides})
    spec = SyntheticSpec(num_clips=32, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=5)
    data = prepare(tmp_path / "data", cfg, num_clients=clients, alpha=1.0, synthetic=spec)
    run = run_federation(cfg.replace(data_dir=str(data.layout.root)), num_clients=clients)
    return run, data, vit, ast


def _assert_devices_installed_the_base(data, vit, ast, clients: int = 2) -> None:
    fingerprint = base_fingerprint_of_dirs(vit, ast)
    for device in (f"client-{i}" for i in range(clients)):
        installed = data.layout.root / "devices" / device / "bases" / fingerprint
        for part, source in (("video", vit), ("audio", ast)):
            for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
                assert filecmp.cmp(installed / part / name, source / name, shallow=False), (device, part, name)


def test_simulate_on_checkpoint_encoders_ships_the_base_and_deploys(tmp_path):
    run, data, vit, ast = _checkpoint_federation(tmp_path)

    summary = run.read_json("summary.json")
    deployed = summary["deployed_model"]
    assert summary["versions"] == 2 and summary["mode"] == "async"
    assert deployed["published"] and deployed["devices"] == deployed["devices_installed"] == 2, deployed
    assert deployed["device_errors"] == 0 and deployed["federated_examples"] > 0, deployed
    _assert_devices_installed_the_base(data, vit, ast)


def test_secure_aggregation_rounds_ship_the_base_too(tmp_path):
    """SecAgg+ rounds speak Flower's legacy FitIns; their config announces the model service like the others."""
    run, data, vit, ast = _checkpoint_federation(tmp_path, clients=3, mode="sync", secure_aggregation="secaggplus",
                                                 num_rounds=1, min_clients=3, export_every=0)

    summary = run.read_json("summary.json")
    assert summary["mode"] == "sync" and summary["rounds"] == 1, summary
    (round_1,) = [line for line in run.read_metrics() if line.get("version") == 1]
    assert round_1["clients"] == 3 and round_1["failures"] == 0, round_1  # every device trained on the fetched base
    _assert_devices_installed_the_base(data, vit, ast, clients=3)


def test_simulate_warm_started_from_the_cloud_trainers_checkpoint_ships_its_encoders(tmp_path):
    cfg = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="warm", hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, max_versions=2, buffer_size=2, local_epochs=1, min_clients=2, seed=5,
                        export_every=2, parity_min_agreement=0.5, trainer_batch_size=8, trainer_steps=6,
                        trainer_warmup_steps=1, trainer_checkpoint_every=100)
    spec = SyntheticSpec(num_clips=32, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=5)
    data = prepare(tmp_path / "data", cfg, num_clients=2, alpha=1.0, synthetic=spec)
    central = load_features(data.layout.central_features)
    trained, model = train(cfg, central, tmp_path / "cloud")
    checkpoint = trained.base_checkpoint

    run = run_federation(cfg.replace(data_dir=str(data.layout.root), base_checkpoint=str(checkpoint)), num_clients=2)

    summary = run.read_json("summary.json")
    deployed = summary["deployed_model"]
    # the federation's version 0 is the trained model (LoRA starts at zero)
    assert summary["initial_accuracy"] == evaluate(model, central, cfg.eval_batch_size).accuracy
    assert summary["versions"] == 2 and deployed["published"], deployed
    assert deployed["devices"] == deployed["devices_installed"] == 2 and deployed["device_errors"] == 0, deployed
    fingerprint = base_fingerprint_of_dirs(checkpoint / "video", checkpoint / "audio")
    for device in ("client-0", "client-1"):
        installed = data.layout.root / "devices" / device / "bases" / fingerprint
        assert not (installed / HEAD_FILE).exists()  # the head reaches devices in the global adapter
        for part in ("video", "audio"):
            for name in ("config.json", "model.safetensors"):
                assert filecmp.cmp(installed / part / name, checkpoint / part / name, shallow=False), (device, part, name)
