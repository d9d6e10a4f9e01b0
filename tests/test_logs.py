"""Logging: levels honoured, JSON lines on request, the choice carried to child processes by the environment."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from edgefed.common import logs


@pytest.fixture(autouse=True)
def _restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_lines_carry_level_logger_message_and_traceback(capsys):
    logs.configure("INFO", json_format=True)
    log = logging.getLogger("edgefed.edge.agent.inbox")
    log.debug("not shown at INFO")
    log.info("extracted %d clips", 3)
    try:
        raise ValueError("bad clip")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in lines] == [
        ("INFO", "edgefed.edge.agent.inbox", "extracted 3 clips"), ("ERROR", "edgefed.edge.agent.inbox", "failed")]
    assert "ValueError: bad clip" in lines[1]["exception"] and lines[0]["time"].endswith("Z")


def test_environment_reaches_child_processes_and_the_cli_checks_levels(tmp_path):
    code = ("import logging; from edgefed.common import logs; logs.configure_from_env(); "
            "logging.getLogger('edgefed.cloud.aggregation.fedbuff').warning('w'); logging.getLogger('edgefed.cloud.aggregation.fedbuff').info('i')")
    env = {**os.environ, logs.LEVEL_ENV: "WARNING", logs.FORMAT_ENV: "json"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert [json.loads(line)["message"] for line in done.stderr.splitlines()] == ["w"]
    bad = subprocess.run([sys.executable, "-m", "edgefed.cli", "--log-level", "LOUD", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--log-level must be" in bad.stdout
