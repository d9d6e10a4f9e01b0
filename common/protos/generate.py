"""Regenerate the gRPC stubs from model_service.proto (reproducibly: fixed paths, pinned grpcio-tools).

    python -m common.protos.generate [OUT_DIR]

Run from the repository root. The stubs are committed; tests/test_model_service.py
regenerates them into a temporary folder and checks they match.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "common/protos/model_service.proto"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    # -I at the repo root makes the generated import `from common.protos import ...`
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    base = out_dir / "common" / "protos"
    return [base / "model_service_pb2.py", base / "model_service_pb2_grpc.py"]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path)
