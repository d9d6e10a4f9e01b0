"""Run under torchrun by tests/test_global_trainer.py: train, then each rank writes its parameters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.cloud.training import ddp_trainer  # noqa: E402
from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.data.features import load_features  # noqa: E402


def main() -> None:
    features, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = EdgefedConfig().with_overrides(sys.argv[3:])
    _, model = ddp_trainer.train(cfg, load_features(features), out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"rank{os.environ.get('RANK', '0')}.safetensors"))


if __name__ == "__main__":
    main()
