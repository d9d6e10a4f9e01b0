"""`edgefed simulate --ray-address`: the clients run on an existing Ray cluster, spread over its nodes."""

from __future__ import annotations

import pytest

from edgefed.common.config import EdgefedConfig
from edgefed.simulations.prepare import prepare
from edgefed.simulations.runner import run_federation
from edgefed.simulations.synthetic import SyntheticSpec
from tests.servers import RayCluster

pytestmark = pytest.mark.integration


def test_a_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(tmp_path):
    cfg = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="on-ray", max_versions=2, buffer_size=2,
                        local_epochs=1, min_clients=2, seed=4)
    spec = SyntheticSpec(num_clips=24, width=64, height=48, fps=6, duration_s=1.0, shots=1, seed=4)
    data = prepare(tmp_path / "data", cfg, num_clients=2, alpha=10.0, synthetic=spec)
    with RayCluster(cpus=(1, 1)) as cluster:
        # a whole CPU each, and a node has one: the two actors can only be one on each node
        run = run_federation(cfg.replace(data_dir=str(data.layout.root)), num_clients=2, ray_address=cluster.address,
                             client_cpus=1.0)
        nodes = cluster.client_actor_nodes()
    assert [v["version"] for v in run.read_metrics()] == [1, 2]
    assert len(nodes) == 2, f"the ClientApp actors ran on {len(nodes)} node(s)"


def test_an_unreachable_ray_cluster_is_a_clear_error(tmp_path):
    from tests.servers import free_port

    cfg = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="nowhere", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot reach the Ray cluster at 127.0.0.1"):
        run_federation(cfg, num_clients=2, ray_address=f"127.0.0.1:{free_port()}")
