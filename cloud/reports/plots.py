"""The figures of a run report, each a PNG (matplotlib, no display needed).

Every function takes the loaded runs (cloud/reports/report.py `RunData`) and
returns PNG bytes, or None when no run recorded what the figure shows (a
synchronous run has no staleness, a run without exports no deployed model).
Several runs are overlaid in one figure, each in its own colour and labelled.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from edgefed.cloud.reports.report import RunData

WIDTH, HEIGHT, DPI = 7.5, 3.6, 110


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _points(run: RunData, x: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r["accuracy"]) for r in run.metrics if r.get("accuracy") is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def accuracy(runs: list[RunData]) -> bytes | None:
    """Central held-out accuracy against wall time and against version, runs overlaid."""
    if not any(_points(r, "wall_s")[0] for r in runs):
        return None
    fig, (by_time, by_version) = plt.subplots(1, 2, figsize=(WIDTH * 1.4, HEIGHT))
    for run in runs:
        by_time.plot(*_points(run, "wall_s"), marker=".", label=run.label)
        by_version.plot(*_points(run, "version"), marker=".", label=run.label)
    by_time.set(xlabel="wall time (s)", ylabel="central accuracy", title="accuracy against wall time", ylim=(0, 1.02))
    by_version.set(xlabel="version (async) / round (sync)", ylabel="central accuracy",
                   title="accuracy against version", ylim=(0, 1.02))
    by_time.grid(alpha=0.3)
    by_version.grid(alpha=0.3)
    by_version.legend(fontsize=8, loc="lower right")
    return _png(fig)


def bytes_per_client(runs: list[RunData]) -> bytes | None:
    """MB up and down per client over the run (per device when recorded, else the mean)."""
    rows: list[tuple[str, float, float]] = []  # (label, up MB, down MB)
    for run in runs:
        up: Counter = Counter()
        down: Counter = Counter()
        for r in run.metrics:
            up.update(r.get("bytes_up_by_device") or {})
            down.update(r.get("bytes_down_by_device") or {})
        prefix = f"{run.label}: " if len(runs) > 1 else ""
        if up or down:
            for device in sorted(set(up) | set(down)):
                rows.append((prefix + device, up[device] / 1e6, down[device] / 1e6))
        elif run.metrics:
            clients = max(max(int(r.get("clients", 0)) for r in run.metrics), 1)
            rows.append((prefix + "mean per client", sum(r["bytes_received"] for r in run.metrics) / clients / 1e6,
                         sum(r["bytes_sent"] for r in run.metrics) / clients / 1e6))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, max(HEIGHT, 0.35 * len(rows) + 1)))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r[1] for r in rows], height=0.4, label="up (updates)")
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="down (global adapter)")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="MB over the run", title="bytes up and down per client")
    ax.legend(fontsize=8)
    return _png(fig)


def staleness(runs: list[RunData]) -> bytes | None:
    """How many versions behind the accepted updates were (async runs)."""
    counts = {run.label: _staleness_counts(run) for run in runs}
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    width = 0.8 / len(counts)
    for i, (label, hist) in enumerate(counts.items()):
        xs = sorted(hist)
        ax.bar([x + i * width for x in xs], [hist[x] for x in xs], width=width, label=label)
    values = sorted({x for hist in counts.values() for x in hist})
    ax.set_xticks([x + width * (len(counts) - 1) / 2 for x in values], [str(x) for x in values])
    ax.set(xlabel="staleness (versions)", ylabel="accepted updates", title="staleness of accepted updates")
    ax.legend(fontsize=8)
    return _png(fig)


def _staleness_counts(run: RunData) -> Counter:
    hist: Counter = Counter()
    for r in run.metrics:
        hist.update({int(k): int(v) for k, v in (r.get("staleness_histogram") or {}).items()})
    return hist


def participation(run: RunData) -> bytes | None:
    """Which device contributed to which version, over wall time (one run)."""
    points = [(r["wall_s"], d) for r in run.metrics for d in (r.get("devices") or [])]
    if not points:
        return None
    devices = sorted({d for _, d in points})
    row = {d: i for i, d in enumerate(devices)}
    fig, ax = plt.subplots(figsize=(WIDTH, max(2.2, 0.35 * len(devices) + 1.2)))
    ax.scatter([t for t, _ in points], [row[d] for _, d in points], marker="|", s=200)
    ax.set_yticks(range(len(devices)), devices, fontsize=8)
    ax.set(xlabel="wall time (s)", title=f"client participation: {run.label}")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def rejections(runs: list[RunData]) -> bytes | None:
    """Rejected updates by reason, summed over each run."""
    totals = {run.label: sum((Counter(r.get("rejected") or {}) for r in run.metrics), Counter()) for run in runs}
    reasons = sorted({reason for c in totals.values() for reason in c})
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT if reasons else 1.6))
    if not reasons:
        ax.text(0.5, 0.5, "no update was rejected", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    width = 0.8 / len(totals)
    for i, (label, counts) in enumerate(totals.items()):
        ax.bar([x + i * width for x in range(len(reasons))], [counts[r] for r in reasons], width=width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(reasons))], reasons, fontsize=8, rotation=15)
    ax.set(ylabel="updates", title="rejected updates by reason")
    ax.legend(fontsize=8)
    return _png(fig)


def deployed_models(runs: list[RunData]) -> bytes | None:
    """Each published model: size, batch-1 latency, held-out accuracy; the devices' score of the final one."""
    if not any(e.get("published") for run in runs for e in run.exports):
        return None
    fig, (size, latency, acc) = plt.subplots(1, 3, figsize=(WIDTH * 1.5, HEIGHT))
    for run in runs:
        published = [e for e in run.exports if e.get("published")]
        versions = [e["version"] for e in published]
        size.plot(versions, [e["size_bytes"] / 1e6 for e in published], marker="o", label=run.label)
        lat = [(e["version"], e["latency_ms_batch1"]) for e in published if e.get("latency_ms_batch1")]
        latency.plot([v for v, _ in lat], [ms for _, ms in lat], marker="o", label=run.label)
        held = [(e["version"], e["heldout_accuracy"]) for e in published if e.get("heldout_accuracy") is not None]
        line = acc.plot([v for v, _ in held], [a for _, a in held], marker="o", label=f"{run.label}: cloud held-out")
        deployed = run.summary.get("deployed_model") or {}
        if deployed.get("federated_accuracy") is not None:
            acc.scatter([deployed["version"]], [deployed["federated_accuracy"]], marker="*", s=160,
                        color=line[0].get_color(), label=f"{run.label}: on devices")
    size.set(xlabel="version", ylabel="MB", title="model size", ylim=(0, None))
    latency.set(xlabel="version", ylabel="ms", title="latency, batch 1 (cloud CPU)", ylim=(0, None))
    acc.set(xlabel="version", ylabel="accuracy", title="deployed model accuracy", ylim=(0, 1.02))
    acc.legend(fontsize=7, loc="lower right")
    return _png(fig)
