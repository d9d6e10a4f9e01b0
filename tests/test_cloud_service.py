"""The cloud service's start-up checks and config, with a real redis-server; the running fleet is
tests/test_fleet_deployment.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed.cloud.fleet.certificates import write_fleet_certificates
from edgefed.cloud.fleet.service import CloudService, ServiceError, check_prerequisites, default_app_dir, load_service_config
from edgefed.cloud.fleet.superlink import SuperLinkError, SuperLinkProcess
from edgefed.common.config import ConfigError
from edgefed.common.keys import init_keys
from tests.servers import free_port


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cloud.toml"
    path.write_text(text)
    return path


def test_service_config_defaults_to_redis_and_names_bad_keys(tmp_path):
    cfg = load_service_config(_config(tmp_path, 'federation = "f"\n'), ["max-versions=3"])
    assert cfg.state_store == "redis://127.0.0.1:6379/0" and cfg.max_versions == 3 and cfg.node_auth
    assert load_service_config(_config(tmp_path, 'state-store = "redis://h:1/2"\n'), []).state_store == "redis://h:1/2"
    with pytest.raises(ConfigError, match="unknown run-config key 'colour'"):
        load_service_config(_config(tmp_path, "colour = 1\n"), [])
    with pytest.raises(ConfigError, match="expected flat run-config keys"):
        load_service_config(_config(tmp_path, "[service]\nport = 1\n"), [])
    with pytest.raises(ConfigError, match="unreadable config file"):
        load_service_config(_config(tmp_path, "federation = \n"), [])


def test_start_up_checks_name_what_is_missing(tmp_path, redis_server):
    keys = tmp_path / "keys"
    text = f'key-dir = "{keys}"\nstate-store = "{redis_server}"\n'
    cfg = load_service_config(_config(tmp_path, text), [])
    with pytest.raises(ServiceError, match="edgefed keys init --role cloud"):
        check_prerequisites(cfg, default_app_dir())
    init_keys("cloud", keys / "cloud")
    check_prerequisites(cfg, default_app_dir())
    with pytest.raises(ServiceError, match="not the edgefed app folder"):
        check_prerequisites(cfg, tmp_path)
    with pytest.raises(ServiceError, match="needs Redis"):
        check_prerequisites(cfg.replace(state_store="memory://"), default_app_dir())
    with pytest.raises(ServiceError, match="unreachable"):
        check_prerequisites(cfg.replace(state_store=f"redis://127.0.0.1:{free_port()}/0"), default_app_dir())
    with pytest.raises(ServiceError, match="edgefed certs"):
        check_prerequisites(cfg.replace(tls_dir=str(tmp_path / "no-certs")), default_app_dir())
    with pytest.raises(ServiceError, match="sealed"):  # plain updates carry no signature: anyone could send one
        check_prerequisites(cfg.replace(transport="plain"), default_app_dir())
    # a password in the URL would be written into the run config, shown by Flower and sent to devices
    with pytest.raises(ServiceError, match="state-store-password-file"):
        check_prerequisites(cfg.replace(state_store="redis://:hunter2@127.0.0.1:6379/0"), default_app_dir())
    with pytest.raises(ServiceError, match="edgefed keys init"):  # the service refuses before starting anything
        CloudService(cfg.replace(key_dir=str(tmp_path / "nokeys"), out_dir=str(tmp_path / "runs"))).start()


def test_superlink_refuses_node_auth_without_tls_and_starts_with_it(tmp_path):
    with pytest.raises(SuperLinkError, match="needs TLS"):
        SuperLinkProcess("127.0.0.1:1", tmp_path, None, node_auth=True).command()
    with pytest.raises(SuperLinkError, match="edgefed certs"):
        SuperLinkProcess("127.0.0.1:1", tmp_path, tmp_path / "tls", node_auth=True).start()
    write_fleet_certificates(tmp_path / "tls", ["127.0.0.1"])
    link = SuperLinkProcess(f"127.0.0.1:{free_port()}", tmp_path / "link", tmp_path / "tls", node_auth=True)
    try:
        link.start()
        assert link.proc is not None and link.proc.poll() is None
        assert "--enable-supernode-auth" in link.command() and "--ssl-certfile" in link.command()
    finally:
        link.stop()
    assert link.proc.poll() is not None
