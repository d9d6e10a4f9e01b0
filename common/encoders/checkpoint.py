"""Reading a local checkpoint directory (`save_pretrained` layout) without trusting it.

transformers reports a weight it could not load (absent, or under a name the class does
not expect) only in a printed load report and in `output_loading_info`; the model keeps
random values there. `from_pretrained_checked` turns every such report into an
`EncoderCheckpointError`. Keys the checkpoint holds beyond the encoder (CLIP's text
tower, Whisper's decoder, a classification head) are expected and ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from edgefed.common.encoders.spec import EncoderCheckpointError

CONFIG_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CHUNK = 1 << 20


def read_config(path: Path) -> dict[str, Any]:
    """`path/config.json` as a dictionary with a `model_type`; refuses a directory without one."""
    config_file = path / "config.json"
    if not path.is_dir():
        raise EncoderCheckpointError(path, "not a directory")
    if not config_file.is_file():
        raise EncoderCheckpointError(path, "no config.json (expected a save_pretrained directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EncoderCheckpointError(path, f"config.json is unreadable: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise EncoderCheckpointError(path, "config.json has no model_type")
    return config


def read_model_type(path: Path) -> str:
    """The `model_type` of `path/config.json`; refuses a directory without one."""
    return read_config(path)["model_type"]


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files (`*.safetensors`, `*.bin`) at the top of `path`, sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def from_pretrained_checked(model_class: type[PreTrainedModel], path: Path, **kwargs: Any) -> PreTrainedModel:
    """`model_class.from_pretrained(path)` from local files only, in float32, with every encoder weight loaded.

    float32 whatever the checkpoint's dtype: edge devices train LoRA on CPU, where a
    half-precision base is slow or unsupported. Raises `EncoderCheckpointError` when a weight
    of the encoder is missing or has another shape than the config gives it.
    """
    try:
        # ignore_mismatched_sizes: report a wrong shape in the loading info (refused below, by name)
        # instead of transformers' RuntimeError that only points at its printed report.
        with quiet_transformers():  # its load report and progress bar: the loading info is checked below
            model, info = model_class.from_pretrained(
                path, local_files_only=True, output_loading_info=True, dtype=torch.float32,
                ignore_mismatched_sizes=True, **kwargs,
            )
    except (OSError, SafetensorError) as err:  # no weight file, unreadable or truncated file
        raise EncoderCheckpointError(path, f"cannot read the weights: {_first_line(err)}") from None
    missing = sorted(info["missing_keys"])
    mismatched = sorted(_mismatch(m) for m in info["mismatched_keys"])
    if missing:
        raise EncoderCheckpointError(
            path, f"{len(missing)} encoder weight(s) missing from the checkpoint (they would stay random): {_few(missing)}"
        )
    if mismatched or info["error_msgs"]:
        raise EncoderCheckpointError(path, f"weights do not fit the config: {_few(mismatched or info['error_msgs'])}")
    return model.eval()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def verify_against_files(module: PreTrainedModel, path: Path, prefixes: tuple[str, ...]) -> None:
    """Every tensor of `module` equals the checkpoint's tensor `<prefix><name>` for one of `prefixes`.

    An independent check for the families whose encoder we load out of a bigger checkpoint
    by renaming keys: it reads the files, not transformers' load report. Reads only the
    encoder's tensors, one at a time.
    """
    wanted = module.state_dict()
    found: set[str] = set()
    for name, own, tensor in _tensors_under(path, prefixes, set(wanted)):
        if not torch.equal(tensor.to(wanted[own].dtype), wanted[own]):
            raise EncoderCheckpointError(path, f"encoder weight {own} differs from the checkpoint's {name} after loading")
        found.add(own)
    absent = sorted(set(wanted) - found)
    if absent:
        raise EncoderCheckpointError(path, f"encoder weight(s) not in the checkpoint under {list(prefixes)}: {_few(absent)}")


def _tensors_under(path: Path, prefixes: tuple[str, ...], names: set[str]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name in the file, name without its prefix, tensor) for the file tensors whose unprefixed name is in `names`."""

    def own(name: str) -> str | None:
        stripped = next((name.removeprefix(p) for p in prefixes if name.startswith(p)), None)
        return stripped if stripped in names else None

    for file in weight_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if (mine := own(name)) is not None:
                        yield name, mine, handle.get_tensor(name)
        else:  # a torch zip file, memory-mapped: only the tensors read are paged in
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            yield from ((name, mine, t) for name, t in state.items() if (mine := own(name)) is not None)


def base_fingerprint_of_checkpoint(path: Path | str) -> str:
    """SHA-256 (hex) of a checkpoint directory's weight files and configs: the base fingerprint.

    Covers `*.safetensors`, `*.bin`, `config.json` and `preprocessor_config.json` at the top
    of the directory, in name order; each file enters as its name, its size and its bytes
    (read in 1 MiB chunks, so memory stays bounded for any checkpoint size).
    """
    path = Path(path)
    read_model_type(path)  # refuses what is not a checkpoint directory
    weights = weight_files(path)
    if not weights:
        raise EncoderCheckpointError(path, "no weight file (*.safetensors or *.bin)")
    files = sorted([*weights, *(path / name for name in CONFIG_FILES if (path / name).is_file())], key=lambda p: p.name)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.stat().st_size.to_bytes(8, "big"))
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _mismatch(entry: Any) -> str:
    if isinstance(entry, tuple) and len(entry) == 3:  # (name, checkpoint shape, model shape)
        name, ckpt, model = entry
        return f"{name} is {tuple(ckpt)} in the checkpoint, {tuple(model)} in the config"
    return str(entry)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _few(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")
