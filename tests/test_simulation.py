"""Integration: the real apps on Flower's simulation engine (Ray actors), end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgefed.common.config import EdgefedConfig
from edgefed.common.run_dir import RunDir
from edgefed.simulations.prepare import prepare
from edgefed.simulations.runner import run_federation
from edgefed.simulations.synthetic import SyntheticSpec

pytestmark = pytest.mark.integration


def test_three_clients_two_rounds_improve_the_global_model(tmp_path):
    cfg = EdgefedConfig(
        out_dir=str(tmp_path / "runs"), run_id="it", mode="sync", num_rounds=2, local_epochs=3, min_clients=3, seed=5
    )
    spec = SyntheticSpec(num_clips=96, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=5)
    data = prepare(tmp_path / "data", cfg, num_clients=3, alpha=1.0, synthetic=spec)
    cfg = cfg.replace(data_dir=str(data.layout.root))

    run = run_federation(cfg, num_clients=3)

    rounds = run.read_metrics()
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in rounds)
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in rounds)
    summary = run.read_json("summary.json")
    assert summary["final_accuracy"] > summary["initial_accuracy"]
    assert (run.path / "adapter_final.safetensors").stat().st_size > 0
    assert (run.path / "model_merged.safetensors").stat().st_size > 0
    assert RunDir(run.path).read_json("config.json")["num-rounds"] == 2


def test_unregistered_device_is_refused_counted_and_the_run_goes_on(tmp_path):
    """Sealed transport (the default): a device missing from the registry has every update refused."""
    from edgefed.common.keys import DeviceRegistry

    cfg = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="sealed", mode="sync", num_rounds=2, local_epochs=2,
                        min_clients=3, seed=6)
    spec = SyntheticSpec(num_clips=72, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=6)
    data = prepare(tmp_path / "data", cfg, num_clients=3, alpha=1.0, synthetic=spec)
    assert DeviceRegistry(data.layout.root / "keys" / "cloud" / "registry.json").revoke("client-2")
    cfg = cfg.replace(data_dir=str(data.layout.root))

    run = run_federation(cfg, num_clients=3)

    rounds = run.read_metrics()
    assert len(rounds) == 2
    assert all(r["clients"] == 2 and r["rejected"] == {"unknown-device": 1} for r in rounds)
    assert rounds[-1]["version"] == 2  # both rounds aggregated the two good updates
    # the uplink is compressed: far fewer bytes than the float32 adapter per update
    adapter_bytes = run.read_json("summary.json")["adapter_bytes"]
    assert rounds[0]["bytes_received"] / 3 < adapter_bytes / 10


def test_cli_rejects_unknown_run_config_key_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgefed", "simulate", "--out", str(tmp_path), "--set", "no-such-key=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown run-config key" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
