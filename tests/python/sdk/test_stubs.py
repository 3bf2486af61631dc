"""The SDK ships generated stubs; they must match proto/ exactly."""

import os
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


def test_importing_mbox_imports_neither_torch_nor_lightning(tmp_path):
    # Importable stand-ins, so an accidental import would succeed and show up in
    # sys.modules even where the real packages are not installed.
    for name in ("torch", "lightning"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = "import sys, mbox; assert not {'torch', 'lightning'} & set(sys.modules), sorted(sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    # The probe itself works: the stand-ins are importable from PYTHONPATH.
    probe = "import sys, lightning; assert 'lightning' in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True, env=env)
