"""`save_encoder`: a loaded encoder written as a checkpoint directory that `load_encoder` reads back as the same encoder.

    tiny        save_pretrained (safetensors) + config.json marked "edgefed_encoder": "tiny" (tiny.py):
                loaded back as tiny (patch-mean readout, letterboxed frames, the tiny log-mel), not as a ViT/AST
    checkpoint  the family's own layout (spec.save, or save_pretrained in its original format), plus the
                preprocessor_config.json of the checkpoint it was loaded from, so its preprocessing stays
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgefed.common.encoders.checkpoint import CONFIG_FILES, quiet_transformers
from edgefed.common.encoders.loading import LoadedEncoder
from edgefed.common.encoders.spec import EncoderCheckpointError
from edgefed.common.encoders.tiny import mark_tiny_checkpoint

PREPROCESSOR_CONFIG = CONFIG_FILES[1]


def save_encoder(loaded: LoadedEncoder, path: str | Path) -> Path:
    """Write `loaded` (its current weights) into the new directory `path`; returns `path`."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: an encoder is saved into a new directory")
    module = loaded.module
    with quiet_transformers():  # its progress bar
        if loaded.spec.name == "tiny":
            module.save_pretrained(path)
        elif loaded.spec.save is not None:
            loaded.spec.save(module, path)
        else:
            module.save_pretrained(path)
    if loaded.spec.name == "tiny":
        mark_tiny_checkpoint(path)
        return path
    source = loaded.checkpoint_path
    assert source is not None  # a family encoder always comes from a checkpoint
    if not (source / PREPROCESSOR_CONFIG).is_file():
        raise EncoderCheckpointError(source, f"no {PREPROCESSOR_CONFIG}: its preprocessing cannot be saved with it")
    shutil.copyfile(source / PREPROCESSOR_CONFIG, path / PREPROCESSOR_CONFIG)
    return path
