"""Every JSON endpoint of docs/http-api.md against a real mboxd (MBOX_WEB_MOCK=1: the
mock): exact answers for known data, 400 naming the parameter for bad parameters,
404 for unknown experiments, and the static files the page is made of."""

import json
import pathlib
import time
import urllib.parse

import pytest

from webtest import http_get, now_ms
from harness import ROOT

WEB = ROOT / "web"


def get(backend, path, **params):
    """(status, decoded JSON) of GET path?params; list values repeat the parameter."""
    qs = urllib.parse.urlencode(params, doseq=True)
    status, headers, body = http_get(backend.base_url + path + ("?" + qs if qs else ""))
    if path.startswith("/api/"):
        assert headers["Content-Type"].replace(" ", "").lower() == "application/json;charset=utf-8", headers["Content-Type"]
    return status, json.loads(body)


def ok(backend, path, **params):
    status, body = get(backend, path, **params)
    assert status == 200, body
    return body


def bad(backend, path, parameter, **params):
    status, body = get(backend, path, **params)
    assert status == 400, (params, body)
    assert body["parameter"] == parameter, body
    assert isinstance(body["error"], str) and body["error"], body
    return body


def not_found(backend, path, eid, **params):
    status, body = get(backend, path, **params)
    assert status == 404, body
    assert body["error"] == f"experiment {eid} not found"


@pytest.fixture(scope="module")
def data(backend):
    """Five runs in `api-cv` and one in `api-nlp`, with metadata, metrics and events."""
    t0 = now_ms() - 1_000_000
    runs = {}
    specs = [
        ("resnet-50", "api-cv", "a@b.com", {"lr": 0.0003, "optimizer": "adamw"}, 0.15),
        ("resnet-101", "api-cv", "a@b.com", {"lr": 0.001, "optimizer": "sgd"}, 0.25),
        ("vit-b", "api-cv", "c@d.com", {"lr": 0.0003, "optimizer": "adamw"}, 0.35),
        ("vit-l", "api-cv", "c@d.com", {"lr": 0.0001}, None),
        ("mlp", "api-cv", "e@f.com", {}, None),
        ("gpt", "api-nlp", "a@b.com", {"lr": 0.0006, "layers": 12}, 0.1),
    ]
    for name, space, owner, meta, final in specs:
        eid = backend.create(name, namespace=space, owner=owner, metadata=meta, framework="PYTORCH", task="cls",
                             external_id="ext-" + name)
        runs[name] = eid
        if final is not None:
            # val/loss: steps 0, 10, ..., 990, falling to `final` at the last step.
            steps = list(range(0, 1000, 10))
            values = [final + (99 - i) * 0.01 for i in range(100)]
            backend.log(runs[name], "val/loss", steps, values, [t0 + s for s in steps])
        time.sleep(0.01)  # distinct creation times
    # Summaries are folded in as files are published (within the roll age, 200 ms
    # here): wait for all four runs with points to show theirs.
    deadline = time.time() + 20
    while True:
        listed = ok(backend, "/api/v1/experiments", page_size=100)["experiments"]
        if sum(1 for e in listed if e["summaries"]) == 4:
            break
        assert time.time() < deadline, "summaries never appeared"
        time.sleep(0.05)
    return runs


def test_namespaces(backend, data):
    assert ok(backend, "/api/v1/namespaces") == {"namespaces": ["api-cv", "api-nlp"]}


def test_experiment_record(backend, data):
    [e] = ok(backend, "/api/v1/experiments", filter='name ~ "gpt"')["experiments"]
    created = e.pop("created_at")
    updated = e.pop("updated_at")
    assert now_ms() - 60_000 < created <= updated <= now_ms()
    assert e == {
        "id": data["gpt"], "name": "gpt", "namespace": "api-nlp", "owner": "a@b.com", "framework": "PYTORCH",
        "task": "cls", "external_id": "ext-gpt", "metadata": {"lr": 0.0006, "layers": 12},
        "summaries": {"val/loss": {"last": pytest.approx(0.1), "last_step": 990, "min": pytest.approx(0.1),
                                   "max": pytest.approx(1.09), "count": 100}},
        "points_last_minute": 100,
    }
    detail = ok(backend, f"/api/v1/experiments/{data['gpt']}")
    assert detail.pop("keys") == ["val/loss"]
    assert detail == {**e, "created_at": created, "updated_at": updated}


def names(body):
    return [e["name"] for e in body["experiments"]]


def test_list_filter_and_order(backend, data):
    newest_first = ["gpt", "mlp", "vit-l", "vit-b", "resnet-101", "resnet-50"]
    assert names(ok(backend, "/api/v1/experiments")) == newest_first
    assert names(ok(backend, "/api/v1/experiments", order_by="created_at ASC")) == newest_first[::-1]
    assert names(ok(backend, "/api/v1/experiments", namespace="api-nlp")) == ["gpt"]
    assert ok(backend, "/api/v1/experiments", namespace="nobody")["experiments"] == []
    q = lambda f, **kw: names(ok(backend, "/api/v1/experiments", filter=f, order_by="created_at ASC", **kw))  # noqa: E731
    assert q('name ~ "resnet"') == ["resnet-50", "resnet-101"]
    assert q('owner = "c@d.com"') == ["vit-b", "vit-l"]
    assert q("params.lr = 0.0003") == ["resnet-50", "vit-b"]
    assert q('params.optimizer = "adamw"') == ["resnet-50", "vit-b"]
    assert q("metrics.val/loss.last < 0.2") == ["resnet-50", "gpt"]
    assert q("metrics.val/loss.last < 0.2", namespace="api-cv") == ["resnet-50"]
    assert q('name ~ "vit" and params.lr = 0.0003') == ["vit-b"]
    assert q('owner = "a@b.com" and metrics.val/loss.last < 0.3 and params.lr > 0.0005') == ["resnet-101", "gpt"]
    assert q('name ~ "nothing-like-this"') == []


def test_list_pages(backend, data):
    seen = []
    token = ""
    sizes = []
    while True:
        body = ok(backend, "/api/v1/experiments", namespace="api-cv", page_size=2, order_by="created_at ASC",
                  **({"page_token": token} if token else {}))
        sizes.append(len(body["experiments"]))
        seen += names(body)
        token = body["next_page_token"]
        if not token:
            break
    assert sizes == [2, 2, 1]
    assert seen == ["resnet-50", "resnet-101", "vit-b", "vit-l", "mlp"]
    assert len(ok(backend, "/api/v1/experiments", namespace="api-cv", page_size=1000)["experiments"]) == 5


@pytest.mark.parametrize("params,parameter", [
    ({"page_size": "0"}, "page_size"),
    ({"page_size": "1001"}, "page_size"),
    ({"page_size": "ten"}, "page_size"),
    ({"page_size": "-1"}, "page_size"),
    ({"page_token": "not-a-token"}, "page_token"),
    ({"namespace": "bad namespace!"}, "namespace"),
    ({"namespace": "a/b"}, "namespace"),
    ({"filter": "name ~"}, "filter"),
    ({"filter": 'name ~ "unterminated'}, "filter"),
    ({"filter": "params.lr >>> 1"}, "filter"),
    ({"filter": 'name ~ "a" and'}, "filter"),
    ({"order_by": "created_at SIDEWAYS"}, "order_by"),
    ({"order_by": "no such field!"}, "order_by"),
])
def test_list_bad_parameters(backend, data, params, parameter):
    bad(backend, "/api/v1/experiments", parameter, **params)


def test_unknown_experiment(backend, data):
    eid = "0123456789abcdef0123456789abcdef"
    not_found(backend, f"/api/v1/experiments/{eid}", eid)
    not_found(backend, f"/api/v1/experiments/{eid}/events", eid)
    not_found(backend, f"/api/v1/experiments/{eid}/series", eid)
    not_found(backend, f"/api/v1/experiments/{eid}/series", eid, keys="val/loss", max_points=10)


def test_events(backend, data):
    eid = data["mlp"]
    t = now_ms() - 10_000
    # Logged out of order; answered by wallclock.
    backend.log_events(eid, [
        {"name": "eval", "source": "evaluator", "wallclock": t + 2000, "metadata": {"acc": 0.5, "tags": ["a", "b"]}},
        {"name": "start", "source": "trainer", "wallclock": t},
        {"name": "checkpoint", "source": "trainer", "wallclock": t + 1000, "metadata": {"step": 100}},
    ])
    events = ok(backend, f"/api/v1/experiments/{eid}/events")["events"]
    assert events == [
        {"name": "start", "source": "trainer", "wallclock": t, "metadata": {}},
        {"name": "checkpoint", "source": "trainer", "wallclock": t + 1000, "metadata": {"step": 100}},
        {"name": "eval", "source": "evaluator", "wallclock": t + 2000, "metadata": {"acc": 0.5, "tags": ["a", "b"]}},
    ]
    # `since` is inclusive.
    assert [e["name"] for e in ok(backend, f"/api/v1/experiments/{eid}/events", since=t + 1000)["events"]] == ["checkpoint", "eval"]
    assert ok(backend, f"/api/v1/experiments/{eid}/events", since=t + 2001)["events"] == []
    assert ok(backend, f"/api/v1/experiments/{data['vit-l']}/events") == {"events": []}
    for since in ("-1", "yesterday", "1.5"):
        bad(backend, f"/api/v1/experiments/{eid}/events", "since", since=since)


@pytest.fixture(scope="module")
def series_run(backend, data):
    eid = backend.create("series", namespace="api-series")
    t0 = 1_700_000_000_000
    steps = list(range(10_000))
    backend.log(eid, "train/loss", steps, [float(s % 1000) for s in steps], [t0 + s for s in steps])
    backend.log(eid, "small", [0, 5, 7], [1.5, -2.0, 3.25], [t0, t0 + 5, t0 + 7])
    backend.log(eid, "text", [0, 1, 2], [1.0, "hello", 3.0], [t0, t0 + 1, t0 + 2])
    return eid, t0


def series(backend, eid, **params):
    return ok(backend, f"/api/v1/experiments/{eid}/series", **params)["series"]


def test_series_exact(backend, series_run):
    eid, t0 = series_run
    [s] = series(backend, eid, keys="small")
    assert s == {"key": "small", "bucketed": False, "total_points": 3, "steps": [0, 5, 7],
                 "wallclocks": [t0, t0 + 5, t0 + 7], "values": [1.5, -2.0, 3.25], "min": None, "max": None}
    # Non-numeric values are null.
    [s] = series(backend, eid, keys="text")
    assert s["values"] == [1.0, None, 3.0] and s["steps"] == [0, 1, 2] and s["bucketed"] is False
    # Keys: repeated, in sorted order; unknown keys left out; absent: every key.
    assert [x["key"] for x in series(backend, eid, keys=["small", "train/loss", "nope"], max_points=10)] == ["small", "train/loss"]
    assert [x["key"] for x in series(backend, eid, max_points=10)] == ["small", "text", "train/loss"]
    # An inclusive step range.
    [s] = series(backend, eid, keys="train/loss", start_step=100, end_step=104)
    assert s["steps"] == [100, 101, 102, 103, 104] and s["values"] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert s["total_points"] == 5 and s["bucketed"] is False
    [s] = series(backend, eid, keys="train/loss", start_step=9998)
    assert s["steps"] == [9998, 9999]
    [s] = series(backend, eid, keys="train/loss", start_step=20_000)
    assert s == {"key": "train/loss", "bucketed": False, "total_points": 0, "steps": [], "wallclocks": [], "values": [],
                 "min": None, "max": None}
    # Exactly max_points points: not bucketed.
    [s] = series(backend, eid, keys="train/loss", start_step=0, end_step=99, max_points=100)
    assert s["bucketed"] is False and len(s["steps"]) == 100


def test_series_bucketed(backend, series_run):
    eid, t0 = series_run
    # 10,000 steps in 100 buckets of 100: each answers with its last point and extremes.
    [s] = series(backend, eid, keys="train/loss", max_points=100)
    assert s["bucketed"] is True and s["total_points"] == 10_000
    assert s["steps"] == [100 * b + 99 for b in range(100)]
    assert s["wallclocks"] == [t0 + 100 * b + 99 for b in range(100)]
    assert s["values"] == [float((100 * b + 99) % 1000) for b in range(100)]
    assert s["min"] == [float((100 * b) % 1000) for b in range(100)]
    assert s["max"] == s["values"]
    # Within a range: steps 1000..2999 in buckets of ceil(2000 / 7) = 286 steps.
    [s] = series(backend, eid, keys="train/loss", start_step=1000, end_step=2999, max_points=7)
    assert s["total_points"] == 2000 and s["bucketed"] is True
    assert s["steps"] == [1285, 1571, 1857, 2143, 2429, 2715, 2999]
    assert s["values"] == [285.0, 571.0, 857.0, 143.0, 429.0, 715.0, 999.0]
    assert s["min"] == [0.0, 286.0, 572.0, 0.0, 144.0, 430.0, 716.0]
    assert s["max"] == [285.0, 571.0, 857.0, 999.0, 429.0, 715.0, 999.0]
    [s] = series(backend, eid, keys="train/loss", max_points=1)
    assert s["steps"] == [9999] and s["min"] == [0.0] and s["max"] == [999.0] and s["values"] == [999.0]


@pytest.mark.parametrize("params,parameter", [
    ({"max_points": "0"}, "max_points"),
    ({"max_points": "100001"}, "max_points"),
    ({"max_points": "many"}, "max_points"),
    ({"start_step": "-1"}, "start_step"),
    ({"start_step": "one"}, "start_step"),
    ({"end_step": "-5"}, "end_step"),
    ({"end_step": "1e3"}, "end_step"),
    ({"start_step": "10", "end_step": "9"}, "end_step"),
])
def test_series_bad_parameters(backend, series_run, params, parameter):
    bad(backend, f"/api/v1/experiments/{series_run[0]}/series", parameter, **params)


def test_health(backend, data):
    before = ok(backend, "/api/v1/health")
    for field in ("uptime_s", "points_accepted_total", "events_accepted_total", "points_rejected_total", "buffered_bytes",
                  "memory_budget_bytes", "wal_appends_total", "files_published_total", "published_bytes_total",
                  "spool_bytes", "spool_files", "summaries_pending_files", "compactions_total", "compacted_files_total",
                  "queue_depth", "wal_bytes"):
        assert isinstance(before[field], (int, float)) and before[field] >= 0, field
    assert isinstance(before["version"], str) and before["version"]
    eid = backend.create("health", namespace="api-health")
    backend.log(eid, "k", range(777), [1.0] * 777)
    backend.log_events(eid, [{"name": "e"}, {"name": "f"}])
    after = ok(backend, "/api/v1/health")
    assert after["points_accepted_total"] - before["points_accepted_total"] == 777
    assert after["events_accepted_total"] - before["events_accepted_total"] == 2
    assert after["wal_appends_total"] - before["wal_appends_total"] >= 2
    assert after["uptime_s"] > before["uptime_s"]


def test_api_is_read_only_and_unknown_paths_404(backend, data):
    import urllib.error
    import urllib.request

    for path in ("/api/v1/experiments", f"/api/v1/experiments/{data['gpt']}"):
        req = urllib.request.Request(backend.base_url + path, data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405
        assert "GET" in e.value.headers["Allow"]
    status, body = get(backend, "/api/v1/no-such-endpoint")
    assert status == 404 and body["error"]


def web_files():
    return sorted(p.relative_to(WEB).as_posix() for p in WEB.rglob("*") if p.is_file())


CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def test_static_files_are_served_as_they_are(backend, data):
    files = web_files()
    assert "index.html" in files and "app.js" in files and "vendor/uplot/uPlot.iife.min.js" in files
    for rel in files:
        status, headers, body = http_get(f"{backend.base_url}/assets/{rel}")
        assert status == 200, rel
        assert body == (WEB / rel).read_bytes(), rel
        want = CONTENT_TYPES.get(pathlib.PurePosixPath(rel).suffix)
        if want:
            # Module scripts load only with a JavaScript MIME type.
            assert headers["Content-Type"].split(";")[0].strip() == want, (rel, headers["Content-Type"])
    status, _, _ = http_get(f"{backend.base_url}/assets/no-such-file.js")
    assert status == 404


def test_pages_serve_the_shell(backend, data):
    shell = (WEB / "index.html").read_bytes()
    for path in ("/", f"/experiments/{data['gpt']}", "/experiments/unknown-id", "/compare?ids=a,b", "/health"):
        status, headers, body = http_get(backend.base_url + path)
        assert status == 200, path
        assert headers["Content-Type"].split(";")[0].strip() == "text/html", path
        assert body == shell, path
