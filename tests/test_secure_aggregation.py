"""SecAgg+ (Flower's legacy workflow) as an option of the synchronous mode."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from edgefed.common.config import EdgefedConfig
from edgefed.common.model.lora import build_lora_model, get_adapter_state
from edgefed.simulations.prepare import prepare
from edgefed.simulations.runner import run_federation
from edgefed.simulations.synthetic import SyntheticSpec

pytestmark = pytest.mark.integration


def test_secaggplus_matches_plain_fedavg(tmp_path):
    """Same data, seeds and clients: the SecAgg+ global adapter equals plain FedAvg's up to its quantization."""
    spec = SyntheticSpec(num_clips=72, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=8)
    base = EdgefedConfig(out_dir=str(tmp_path / "runs"), mode="sync", num_rounds=1, local_epochs=1, min_clients=3, seed=8)
    data = prepare(tmp_path / "data", base, num_clients=3, alpha=1.0, synthetic=spec)
    base = base.replace(data_dir=str(data.layout.root))

    plain = run_federation(base.replace(run_id="plain", transport="plain", update_codec="none",
                                        downlink_codec="none"), num_clients=3)
    secure = run_federation(base.replace(run_id="secagg", secure_aggregation="secaggplus"), num_clients=3)

    a = load_file(str(plain.path / "adapter_final.safetensors"))
    b = load_file(str(secure.path / "adapter_final.safetensors"))
    assert a.keys() == b.keys()
    initial = get_adapter_state(build_lora_model(base))
    moved = max(float((a[n] - initial[n]).abs().max()) for n in a)
    assert moved > 1e-3  # the round did change the adapter, so agreement below means something
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert diff < 1e-4, diff
    rounds = secure.read_metrics()
    assert len(rounds) == 1 and rounds[0]["clients"] == 3
