"""Regenerate the gRPC stubs from model_service.proto (reproducibly: fixed paths, pinned grpcio-tools).

    python -m edgefed.common.wire.protos.generate [OUT_DIR]

The stubs are committed (OUT_DIR defaults to this folder);
tests/test_model_distribution.py regenerates them into a temporary folder and
checks they match.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "model_service.proto"
# The stubs import each other by the package they are imported as; protoc derives
# that from the proto's path under its include root.
PACKAGE_PATH = Path("edgefed", "common", "wire", "protos")
STUBS = ("model_service_pb2.py", "model_service_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "src" / PACKAGE_PATH / PROTO
        staged.parent.mkdir(parents=True)
        shutil.copyfile(HERE / PROTO, staged)
        built = Path(tmp) / "out"
        built.mkdir()
        args = ["protoc", f"-I{Path(tmp) / 'src'}", f"--python_out={built}", f"--grpc_python_out={built}", str(staged)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        outputs = []
        for name in STUBS:
            target = out_dir / name
            shutil.copyfile(built / PACKAGE_PATH / name, target)
            outputs.append(target)
    return outputs


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in generate(target):
        print(path)
