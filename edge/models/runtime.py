"""The installed model on a device: verify, install atomically, hot-swap, roll back.

    <model-dir>/v000012/{model.onnx, manifest.json}
               /current  -> v000012     (symlinks, replaced atomically)
               /previous -> v000010

A model is installed only if its manifest is signed by the pinned cloud key,
is of this device's federation, was made for this device's feature
extraction, is newer than every model of the federation installed here (the
running one and the one kept for a roll back), every file matches its
sha256, and it loads in onnxruntime and passes a smoke inference. Otherwise
it is removed and the running model stays (`ModelRejected`). So a replayed
older manifest, however validly signed, never replaces a newer model: the
cloud rolls a fleet back by publishing the old files again as a newer
version (cloud/publishing/registry.py `republish`), while `rollback` here is
a device operator's own explicit step back. Requests in flight keep the
session they started with: a swap replaces the reference, never the session
under a caller.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefed.common.data.features import FeatureSet
from edgefed.common.evaluation import EvalResult
from edgefed.common.onnx_inference import evaluate_onnx, onnx_logits, open_session
from edgefed.common.wire.model_manifest import MANIFEST_FILE, ModelManifest, ModelVerificationError, verify_manifest

log = logging.getLogger(__name__)

_NUMPY_DTYPES = {"uint8": np.uint8, "bool": np.bool_, "float32": np.float32, "int64": np.int64}


class ModelRejected(RuntimeError):
    """A new model failed verification, loading or its smoke test; the previous model still runs."""


class NoModelInstalled(RuntimeError):
    """Inference was asked for before any model was installed."""


@dataclass(frozen=True)
class LoadedModel:
    version: int
    manifest: ModelManifest
    session: ort.InferenceSession
    directory: Path

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.manifest.files)


class ModelRuntime:
    def __init__(self, model_dir: str | Path, trusted_key: Ed25519PublicKey, threads: int = 1,
                 feature_config: dict | None = None, federation: str | None = None) -> None:
        """`feature_config`: this device's extractor settings; a model made for others is refused.

        `federation`: the federation whose models this device runs (the run config's `federation`);
        None: the federation of the model installed here, so the first install pins it."""
        self.model_dir = Path(model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.trusted_key = trusted_key
        self.threads = threads
        self.feature_config = feature_config
        self._federation = federation
        self._lock = threading.Lock()  # one install/rollback at a time
        self._active: LoadedModel | None = None
        self._newest = 0
        self._seen_current: tuple[str, int] | None = None
        self._load_installed()

    # --- state -------------------------------------------------------------------
    @property
    def active(self) -> LoadedModel | None:
        return self._active

    @property
    def version(self) -> int:
        """The running model's version (0: none)."""
        active = self._active
        return active.version if active else 0

    @property
    def federation(self) -> str | None:
        """The federation whose models this device accepts (None: any, until the first install pins one)."""
        if self._federation is not None:
            return self._federation
        active = self._active
        return active.manifest.federation if active else None

    @property
    def newest_installed(self) -> int:
        """The newest version of this federation installed here (0: none): a new model must be above it."""
        return self._newest

    def check_installable(self, manifest: ModelManifest) -> None:
        """ModelRejected unless `manifest` is of this device's federation and newer than every model installed of it."""
        problem = self._federation_problem(manifest)
        if problem is None and manifest.version <= self._newest:
            problem = (f"model v{manifest.version} is not newer than the installed v{self._newest} "
                       "(a fleet rollback is published as a newer version)")
        if problem is not None:
            raise ModelRejected(f"refused: {problem}")

    # --- inference -------------------------------------------------------------------
    def current(self) -> LoadedModel:
        """The running model; callers keep this snapshot (its session) even if a swap follows."""
        active = self._active  # one read
        if active is None:
            raise NoModelInstalled(f"{self.model_dir}: no model installed yet")
        return active

    def logits(self, data: FeatureSet, batch_size: int = 16) -> tuple[int, torch.Tensor]:
        """(model version used, logits [N, C])."""
        model = self.current()
        return model.version, onnx_logits(model.session, data, batch_size)

    def evaluate(self, data: FeatureSet, batch_size: int = 64) -> tuple[int, EvalResult]:
        model = self.current()
        return model.version, evaluate_onnx(model.session, data, batch_size)

    # --- install / roll back ------------------------------------------------------------
    def verify_staged(self, staged: str | Path) -> ModelManifest:
        """Signature, federation, feature config and file hashes of a downloaded model folder."""
        staged = Path(staged)
        try:
            manifest = verify_manifest((staged / MANIFEST_FILE).read_bytes(), self.trusted_key)
        except FileNotFoundError:
            raise ModelVerificationError(f"{staged}: no {MANIFEST_FILE}") from None
        problem = self._federation_problem(manifest)
        if problem is not None:
            raise ModelVerificationError(problem)
        if self.feature_config is not None and manifest.feature_config != self.feature_config:
            differing = sorted(k for k in set(manifest.feature_config) | set(self.feature_config)
                               if manifest.feature_config.get(k) != self.feature_config.get(k))
            raise ModelVerificationError(f"model v{manifest.version} expects other features: {differing}")
        manifest.check_files(staged)
        return manifest

    def install(self, staged: str | Path) -> LoadedModel:
        """Verify, move into place, load, smoke-test, then swap; raises ModelRejected and keeps the old one."""
        staged = Path(staged)
        with self._lock:
            try:
                manifest = self.verify_staged(staged)
            except ModelVerificationError as err:
                shutil.rmtree(staged, ignore_errors=True)
                raise ModelRejected(f"refused: {err}") from err
            target = self.model_dir / f"v{manifest.version:06d}"
            if self._active is not None and self._active.version == manifest.version:
                shutil.rmtree(staged, ignore_errors=True)
                return self._active
            try:
                self.check_installable(manifest)
            except ModelRejected:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
            try:
                loaded = self._load(target, manifest)
            except Exception as err:  # onnxruntime raises several types for a bad graph
                shutil.rmtree(target, ignore_errors=True)
                log.warning("model v%d rolled back: %s", manifest.version, err)
                raise ModelRejected(f"model v{manifest.version} failed to load or run: {err}") from err
            previous = self._active
            if previous is not None:
                _point(self.model_dir / "previous", previous.directory.name)
            _point(self.model_dir / "current", target.name)
            self._active = loaded
            self._prune()
            self._note_disk()
            log.info("installed model v%d (%d bytes)", loaded.version, loaded.size_bytes)
            return loaded

    def rollback(self) -> int:
        """Go back to the previous model (an operator's explicit step back); returns the version now running.

        The model rolled back from stays the newest installed: only a newer version replaces the previous one."""
        with self._lock:
            previous = _resolve(self.model_dir / "previous")
            if previous is None:
                raise ModelRejected("no previous model to roll back to")
            manifest = self.verify_staged(previous)
            loaded = self._load(previous, manifest)
            current = self._active
            _point(self.model_dir / "current", previous.name)
            if current is not None:
                _point(self.model_dir / "previous", current.directory.name)
            self._active = loaded
            self._note_disk()
            return loaded.version

    def refresh(self) -> None:
        """Pick up a model another process of this device installed (the agent's watcher, a ClientApp)."""
        with self._lock:
            target = _resolve(self.model_dir / "current")
            if target is not None and (self._active is None or self._active.directory.name != target.name):
                self._active = None
                self._load_installed()

    # --- internals ------------------------------------------------------------------
    def _federation_problem(self, manifest: ModelManifest) -> str | None:
        federation = self.federation
        if federation is not None and manifest.federation != federation:
            return f"model v{manifest.version} is of federation {manifest.federation!r}, this device runs {federation!r}'s"
        return None

    def _newest_on_disk(self) -> int:
        """The newest version of this federation among the installed models (`current` and `previous`)."""
        newest = 0
        for link in ("current", "previous"):
            directory = _resolve(self.model_dir / link)
            if directory is None:
                continue
            try:
                manifest = verify_manifest((directory / MANIFEST_FILE).read_bytes(), self.trusted_key)
            except (OSError, ModelVerificationError):
                continue
            if self._federation_problem(manifest) is None:
                newest = max(newest, manifest.version)
        return newest

    def _load(self, directory: Path, manifest: ModelManifest) -> LoadedModel:
        session = open_session(str(directory / manifest.model_file.name), self.threads)
        _smoke_test(session, manifest)
        return LoadedModel(manifest.version, manifest, session, directory)

    def _load_installed(self) -> None:
        """On start: the current model, else the previous one (a crash mid-install leaves one of them)."""
        try:
            for link in ("current", "previous"):
                directory = _resolve(self.model_dir / link)
                if directory is None:
                    continue
                try:
                    self._active = self._load(directory, self.verify_staged(directory))
                    if link == "previous":
                        _point(self.model_dir / "current", directory.name)
                    return
                except Exception as err:
                    log.warning("installed model %s unusable (%s)", directory.name, err)
        finally:
            self._note_disk()

    def _note_disk(self) -> None:
        """What the state folder holds now: the newest installed version and the `current` link (`is_current`)."""
        self._newest = self._newest_on_disk()
        self._seen_current = _link_signature(self.model_dir / "current")

    def is_current(self) -> bool:
        """False once another process of this device installed or rolled back a model here since this one
        last did (a simulated device's tasks run in whichever Ray actor is free): load the state anew."""
        return _link_signature(self.model_dir / "current") == self._seen_current

    def _prune(self) -> None:
        keep = {p.name for p in (_resolve(self.model_dir / "current"), _resolve(self.model_dir / "previous")) if p}
        for path in self.model_dir.glob("v[0-9]*"):
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def _smoke_test(session: ort.InferenceSession, manifest: ModelManifest) -> None:
    """One batch-1 inference on neutral inputs: right output shape, finite numbers."""
    feeds = {}
    for spec in manifest.inputs:
        shape = [1 if isinstance(d, str) else int(d) for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, dtype=_NUMPY_DTYPES.get(spec.dtype, np.float32))
        if spec.dtype == "bool":
            feeds[spec.name][...] = True
    (logits,) = session.run([manifest.outputs[0].name], feeds)
    if logits.shape != (1, len(manifest.labels)):
        raise ModelVerificationError(f"smoke test: output shape {logits.shape}, expected (1, {len(manifest.labels)})")
    if not np.isfinite(logits).all():
        raise ModelVerificationError("smoke test: non-finite output")


def _point(link: Path, target_name: str) -> None:
    """Atomically (re)point a relative symlink."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def _link_signature(link: Path) -> tuple[str, int] | None:
    """Where a symlink points and when it was made (each repoint replaces it); None without one."""
    try:
        return os.readlink(link), link.lstat().st_mtime_ns
    except OSError:
        return None


def _resolve(link: Path) -> Path | None:
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return target if target.is_dir() else None
