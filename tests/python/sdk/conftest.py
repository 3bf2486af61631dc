import pytest

import mbox.client


@pytest.fixture
def default_client_at(monkeypatch):
    """Points mbox's module-level default client at an address for one test."""

    def point(addr):
        monkeypatch.setenv("MBOX_ADDR", addr)
        mbox.client._default = None

    yield point
    if mbox.client._default is not None:
        mbox.client._default.close(timeout=5)
    mbox.client._default = None
