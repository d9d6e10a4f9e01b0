"""`edgefed report RUN_DIR [RUN_DIR...]`: a report a person can open, written as `report.html`.

One self-contained HTML file in the first run directory: the plots are PNGs
embedded as data URIs (cloud/reports/plots.py), so it can be mailed or opened
from disk with no server and nothing else beside it. Several run directories
are overlaid (sync against async, codec A against B), each labelled by the
config keys in which the runs differ. It reads only what a run writes:
`config.json`, `metrics.jsonl`, `exports.jsonl` and `summary.json`.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgefed.cloud.reports import plots
from edgefed.common.config import redact_url
from edgefed.common.run_dir import DEPLOYED_EVENT, ROUND_EVENT

REPORT_FILE = "report.html"
# Keys that differ between any two runs but say nothing about the experiment.
_NOT_A_LABEL = {"run-id", "out-dir", "data-dir", "key-dir", "model-service", "model-service-public", "superlink",
                "tls-dir", "state-store", "serve-models", "metrics-port"}


class ReportError(ValueError):
    """A folder is not a run directory, or has recorded nothing yet."""


@dataclass
class RunData:
    path: Path
    config: dict
    metrics: list[dict]  # the version (or round) lines
    exports: list[dict]
    summary: dict
    label: str = ""
    deployed: list[dict] = field(default_factory=list)  # async: each published model scored on devices


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the run still reports
    return records


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory")
    lines = _jsonl(path / "metrics.jsonl")
    metrics = [r for r in lines if r.get("event", ROUND_EVENT) == ROUND_EVENT]
    if not metrics:
        raise ReportError(f"{path}: no metrics.jsonl records (is it a run directory? has the run started?)")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    return RunData(path, config, metrics, _jsonl(path / "exports.jsonl"), summary,
                   deployed=[r for r in lines if r.get("event") == DEPLOYED_EVENT])


def label_runs(runs: list[RunData]) -> None:
    """Label each run by the config keys in which the runs differ (its folder name when they do not)."""
    keys = sorted({k for r in runs for k in r.config} - _NOT_A_LABEL)
    differing = [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
    for run in runs:
        parts = [f"{k}={run.config.get(k)}" for k in differing[:3]]
        run.label = ", ".join(parts) if parts else (run.config.get("mode") or run.path.name)
    if len({r.label for r in runs}) < len(runs):  # same settings (several seeds): the folder tells them apart
        for run in runs:
            run.label = f"{run.path.name} ({run.label})"


def build_report(run_dirs: list[str | Path], out: Path | None = None) -> Path:
    """Write report.html (into the first run directory unless `out` is given); returns its path."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    label_runs(runs)
    figures = [
        ("Accuracy", plots.accuracy(runs),
         "Central held-out accuracy of each global version, against wall time and against version."),
        ("Bytes per client", plots.bytes_per_client(runs),
         "Encoded update bytes each device sent (up) and global-adapter bytes it received (down)."),
        ("Staleness", plots.staleness(runs),
         "Versions published between the one a client started from and the one its update went into."),
        *[(f"Participation: {run.label}", plots.participation(run),
           "Each mark is an update of that device folded into a version published at that time.") for run in runs],
        ("Rejected updates", plots.rejections(runs), "Updates the aggregator refused, by reason."),
        ("Deployed model", plots.deployed_models(runs),
         "Each published ONNX model: file size, single-clip latency on the cloud's CPU, held-out accuracy "
         "(stars: what the devices measured with the final model on their own clips)."),
    ]
    target = out or runs[0].path / REPORT_FILE
    target.write_text(_html(runs, figures), encoding="utf-8")
    return target


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _summary_rows(runs: list[RunData]) -> str:
    head = "<tr><th>run</th><th>mode</th><th>versions</th><th>wall s</th><th>final accuracy</th><th>MB up</th>" \
           "<th>MB down</th><th>rejected</th><th>deployed model</th></tr>"
    rows = []
    for run in runs:
        s, last = run.summary, run.metrics[-1]
        acc = s.get("final_accuracy", last.get("accuracy"))
        deployed = s.get("deployed_model") or {}
        model = (f"v{deployed['version']} {deployed['quantization']}, {deployed['size_mb']:.2f} MB, on devices "
                 f"{_fmt(deployed.get('federated_accuracy'))}" if deployed.get("published") else "-")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            run.label, run.config.get("mode", "-"), last.get("version", "-"), _fmt(s.get("wall_s", last["wall_s"]), 1),
            _fmt(acc), _fmt(sum(r["bytes_received"] for r in run.metrics) / 1e6, 2),
            _fmt(sum(r["bytes_sent"] for r in run.metrics) / 1e6, 2),
            sum(sum((r.get("rejected") or {}).values()) for r in run.metrics), model)) + "</tr>")
    return head + "".join(rows)


def _config_rows(runs: list[RunData]) -> str:
    keys = sorted({k for r in runs for k in r.config})
    head = "<tr><th>key</th>" + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs) + "</tr>"
    rows = []
    for key in keys:
        values = [json.dumps(redact_url(v) if isinstance(v := r.config.get(key), str) else v) for r in runs]
        cls = ' class="differs"' if len(set(values)) > 1 else ""
        rows.append(f"<tr{cls}><td>{html.escape(key)}</td>" + "".join(f"<td>{html.escape(v)}</td>" for v in values)
                    + "</tr>")
    return head + "".join(rows)


def _fmt(value: object, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"  # type: ignore[arg-type]


def _html(runs: list[RunData], figures: list[tuple[str, bytes | None, str]]) -> str:
    sections = []
    for title, png, caption in figures:
        body = _img(png, title) if png else "<p class=\"none\">not recorded by these runs</p>"
        sections.append(f"<section><h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p>{body}</section>")
    names = ", ".join(html.escape(str(r.path)) for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgefed report: {html.escape(runs[0].path.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
th {{ background: #f2f2f2; }} tr.differs td {{ background: #fff4d6; }}
img {{ max-width: 100%; border: 1px solid #eee; }} .none {{ color: #888; font-style: italic; }}
</style></head>
<body>
<h1>edgefed run report</h1>
<p>Runs: {names}<br>Written {time.strftime("%Y-%m-%d %H:%M:%S")} by <code>edgefed report</code>.</p>
<table>{_summary_rows(runs)}</table>
{"".join(sections)}
<section><h2>Resolved config</h2><p>Highlighted rows differ between the runs.</p>
<table>{_config_rows(runs)}</table></section>
<script>
// For whoever checks the page without looking at it (CI's headless browser): how many images decoded.
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""
