"""Key material and certificates: `edgefed keys` (init, register, revoke) and `edgefed certs`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefed.commands.shared import console, fail


def certs(
    dir_: Annotated[Path, typer.Option("--dir", help="Folder for ca.crt/ca.key and server.crt/server.key.")],
    host: Annotated[list[str], typer.Option(help="A name or IP devices use to reach the cloud (repeatable).")] = [
        "127.0.0.1", "localhost"],  # noqa: B006
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Make the fleet's TLS certificates: a private CA and the cloud's server certificate."""
    from edgefed.cloud.fleet.certificates import write_fleet_certificates

    for path in write_fleet_certificates(dir_, host, days):
        console.print(f"wrote {path}")
    console.print(f"devices pin {dir_ / 'ca.crt'}; keep {dir_ / 'ca.key'} offline")


keys_app = typer.Typer(no_args_is_help=True, help="Device and cloud key material.")


@keys_app.command("init")
def keys_init(
    role: Annotated[str, typer.Option(help="edge (a device's signing key) or cloud (aggregator and signing keys).")],
    dir_: Annotated[Path, typer.Option("--dir", help="Folder for the key files (private keys get mode 0600).")],
    rotate: Annotated[bool, typer.Option(help="Replace existing keys (a device must then be registered again).")] = False,
) -> None:
    """Create the key pair(s) of a device or of the cloud."""
    from edgefed.common.keys import KeyMaterialError, init_keys

    try:
        files = init_keys(role, dir_, overwrite=rotate)
    except KeyMaterialError as err:
        fail(str(err))
    for path in files:
        console.print(f"wrote {path}")


@keys_app.command("register")
def keys_register(
    device_id: Annotated[str, typer.Option(help="The device's id (its node config device-id).")],
    public_key: Annotated[Path, typer.Option(help="The device's device_ed25519.pub (or its key folder).")],
    registry: Annotated[Path, typer.Option(help="The cloud's registry.json (in its key folder).")],
) -> None:
    """Add (or replace) a device's public key in the cloud's registry."""
    from edgefed.common.keys import DEVICE_KEY, DeviceRegistry, KeyMaterialError, load_ed25519_public

    path = public_key / f"{DEVICE_KEY}.pub" if public_key.is_dir() else public_key
    try:
        key = load_ed25519_public(path)
        DeviceRegistry(registry).register(device_id, key)
    except KeyMaterialError as err:
        fail(str(err))
    console.print(f"registered {device_id} in {registry}")


@keys_app.command("revoke")
def keys_revoke(
    device_id: Annotated[str, typer.Option(help="The device to remove.")],
    registry: Annotated[Path, typer.Option(help="The cloud's registry.json.")],
) -> None:
    """Remove a device: its updates are refused from now on."""
    from edgefed.common.keys import DeviceRegistry

    if not DeviceRegistry(registry).revoke(device_id):
        fail(f"{device_id} is not registered in {registry}")
    console.print(f"revoked {device_id}")
