"""`edgefed report`: built from recorded run directories, opened by a real headless Chromium.

tests/data/runs/ holds two small recorded runs (3 simulated devices, the same
data): `async-small` (FedBuff, exports every 2 versions) and `sync-small`
(FedAvg rounds), written by `edgefed simulate` and trimmed to the files a
report reads.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgefed.cli import app
from edgefed.cloud.reports.report import REPORT_FILE, ReportError, build_report, label_runs, load_run

RUNS = Path(__file__).parent / "data" / "runs"


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, Path]:
    copies = {}
    for name in ("async-small", "sync-small"):
        copies[name] = tmp_path / name
        shutil.copytree(RUNS / name, copies[name])
    return copies


def _images(report: Path) -> list[tuple[str, np.ndarray]]:
    html = report.read_text()
    found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', html)
    return [(alt, cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)) for alt, data in found]


def test_report_from_a_recorded_async_run_has_every_figure(runs):
    report = build_report([runs["async-small"]])
    assert report == runs["async-small"] / REPORT_FILE
    images = dict(_images(report))
    expected = {"Accuracy", "Bytes per client", "Staleness", "Rejected updates", "Deployed model"}
    assert expected <= set(images) and any(a.startswith("Participation") for a in images), set(images)
    for alt, image in images.items():
        assert image is not None and image.shape[0] > 100 and image.std() > 5, f"{alt} is blank"
    text = report.read_text()
    assert "update-codec" in text and "topk0.05+int8+zstd" in text  # the resolved config table
    assert "not recorded by these runs" not in text  # an async run with exports records everything


def test_two_runs_overlaid_are_labelled_by_how_their_configs_differ(runs):
    loaded = [load_run(runs["async-small"]), load_run(runs["sync-small"])]
    label_runs(loaded)
    assert [r.label.split(",")[0] for r in loaded] == ["mode=async", "mode=sync"]
    result = CliRunner().invoke(app, ["report", str(runs["async-small"]), str(runs["sync-small"])])
    assert result.exit_code == 0, result.output
    text = (runs["async-small"] / REPORT_FILE).read_text()
    assert text.count("mode=async") >= 2 and text.count("mode=sync") >= 2
    assert 'class="differs"' in text  # the config table marks what differs


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(ReportError, match="no such run directory"):
        build_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.jsonl records"):
        build_report([tmp_path / "empty"])
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "metrics.jsonl records" in " ".join(result.output.split())


def test_a_cut_last_line_does_not_stop_the_report(runs):
    with open(runs["async-small"] / "metrics.jsonl", "a") as fh:
        fh.write('{"version": 99, "accur')  # a crash mid-write
    assert build_report([runs["async-small"]]).exists()


def test_the_deployed_models_own_lines_do_not_count_as_versions(runs):
    """async metrics.jsonl has a `deployed` line per published model between its version lines."""
    path = runs["async-small"] / "metrics.jsonl"
    lines = path.read_text().splitlines()
    scored = json.dumps({"event": "deployed", "version": 2, "devices": 2, "devices_installed": 2,
                         "federated_accuracy": 0.5, "federated_examples": 8, "wall_s": 1.0})
    path.write_text("\n".join([*lines[:2], scored, *lines[2:]]) + "\n")
    run = load_run(runs["async-small"])
    assert len(run.metrics) == len(lines) and [r["version"] for r in run.deployed] == [2]
    assert build_report([runs["async-small"]]).exists()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("no chromium on PATH: .ci/run installs Debian's `chromium` package (apt-get install chromium)")


def test_headless_chromium_renders_the_report_with_every_plot_loaded(runs, tmp_path):
    report = build_report([runs["async-small"], runs["sync-small"]])
    browser = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, "the page's load handler did not run"
    ok, total = map(int, loaded.groups())
    assert total == len(_images(report)) >= 6 and ok == total, loaded.group(0)

    shot = tmp_path / "report.png"
    done = subprocess.run([browser, *flags, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (2400, 1280)
    non_white = (image < 240).any(axis=2).mean()
    assert non_white > 0.05, f"screenshot is nearly blank ({non_white:.3f} of pixels drawn)"
    colourful = (image.max(axis=2).astype(int) - image.min(axis=2).astype(int) > 60).mean()
    assert colourful > 0.001, "no plot colours on screen"
