"""The data manifest: one JSON object per line, `{"video": PATH, "label": NAME}`.

The same format for synthetic data, a device's own media and the cloud's
data. Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ManifestError(ValueError):
    """The manifest itself is unreadable or a line is malformed."""


@dataclass(frozen=True)
class ManifestEntry:
    video: str  # as written in the manifest
    label: str
    root: str  # folder the manifest lives in

    @property
    def path(self) -> Path:
        p = Path(self.video)
        return p if p.is_absolute() else Path(self.root) / p

    def to_json(self) -> str:
        return json.dumps({"video": self.video, "label": self.label}, sort_keys=True)


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: unreadable manifest ({err})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            video, label = record["video"], record["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ManifestError(f"{path}:{number}: expected {{\"video\": ..., \"label\": ...}}") from None
        if not isinstance(video, str) or not isinstance(label, str):
            raise ManifestError(f"{path}:{number}: video and label must be strings")
        entries.append(ManifestEntry(video, label, str(path.parent.resolve())))
    return entries


def write_manifest(path: str | Path, entries: list[ManifestEntry]) -> None:
    """Write entries with paths relative to the new manifest's folder where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    lines = []
    for e in entries:
        target = e.path.resolve()
        try:
            video = str(target.relative_to(root))
        except ValueError:
            video = str(target)
        lines.append(json.dumps({"video": video, "label": e.label}, sort_keys=True))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
