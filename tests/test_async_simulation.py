"""Integration: the asynchronous ServerApp on Flower's simulation engine."""

from __future__ import annotations

import pytest

from edgefed.common.config import EdgefedConfig
from edgefed.simulations.device_profiles import PROFILES, device_class
from edgefed.simulations.prepare import prepare
from edgefed.simulations.runner import run_federation
from edgefed.simulations.synthetic import SyntheticSpec

pytestmark = pytest.mark.integration


def test_async_run_with_30_percent_dropout_completes(tmp_path):
    """`flaky` devices lose 3 tasks in 10: they are counted and replaced, and the versions keep coming."""
    assert PROFILES["flaky"][0].dropout == 0.3
    cfg = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="flaky", max_versions=8, buffer_size=2,
                        local_epochs=1, min_clients=4, seed=3, device_profile="flaky")
    spec = SyntheticSpec(num_clips=64, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=3)
    data = prepare(tmp_path / "data", cfg, num_clients=4, alpha=1.0, synthetic=spec)

    run = run_federation(cfg.replace(data_dir=str(data.layout.root)), num_clients=4)

    versions = run.read_metrics()
    assert [v["version"] for v in versions] == list(range(1, 9))
    assert all(v["mode"] == "async" and v["accepted"] == v["clients"] == 2 for v in versions)
    assert sum(v["failures"] for v in versions) > 0, "with 30% dropout some tasks must have failed"
    assert all(set(v) >= {"staleness_histogram", "buffer_wait_s", "clients_in_flight", "rejected", "wall_s"}
               for v in versions)
    assert sum(sum(v["staleness_histogram"].values()) for v in versions) == 16
    summary = run.read_json("summary.json")
    assert summary["mode"] == "async" and summary["versions"] == 8
    # Every version moved the model and it stayed finite. Whether it learns is measured where the data is big
    # enough to tell (benchmarks/bench_async.py; the sync test): 8 noisy versions on 64 clips are not.
    assert all(v["update_norm"] > 0 for v in versions)
    assert summary["final_loss"] is not None  # NaN is written as null
    assert run.read_json("checkpoint.json")["version"] == 8
    # downlink: after its first task a device is sent the difference from the adapter it holds (a task lost
    # to dropout makes the cloud forget it: the whole adapter again; how many are lost varies from run to run),
    # and a delta is only ever sent when it is smaller than the whole adapter
    assert sum(v["downlink_deltas"] for v in versions) > 0
    assert sum(v["bytes_sent"] for v in versions) < sum(v["bytes_sent_full_adapter"] for v in versions)
    whole = max(v["bytes_sent_full_adapter"] // max(v["downlink_deltas"] + v["downlink_fulls"], 1) for v in versions)
    assert all(v["bytes_sent"] <= v["downlink_fulls"] * whole + v["downlink_deltas"] * 0.5 * whole for v in versions)


def test_mobile_skewed_has_a_long_tail() -> None:
    classes = [device_class("mobile-skewed", i, 8) for i in range(8)]
    assert [c.name for c in classes].count("flagship") == 4
    assert min(c.speed for c in classes) <= 0.15 < max(c.speed for c in classes)
    with pytest.raises(ValueError, match="unknown device profile"):
        device_class("no-such", 0, 1)
