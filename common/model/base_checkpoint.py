"""A warm-start base checkpoint: the directory `edgefed cloud train` writes and `base-checkpoint` loads.

    <dir>/video/              the frame encoder, a checkpoint directory (common/encoders/saving.py): a
                              trained tiny encoder marked as tiny, a family encoder in its own layout
                              with its preprocessor_config.json
         /audio/              the audio encoder, the same way
         /head.safetensors    the rest of the model: the projections, fusion and head

The encoders load through the registry like any user checkpoint, so the base fingerprint is the
hash of their files (`base_fingerprint_of_dirs`) and the model service ships them to devices; their
folders are named as in a base package (common/wire/base_manifest.py), so the base a device
installs has this layout without the head. The head file never leaves the cloud: the projections,
fusion and head train in full, so they travel in every global adapter (version 0 included) a device
is sent with its work.

`video-encoder` and `audio-encoder` keep saying how inputs are made (common/model/inputs.py reads
them): `tiny` for a tiny part, for a family part a checkpoint with the part's own preprocessing
(the one it was trained from, or the part's folder itself). `check_encoder_settings` refuses any
other pairing, which would feed the encoder inputs it was not trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders import TINY, is_tiny_checkpoint, read_config, save_encoder
from edgefed.common.preprocessing import PreprocessingError, read_preprocessing
from edgefed.common.wire.base_manifest import BASE_PARTS

if TYPE_CHECKING:
    from edgefed.common.model.classifier import MultimodalClassifier

HEAD_FILE = "head.safetensors"
# model attribute -> (part folder, the setting that names that encoder)
ENCODER_PARTS = {"video_encoder": (BASE_PARTS[0], "video-encoder"), "audio_encoder": (BASE_PARTS[1], "audio-encoder")}


class BaseCheckpointError(ValueError):
    """The configured base checkpoint is missing, malformed, or does not fit the run config."""


def encoder_sources(cfg: EdgefedConfig) -> tuple[str, str]:
    """Where the (video, audio) encoders load from: the base checkpoint's parts when one is set, else
    `video-encoder` / `audio-encoder` ("tiny" or a checkpoint directory)."""
    if not cfg.base_checkpoint:
        return cfg.video_encoder, cfg.audio_encoder
    root = Path(cfg.base_checkpoint)
    return str(root / ENCODER_PARTS["video_encoder"][0]), str(root / ENCODER_PARTS["audio_encoder"][0])


def check_base_checkpoint(cfg: EdgefedConfig, *, head: bool = True) -> Path:
    """The base checkpoint directory, after checking its layout (the head file too unless `head` is false)
    and that the encoder settings make the inputs its encoders take (`check_encoder_settings`)."""
    root = Path(cfg.base_checkpoint)
    if root.is_file():
        raise BaseCheckpointError(
            f"base-checkpoint {root} is a file: a warm start is the checkpoint directory `edgefed cloud train` "
            f"writes (<out>/checkpoint). Run the same `edgefed cloud train --out DIR` again: it resumes from "
            f"DIR/trainer_checkpoint.pt and writes DIR/checkpoint without training further")
    if not root.is_dir():
        raise BaseCheckpointError(f"base-checkpoint {root}: no such directory")
    wanted = [part for part, _ in ENCODER_PARTS.values()] + ([HEAD_FILE] if head else [])
    absent = [name for name in wanted if not (root / name).exists()]
    if absent:
        raise BaseCheckpointError(f"base-checkpoint {root}: no {', '.join(absent)} (not a directory written by "
                                  "`edgefed cloud train`)")
    check_encoder_settings(cfg)
    return root


def check_encoder_settings(cfg: EdgefedConfig) -> None:
    """`video-encoder` / `audio-encoder` describe the base checkpoint's encoders: `tiny` for a trained tiny
    part, a checkpoint of the same preprocessing for a family part; BaseCheckpointError saying what to set."""
    root = Path(cfg.base_checkpoint)
    for attribute, (part, key) in ENCODER_PARTS.items():
        path, setting = root / part, getattr(cfg, attribute)
        config = read_config(path)
        if is_tiny_checkpoint(config, path):
            if setting != TINY:
                raise BaseCheckpointError(f"base-checkpoint {root}: its {part} encoder is a trained tiny encoder, "
                                          f"but {key} is {setting}: leave {key} at tiny")
            continue
        if setting == TINY:
            raise BaseCheckpointError(f"base-checkpoint {root}: its {part} encoder is a {config['model_type']} "
                                      f"checkpoint, but {key} is tiny: set {key}={path}")
        try:
            same = read_preprocessing(setting) == read_preprocessing(path)
        except PreprocessingError as err:
            raise BaseCheckpointError(f"base-checkpoint {root}, {key}: {err}") from None
        if not same:
            raise BaseCheckpointError(f"base-checkpoint {root}: {key} {setting} has another preprocessing than its "
                                      f"{part} encoder: set {key}={path}")


def federation_settings(directory: str | Path, model: MultimodalClassifier) -> list[str]:
    """The `--set` pairs that start a federation from the base checkpoint `directory` of `model`."""
    directory = Path(directory)
    pairs = [f"base-checkpoint={directory}"]
    for attribute, (part, key) in ENCODER_PARTS.items():
        if model.encoders[attribute].spec.name != TINY:
            pairs.append(f"{key}={directory / part}")
    return pairs


def save_base_checkpoint(model: MultimodalClassifier, directory: str | Path) -> Path:
    """Write `model` as a base checkpoint into the new directory `directory`; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    for attribute, (part, _) in ENCODER_PARTS.items():
        save_encoder(model.encoders[attribute], directory / part)
    head = {name: tensor.detach().cpu().contiguous() for name, tensor in head_state(model).items()}
    save_file(head, str(directory / HEAD_FILE))
    return directory


def head_state(model: MultimodalClassifier) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state outside its encoders (projections, fusion, head), by state_dict name."""
    encoders = tuple(f"{attribute}." for attribute in ENCODER_PARTS)
    return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(encoders)}


def load_head_file(model: MultimodalClassifier, directory: str | Path) -> None:
    """Load `directory/head.safetensors` into `model` strictly: exactly its non-encoder tensors, each of
    the shape and dtype the run config builds; BaseCheckpointError naming the file and the tensor."""
    file = Path(directory) / HEAD_FILE
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as err:  # missing, unreadable, truncated or not safetensors
        raise BaseCheckpointError(f"{file}: unreadable ({err})") from None
    expected = head_state(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        problems = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"]
                                                                         if unexpected else [])
        raise BaseCheckpointError(f"{file}: {'; '.join(problems)} (a head of another model config?)")
    for name, tensor in sorted(tensors.items()):
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise BaseCheckpointError(f"{file}: {name} is {tuple(tensor.shape)} {tensor.dtype} in the file, the run "
                                      f"config builds {tuple(want.shape)} {want.dtype}")
    model.load_state_dict(tensors, strict=False)  # the encoders' keys are the ones left out, checked above


def _few(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")
