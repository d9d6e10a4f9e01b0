"""`edgefed edge`: provision a device, run its agent, roll its model back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgefed.commands.shared import console, fail, setup_logging, until_signal
from edgefed.common.config import ConfigError

edge_app = typer.Typer(no_args_is_help=True, help="The device side: the edge agent.")


@edge_app.command("agent")
def edge_agent(
    config: Annotated[Path, typer.Option(help="The device's agent config (see deploy/edge.toml).")],
) -> None:
    """Run this device in the fleet: SuperNode, inbox extraction and model updates, until stopped."""
    from edgefed.edge.agent.config import AgentConfig
    from edgefed.edge.agent.edge_agent import AgentError, EdgeAgent

    setup_logging(verbose=True)
    try:
        agent = EdgeAgent(AgentConfig.from_file(config)).start()
    except (ConfigError, AgentError) as err:
        fail(str(err))
    console.print(f"[bold]edgefed edge[/] {agent.cfg.device_id}: SuperLink {agent.cfg.superlink}, inbox "
                  f"{agent.cfg.inbox}, state {agent.cfg.state_dir} (Ctrl-C stops)")
    until_signal(agent.supervise, agent.stop_event, agent.stop)


@edge_app.command("init")
def edge_init(
    dir_: Annotated[Path, typer.Option("--dir", help="The device's folder: keys/, inbox/, state/ and edge.toml go here.")],
    device_id: Annotated[str, typer.Option(help="The device's id (unique in the fleet).")],
    superlink: Annotated[str, typer.Option(help="The cloud's SuperLink, host:port.")] = "127.0.0.1:9093",
    model_service: Annotated[str, typer.Option(help="The cloud's model service, host:port.")] = "127.0.0.1:9300",
    ca_cert: Annotated[Optional[Path], typer.Option(help="The fleet CA certificate (from `edgefed certs`).")] = None,
    cloud_keys: Annotated[Path, typer.Option(help="Folder with the cloud's aggregator_x25519.pub and cloud_ed25519.pub.")] = Path(
        "cloud-keys"),
) -> None:
    """Provision a device: its keys and an agent config; then the operator enrols its public keys."""
    from edgefed.common.keys import KeyMaterialError, init_keys
    from edgefed.edge.agent.config import write_agent_config

    try:
        init_keys("edge", dir_ / "keys")
    except KeyMaterialError as err:
        fail(str(err))
    config = write_agent_config(dir_, device_id, superlink, model_service, ca_cert, cloud_keys)
    console.print(f"device {device_id}: keys in {dir_ / 'keys'}, config {config}, media goes into {dir_ / 'inbox'}/<label>/")
    console.print(f"enrol it on the cloud: edgefed cloud enrol --config CLOUD.toml --device-id {device_id} "
                  f"--keys {dir_ / 'keys'}")


@edge_app.command("rollback")
def edge_rollback(
    config: Annotated[Path, typer.Option(help="The device's agent config.")],
) -> None:
    """Go back to this device's previous model (the running agent picks it up within seconds)."""
    from edgefed.common.keys import KeyMaterialError, load_cloud_public
    from edgefed.edge.agent.config import AgentConfig
    from edgefed.edge.models.runtime import ModelRejected, ModelRuntime

    try:
        cfg = AgentConfig.from_file(config)
        runtime = ModelRuntime(cfg.state_dir / "models", load_cloud_public(cfg.cloud_keys))
        version = runtime.rollback()
    except (ConfigError, KeyMaterialError, ModelRejected) as err:
        fail(str(err))
    console.print(f"{cfg.device_id} runs model v{version} again")
