"""The SDK ships generated stubs; they must match proto/ exactly."""

import pathlib
import subprocess
import sys

SDK = pathlib.Path(__file__).resolve().parents[3] / "sdk" / "python"


def test_shipped_stubs_match_the_proto(tmp_path):
    subprocess.run([sys.executable, str(SDK / "scripts" / "gen_stubs.py"), str(tmp_path)], check=True)
    for name in ("modelbox_pb2.py", "modelbox_pb2_grpc.py"):
        fresh = (tmp_path / name).read_text()
        shipped = (SDK / "mbox" / "_proto" / name).read_text()
        assert fresh == shipped, f"{name} is stale: run python sdk/python/scripts/gen_stubs.py"


def test_importing_mbox_imports_neither_torch_nor_lightning():
    code = "import sys, mbox; assert not {'torch', 'lightning'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
