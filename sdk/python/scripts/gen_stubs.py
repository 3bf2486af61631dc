"""Regenerates mbox/_proto/ from the repository's proto/modelbox.proto.

Needs grpcio-tools (a development dependency only: the installed SDK ships the
generated files). Usage: python scripts/gen_stubs.py [OUT_DIR]
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
SDK = HERE.parent
PROTO_DIR = SDK.parent.parent / "proto"


def generate(out: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_DIR / "modelbox.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out / "modelbox_pb2_grpc.py"
    # Generated code imports its sibling absolutely; inside a package it must be relative.
    grpc_file.write_text(grpc_file.read_text().replace("import modelbox_pb2 as", "from . import modelbox_pb2 as"))


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else SDK / "mbox" / "_proto")
