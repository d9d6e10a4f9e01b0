"""`edgefed simulate --ray-address`: the clients run on an existing Ray cluster, spread over its nodes."""

from __future__ import annotations

import pytest

from edgefed.common.config import EdgefedConfig
from edgefed.simulations.runner import run_federation
from tests.servers import simulate_on_two_ray_nodes

pytestmark = pytest.mark.integration


def test_a_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(tmp_path):
    versions, nodes = simulate_on_two_ray_nodes(tmp_path)
    assert versions == [1, 2]
    assert len(nodes) == 2, f"the ClientApp actors ran on {len(nodes)} node(s)"


def test_an_unreachable_ray_cluster_is_a_clear_error(tmp_path):
    from tests.servers import free_port

    cfg = EdgefedConfig(out_dir=str(tmp_path / "runs"), run_id="nowhere", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot reach the Ray cluster at 127.0.0.1"):
        run_federation(cfg, num_clients=2, ray_address=f"127.0.0.1:{free_port()}")
