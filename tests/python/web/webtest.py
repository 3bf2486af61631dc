"""Helpers for the web view's tests (the fixtures are in conftest.py): the two
backends, real mboxd (the default) and the Python mock of its HTTP API
(MBOX_WEB_MOCK=1), and a browser tab that records what it should never see.

The same tests run against both backends: they only see `backend.base_url` and the
backend's create / log / log_events / update_metadata methods, which go through
gRPC to real mboxd and through mock-only POST endpoints to the mock."""

import json
import os
import pathlib
import time
import urllib.error
import urllib.request

from harness import ROOT, Mboxd, free_port

MOCK = os.environ.get("MBOX_WEB_MOCK") == "1"
CHROMIUM = os.environ.get("MBOX_CHROMIUM", "/usr/bin/chromium")
# Never let Chromium reach the network or download anything of its own.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = pathlib.Path(os.environ.get("MBOX_WEB_SCREENSHOTS", ROOT / "target" / "web-screenshots"))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def http_get(url, headers=None):
    """(status, headers, body bytes) of a GET, without raising on 4xx/5xx."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def wait_http(base_url, timeout=20):
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(base_url + "/api/v1/health", timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers: the test will say what is wrong
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"nothing answers HTTP at {base_url}")
            time.sleep(0.05)


class GrpcBackend:
    """Real mboxd: data goes in over gRPC, as a trainer's would."""

    mock = False

    def __init__(self, server: Mboxd):
        from mbox._proto import modelbox

        self.server = server
        self.pb2 = modelbox
        self.stub = modelbox.ModelStoreStub(server.channel)
        self.base_url = server.http_url

    def _metadata(self, msg, metadata):
        from mbox.client import to_value_proto

        for k, v in (metadata or {}).items():
            msg.metadata[k].CopyFrom(to_value_proto(v))

    def create(self, name, namespace="", owner="", metadata=None, framework="UNKNOWN", task="", external_id=""):
        pb2 = self.pb2
        req = pb2.CreateExperimentRequest(name=name, namespace=namespace, owner=owner, task=task, external_id=external_id,
                                          framework=pb2.MLFramework.Value(framework))
        self._metadata(req.metadata, metadata)
        return self.stub.CreateExperiment(req).experiment_id

    def update_metadata(self, eid, metadata):
        req = self.pb2.UpdateMetadataRequest(parent_id=eid)
        self._metadata(req.metadata, metadata)
        self.stub.UpdateMetadata(req)

    def log(self, eid, key, steps, values, wallclocks=None):
        """One series' points; a str value is logged as a string point."""
        steps = [int(s) for s in steps]
        if wallclocks is None:
            wallclocks = [now_ms()] * len(steps)
        values = list(values)
        for lo in range(0, len(steps), 200_000):
            hi = min(len(steps), lo + 200_000)
            vals = values[lo:hi]
            srows = [i for i, v in enumerate(vals) if isinstance(v, str)]
            block = self.pb2.MetricsBlock(
                parent_id=eid, keys=[key], key_index=[0] * (hi - lo), steps=steps[lo:hi],
                wallclock_times=[int(w) for w in wallclocks[lo:hi]],
                values=[0.0 if isinstance(v, str) else float(v) for v in vals],
                string_rows=srows, string_values=[vals[i] for i in srows])
            assert self.stub.LogMetrics(self.pb2.LogMetricsRequest(blocks=[block])).points_accepted == hi - lo

    def log_events(self, eid, events):
        from mbox.client import timestamp_of_ms

        pb2 = self.pb2
        msgs = []
        for e in events:
            ev = pb2.Event(name=e["name"], source=pb2.EventSource(name=e.get("source", "")),
                           wallclock_time=timestamp_of_ms(e.get("wallclock", now_ms())))
            self._metadata(ev.metadata, e.get("metadata"))
            msgs.append(ev)
        assert self.stub.LogEvent(pb2.LogEventRequest(parent_id=eid, events=msgs)).events_accepted == len(msgs)


class MockBackend:
    """The mock: data goes in through its POST /_mock/ endpoints."""

    mock = True

    def __init__(self, server):
        self.server = server
        self.base_url = server.base_url

    def _post(self, path, body):
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def create(self, name, namespace="", owner="", metadata=None, framework="UNKNOWN", task="", external_id=""):
        return self._post("/_mock/experiments", {"name": name, "namespace": namespace, "owner": owner, "metadata": metadata or {},
                                                 "framework": framework, "task": task, "external_id": external_id})["id"]

    def update_metadata(self, eid, metadata):
        self._post("/_mock/metadata", {"id": eid, "metadata": metadata})

    def log(self, eid, key, steps, values, wallclocks=None):
        steps = [int(s) for s in steps]
        values = [None if isinstance(v, str) else float(v) for v in values]
        wallclocks = [int(w) for w in wallclocks] if wallclocks is not None else None
        self._post("/_mock/metrics", {"id": eid, "key": key, "steps": steps, "values": values, "wallclocks": wallclocks})

    def log_events(self, eid, events):
        self._post("/_mock/events", {"id": eid, "events": [{"wallclock": now_ms(), **e} for e in events]})


def start_backend(tmp_path_factory):
    if MOCK:
        from mock_server import MockServer

        server = MockServer().start()
        return server, MockBackend(server), server.stop
    data = tmp_path_factory.mktemp("web") / "data"
    server = Mboxd(data, ["--roll-max-age-ms", "200"], metrics_listen=f"127.0.0.1:{free_port()}")
    wait_http(server.http_url)

    def stop():
        assert server.stop() == 0

    return server, GrpcBackend(server), stop


class Page:
    """A browser tab that records dialogs, page errors and console errors."""

    def __init__(self, page, base_url):
        self.page = page
        self.base_url = base_url
        self.dialogs = []
        self.errors = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))

    def _dialog(self, d):
        self.dialogs.append(d.message)
        d.dismiss()

    def open(self, path, timeout=20_000):
        """Loads a page and waits until it says it is complete (every chart drawn)."""
        self.page.goto(self.base_url + path)
        self.page.wait_for_selector("html[data-ready]", timeout=timeout)
        state = self.page.evaluate("document.documentElement.dataset.ready")
        assert state == "true", f"{path}: the page failed: {self.page.inner_text('main')[:500]}"
        return self.page

    def charts(self):
        """{key: dataset} of every chart card."""
        return self.page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.chart-card[data-key]')].map(c => [c.dataset.key, {...c.dataset}]))")
