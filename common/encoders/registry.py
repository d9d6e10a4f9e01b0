"""The encoder specs by config.json `model_type` (the way peft keys its target-module mappings)."""

from __future__ import annotations

from pathlib import Path

from edgefed.common.encoders.audio import AUDIO_SPECS
from edgefed.common.encoders.frames import FRAME_SPECS
from edgefed.common.encoders.spec import EncoderCheckpointError, EncoderSpec, Modality

REGISTRY: dict[str, EncoderSpec] = {model_type: spec for spec in (*FRAME_SPECS, *AUDIO_SPECS) for model_type in spec.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(REGISTRY))


def spec_for(model_type: str, modality: Modality, path: Path) -> EncoderSpec:
    """The spec that loads `model_type` as a `modality` encoder; refuses other types and the other modality."""
    spec = REGISTRY.get(model_type)
    if spec is None:
        raise EncoderCheckpointError(
            path, f"model_type {model_type!r} is not a supported encoder; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if spec.modality != modality:
        raise EncoderCheckpointError(path, f"model_type {model_type!r} is a {spec.modality} encoder, not {modality}")
    return spec
