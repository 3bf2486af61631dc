"""Helpers for the Python suites: a real mboxd binary on a loopback port, gRPC stubs
generated at test time, free ports."""

import atexit
import importlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def mboxd_binary() -> str:
    path = os.environ.get("MBOXD_BIN")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
        path = os.path.join(target, "debug", "mboxd")
    if not os.path.exists(path):
        pytest.fail(f"mboxd binary not found at {path}; build it first (cargo build) or set MBOXD_BIN")
    return path


def generate_stubs(proto_dir: pathlib.Path, proto_file: str, out: pathlib.Path, package: str):
    """Generates <package>/<name>_pb2(_grpc).py with grpc_tools and imports them."""
    import grpc_tools
    from grpc_tools import protoc

    pkg_dir = out / package
    pkg_dir.mkdir(parents=True, exist_ok=True)
    (pkg_dir / "__init__.py").write_text("")
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"  # the well-known types
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={pkg_dir}",
        f"--grpc_python_out={pkg_dir}",
        str(proto_dir / proto_file),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {proto_file}")
    stem = proto_file.removesuffix(".proto")
    grpc_file = pkg_dir / f"{stem}_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace(f"import {stem}_pb2", f"from . import {stem}_pb2"))
    sys.path.insert(0, str(out))
    pb2 = importlib.import_module(f"{package}.{stem}_pb2")
    pb2_grpc = importlib.import_module(f"{package}.{stem}_pb2_grpc")
    return pb2, pb2_grpc


_running = []


@atexit.register
def _kill_leftovers():
    # A failed test may not reach stop(); a daemon left running would hold the
    # test runner's output open.
    for proc in _running:
        if proc.poll() is None:
            proc.kill()


class Mboxd:
    """A running mboxd process with its own data folder."""

    def __init__(self, data_dir: pathlib.Path, extra_args=(), listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                 credentials=None):
        """credentials: grpc.ssl_channel_credentials for an mboxd serving TLS."""
        self.data_dir = data_dir
        self.metrics_listen = metrics_listen
        self.addr_file = data_dir.parent / f"{data_dir.name}.addr"
        if self.addr_file.exists():
            self.addr_file.unlink()
        self.proc = subprocess.Popen(
            [
                mboxd_binary(),
                "serve",
                "--listen",
                listen,
                "--data-dir",
                str(data_dir),
                "--addr-file",
                str(self.addr_file),
                "--daemon-id",
                "pytest",
                "--metrics-listen",
                metrics_listen,
                *extra_args,
            ],
        )
        _running.append(self.proc)
        deadline = time.time() + 20
        while not (self.addr_file.exists() and self.addr_file.read_text()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mboxd exited with {self.proc.returncode}")
            if time.time() > deadline:
                raise RuntimeError("mboxd did not start")
            time.sleep(0.02)
        self.addr = self.addr_file.read_text().strip()
        self.port = int(self.addr.rsplit(":", 1)[1])
        self.channel = (grpc.insecure_channel(self.addr) if credentials is None
                        else grpc.secure_channel(self.addr, credentials))
        grpc.channel_ready_future(self.channel).result(timeout=10)

    @property
    def http_addr(self) -> str:
        """host:port of the HTTP listener (web view, JSON API, /metrics). Start the
        daemon with a fixed port for it: metrics_listen=f"127.0.0.1:{free_port()}"."""
        host, port = self.metrics_listen.rsplit(":", 1)
        if port == "0":
            raise RuntimeError("the HTTP listener was started on port 0; pass metrics_listen with a free port")
        return f"{host}:{port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"

    def stop(self) -> int:
        """SIGTERM: a graceful stop that publishes everything buffered."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> int:
        """SIGKILL: a crash; what was acknowledged must come back from the WAL."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=60)


def make_test_pki(folder: pathlib.Path) -> dict:
    """A CA and a server certificate for localhost and 127.0.0.1, made now with the
    openssl command: paths of ca.crt, server.crt and server.key."""
    import shutil

    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("the openssl command is needed to make a test CA")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mbox test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=mboxd")
    (folder / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "server.ext", "-out", "server.crt")
    return {name: folder / f"{name}" for name in ("ca.crt", "server.crt", "server.key")}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A real S3-compatible server (s3s-fs) on a loopback port, serving `root`, where
    each sub-folder is a bucket. scripts/test.sh installs it and sets MBOXD_S3S_FS."""

    ACCESS_KEY = "mboxd-test"
    SECRET_KEY = "mboxd-test-secret"
    BUCKET = "runs"

    def __init__(self, root: pathlib.Path):
        binary = os.environ.get("MBOXD_S3S_FS")
        if not binary or not os.path.exists(binary):
            pytest.fail("s3s-fs not found: run ./scripts/test.sh (it installs it) or set MBOXD_S3S_FS")
        (root / self.BUCKET).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", str(self.port),
             "--access-key", self.ACCESS_KEY, "--secret-key", self.SECRET_KEY, str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _running.append(self.proc)
        import socket

        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("s3s-fs did not start")
                time.sleep(0.02)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_toml(self, prefix: str) -> str:
        """The [storage] sections of an mboxd config writing to s3://runs/<prefix>."""
        return (
            f'[storage]\nroot = "s3://{self.BUCKET}/{prefix}"\n'
            f'[storage.s3]\nendpoint = "{self.endpoint}"\nregion = "us-east-1"\n'
            f'access_key_id = "{self.ACCESS_KEY}"\nsecret_access_key = "{self.SECRET_KEY}"\n'
            "allow_http = true\nmax_retries = 1\nretry_timeout_ms = 2000\n"
        )

    def filesystem(self):
        """pyarrow's S3 filesystem for this server."""
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=self.ACCESS_KEY, secret_key=self.SECRET_KEY, region="us-east-1",
            endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
        )

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
