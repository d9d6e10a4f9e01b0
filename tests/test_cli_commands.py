"""The command line as users see it: every command, each with its options, exactly as before the CLI was split
into `edgefed/commands/`; every `--help` works; `python -m edgefed.cli` starts without Flower or Ray.

The expected tree is written out here (taken from the single-module cli.py the split replaced), so a command
or option that is dropped, renamed or added fails this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from edgefed.cli import app

ROOT = Path(__file__).resolve().parents[1]

# "group command" (or "command" at the top) -> its options, in order.
COMMANDS = {
    "prepare": ("--out", "--clients", "--alpha", "--seed", "--manifest", "--clips", "--set", "--inboxes"),
    "simulate": ("--clients", "--mode", "--versions", "--rounds", "--profile", "--seed", "--out", "--alpha", "--manifest",
                 "--clips", "--run-id", "--set", "--verbose", "--no-verbose", "--ray-address", "--client-cpus",
                 "--client-gpus"),
    "report": ("--out",),
    "extract": ("--out", "--contact-sheet", "--set"),
    "infer": ("--model-dir", "--cloud-key", "--threads", "--json"),
    "certs": ("--dir", "--host", "--days"),
    "cloud train": ("--out", "--features", "--manifest", "--cache", "--set"),
    "cloud serve": ("--config", "--set", "--app-dir", "--external-superlink", "--no-external-superlink"),
    "cloud status": ("--config", "--set", "--json"),
    "cloud enrol": ("--config", "--device-id", "--keys"),
    "cloud revoke": ("--config", "--device-id"),
    "cloud rollback": ("--config", "--to-version"),
    "edge agent": ("--config",),
    "edge init": ("--dir", "--device-id", "--superlink", "--model-service", "--ca-cert", "--cloud-keys"),
    "edge rollback": ("--config",),
    "keys init": ("--role", "--dir", "--rotate", "--no-rotate"),
    "keys register": ("--device-id", "--public-key", "--registry"),
    "keys revoke": ("--device-id", "--registry"),
}
GROUPS = ("cloud", "edge", "keys")
GLOBAL_OPTIONS = ("--log-level", "--log-json")


def _options(command: click.Command) -> tuple[str, ...]:
    return tuple(name for p in command.params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts))


def _tree(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    for name in group.list_commands(click.Context(group)):
        command = group.commands[name]
        path = f"{prefix}{name}"
        found.update(_tree(command, f"{path} ") if isinstance(command, click.Group) else {path: command})
    return found


def _help(*path: str) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return re.sub(r"\x1b\[[0-9;]*m", "", result.output)  # in case the environment forces colour


def test_the_commands_and_their_options_are_the_ones_before_the_split():
    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    assert tuple(name for name, c in root.commands.items() if isinstance(c, click.Group)) == GROUPS
    assert _options(root) == GLOBAL_OPTIONS
    tree = _tree(root)
    assert sorted(tree) == sorted(COMMANDS)
    assert {path: _options(command) for path, command in tree.items()} == COMMANDS


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_command_has_a_help_naming_its_options(path):
    text = _help(*path.split())
    missing = [option for option in COMMANDS[path] if not re.search(rf"{re.escape(option)}(?![\w-])", text)]
    assert missing == []


@pytest.mark.parametrize("group", ["", *GROUPS])
def test_the_root_and_every_group_list_their_commands(group):
    text = _help(*group.split())
    prefix = f"{group} " if group else ""
    names = {path[len(prefix):].split()[0] for path in COMMANDS if path.startswith(prefix)}
    assert all(re.search(rf"\b{name}\b", text) for name in names), text
    if not group:
        assert all(option in text for option in GLOBAL_OPTIONS)


def test_python_m_edgefed_cli_starts_and_loads_no_flower_ray_or_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "edgefed.cli", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert all(name in run.stdout for name in ("prepare", "simulate", "cloud", "edge", "keys"))
    probe = ("import sys, edgefed.cli\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'ray', 'onnxruntime', 'torch'}))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
