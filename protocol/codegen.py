"""Regenerate the committed gRPC stubs from protocol/panal.proto.

    python -m protocol.codegen            # write protocol/panal_pb2*.py
    python -m protocol.codegen --check    # exit 1 if the committed stubs are stale

Stubs are generated from the repository root so their imports read
``from protocol import panal_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protocol/panal.proto"
OUTPUTS = ("panal_pb2.py", "panal_pb2.pyi", "panal_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on panal.proto into ``out_dir``/protocol and return the files made."""
    from grpc_tools import protoc  # dev-time dependency (grpcio-tools)

    (out_dir / "protocol").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_dir / "protocol" / name for name in OUTPUTS]


def stale_files() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (ROOT / "protocol" / f.name).exists()
            or (ROOT / "protocol" / f.name).read_bytes() != f.read_bytes()
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale stubs: {', '.join(stale)}; run `make proto` and commit them")
            return 1
        print("stubs are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            shutil.copyfile(f, ROOT / "protocol" / f.name)
            print(f"wrote protocol/{f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
