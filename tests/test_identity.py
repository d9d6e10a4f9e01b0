from flwr.app import Context, RecordDict

from edgefed.common.config import EdgefedConfig
from edgefed.edge.identity import NodeIdentity


def _ctx(node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_simulated_and_deployed_devices_get_their_own_state_folder(tmp_path):
    cfg = EdgefedConfig(data_dir=str(tmp_path))
    sim = NodeIdentity.for_context(cfg, _ctx({"partition-id": 3}))
    assert sim.device_id == "client-3"
    assert sim.key_dir == tmp_path / "keys" / "devices" / "client-3"
    assert sim.state_dir == tmp_path / "devices" / "client-3"
    a = NodeIdentity.for_context(cfg, _ctx({"device-id": "cam-1", "key-dir": str(tmp_path / "k" / "cam-1")}))
    b = NodeIdentity.for_context(cfg, _ctx({"device-id": "cam-2", "key-dir": str(tmp_path / "k" / "cam-2")}))
    assert a.state_dir != b.state_dir  # sibling key folders must not share one residual
    pinned = NodeIdentity.for_context(cfg, _ctx({"device-id": "cam-1", "state-dir": str(tmp_path / "s")}))
    assert pinned.state_dir == tmp_path / "s"
