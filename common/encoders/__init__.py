"""The encoder registry: every frame or audio encoder edgefed can build on, behind one interface.

    "tiny" | checkpoint dir ──► load_encoder(source, modality) ──► LoadedEncoder(spec, module, checkpoint_path, config)
        config.json model_type ──► EncoderSpec (registry)          │
                                                                   ├─ encode(inputs [B, *input_shape], mask) ──► [B, hidden]
                                                                   └─ lora_targets(loaded, layers) ──► exact module names for peft

A spec per family (frames.py, audio.py; tiny.py for the built-in random encoders) says how
to load the bare encoder, its input, its readout, its layers and LoRA projections, and the
preprocessing kind it needs. Loading never downloads and never keeps a random weight
silently: see checkpoint.py. `base_fingerprint_of_checkpoint` hashes a checkpoint's files.
`save_encoder` writes a (trained) encoder back as a checkpoint directory that loads as the same
encoder: a tiny one marked as tiny, a family one in its own layout with its preprocessing.
"""

from edgefed.common.encoders.checkpoint import base_fingerprint_of_checkpoint, read_config, read_model_type
from edgefed.common.encoders.loading import TINY, LoadedEncoder, load_encoder
from edgefed.common.encoders.readout import readout
from edgefed.common.encoders.registry import REGISTRY, SUPPORTED_MODEL_TYPES, spec_for
from edgefed.common.encoders.saving import save_encoder
from edgefed.common.encoders.spec import EncoderCheckpointError, EncoderSpec, Modality, Preprocessing, Readout
from edgefed.common.encoders.targets import check_lora_targets, lora_targets
from edgefed.common.encoders.tiny import TINY_MARKER, TINY_SPECS, is_tiny_checkpoint

__all__ = [
    "REGISTRY",
    "SUPPORTED_MODEL_TYPES",
    "TINY",
    "TINY_MARKER",
    "TINY_SPECS",
    "EncoderCheckpointError",
    "EncoderSpec",
    "LoadedEncoder",
    "Modality",
    "Preprocessing",
    "Readout",
    "base_fingerprint_of_checkpoint",
    "check_lora_targets",
    "is_tiny_checkpoint",
    "load_encoder",
    "lora_targets",
    "read_config",
    "read_model_type",
    "readout",
    "save_encoder",
    "spec_for",
]
