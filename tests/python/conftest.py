"""Fixtures shared by the Python suites (helpers live in harness.py)."""

import pathlib
import tempfile

import pytest

from harness import ROOT, Mboxd, generate_stubs


@pytest.fixture(scope="session")
def stub_dir():
    with tempfile.TemporaryDirectory() as d:
        yield pathlib.Path(d)


@pytest.fixture(scope="session")
def compat(stub_dir):
    """Stubs from the ModelBox 0.0.5 proto: no mboxd extensions."""
    return generate_stubs(ROOT / "tests" / "python" / "proto", "modelbox_v005.proto", stub_dir, "compat_stubs")


@pytest.fixture(scope="session")
def full():
    """Messages and stub of mboxd's own proto, with the extensions: the ones the SDK
    builds from its shipped descriptor (test_sdk_descriptor.py checks it matches
    proto/). One module holds both, as (pb2, pb2_grpc) would."""
    from mbox._proto import modelbox

    return modelbox, modelbox


@pytest.fixture
def mboxd(tmp_path):
    server = Mboxd(tmp_path / "data", ["--roll-max-age-ms", "200"])
    yield server
    assert server.stop() == 0
