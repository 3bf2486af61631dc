"""A stand-in for mboxd's HTTP listener, for developing the web view before (or
without) a built mboxd: it serves web/ exactly as mboxd does (the static files at
/assets/, index.html for the page paths) and implements docs/http-api.md over
generated, in-memory data.

    python tests/python/web/mock_server.py --demo            # http://127.0.0.1:9185/
    python tests/python/web/mock_server.py --demo --token s3cret

Tests start it in-process (MockServer) with MBOX_WEB_MOCK=1 and create their data
through its mock-only ingest endpoints (POST /_mock/...), which stand in for gRPC.
"""

import argparse
import base64
import hashlib
import json
import math
import pathlib
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

WEB = pathlib.Path(__file__).resolve().parents[3] / "web"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._-]*$")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
PAGE_RE = re.compile(r"^/(|experiments/[^/]+/?|compare/?|health/?)$")


def now_ms() -> int:
    return int(time.time() * 1000)


class BadParameter(Exception):
    def __init__(self, parameter, message):
        super().__init__(message)
        self.parameter = parameter


class NotFound(Exception):
    pass


# --- Data -----------------------------------------------------------------------------


class Series:
    """One key's points, kept sorted by step (ingestion order among equal steps)."""

    def __init__(self):
        self.steps = np.zeros(0, np.int64)
        self.wallclocks = np.zeros(0, np.int64)
        self.values = np.zeros(0, np.float64)  # NaN: not numeric
        self.lock = threading.Lock()

    def append(self, steps, wallclocks, values):
        steps = np.asarray(steps, np.int64)
        wallclocks = np.asarray(wallclocks, np.int64)
        values = np.asarray([np.nan if v is None else v for v in values] if isinstance(values, list) else values, np.float64)
        with self.lock:
            if len(self.steps) and len(steps) and steps[0] < self.steps[-1] or not np.all(np.diff(steps) >= 0):
                s = np.concatenate([self.steps, steps])
                order = np.argsort(s, kind="stable")
                self.steps = s[order]
                self.wallclocks = np.concatenate([self.wallclocks, wallclocks])[order]
                self.values = np.concatenate([self.values, values])[order]
            else:
                self.steps = np.concatenate([self.steps, steps])
                self.wallclocks = np.concatenate([self.wallclocks, wallclocks])
                self.values = np.concatenate([self.values, values])

    def snapshot(self):
        with self.lock:
            return self.steps, self.wallclocks, self.values

    def summary(self):
        steps, _, values = self.snapshot()
        numeric = np.isfinite(values)
        if not numeric.any():
            return None
        v = values[numeric]
        s = steps[numeric]
        return {"last": float(v[-1]), "last_step": int(s[-1]), "min": float(v.min()), "max": float(v.max()), "count": int(len(v))}


def nan_to_none(arr):
    out = arr.tolist()
    if not np.isfinite(arr).all():
        out = [x if math.isfinite(x) else None for x in out]
    return out


def query_series(series, key, start, end, max_points):
    """docs/http-api.md: the step range, then buckets of ceil((hi - lo + 1) / max_points)
    steps from the first step in range, each answered by its last point plus min/max."""
    steps, wallclocks, values = series.snapshot()
    i0 = 0 if start is None else int(np.searchsorted(steps, start, "left"))
    i1 = len(steps) if end is None else int(np.searchsorted(steps, end, "right"))
    steps, wallclocks, values = steps[i0:i1], wallclocks[i0:i1], values[i0:i1]
    n = len(steps)
    if n <= max_points:
        return {"key": key, "bucketed": False, "total_points": n, "steps": steps.tolist(), "wallclocks": wallclocks.tolist(),
                "values": nan_to_none(values), "min": None, "max": None}
    lo, hi = int(steps[0]), int(steps[-1])
    width = -(-(hi - lo + 1) // max_points)
    bucket = (steps - lo) // width
    starts = np.concatenate([[0], np.flatnonzero(np.diff(bucket)) + 1])
    ends = np.concatenate([starts[1:] - 1, [n - 1]])
    with np.errstate(invalid="ignore"):
        mins = np.fmin.reduceat(values, starts)
        maxs = np.fmax.reduceat(values, starts)
    return {"key": key, "bucketed": True, "total_points": n, "steps": steps[ends].tolist(), "wallclocks": wallclocks[ends].tolist(),
            "values": nan_to_none(values[ends]), "min": nan_to_none(mins), "max": nan_to_none(maxs)}


class Store:
    def __init__(self):
        self.lock = threading.Lock()
        self.experiments = {}
        self.series = {}  # id -> {key: Series}
        self.events = {}  # id -> [event]
        self.recent = {}  # id -> deque[(time, points)]
        self.started = time.monotonic()
        self.counters = {"points_accepted_total": 0, "events_accepted_total": 0, "wal_appends_total": 0,
                         "files_published_total": 0, "published_bytes_total": 0}
        self.created_seq = 0

    def create_experiment(self, name, namespace="", owner="", external_id="", framework="UNKNOWN", task="", metadata=None):
        namespace = namespace or "default"
        if not NAMESPACE_RE.match(namespace):
            raise BadParameter("namespace", f"invalid namespace {namespace!r}")
        eid = hashlib.sha256("\0".join([namespace, name, owner, external_id]).encode()).hexdigest()[:32]
        with self.lock:
            if eid not in self.experiments:
                t = max(now_ms(), self.created_seq + 1)  # distinct, increasing creation times
                self.created_seq = t
                self.experiments[eid] = {"id": eid, "name": name, "namespace": namespace, "owner": owner,
                                         "framework": framework, "task": task, "external_id": external_id,
                                         "created_at": t, "updated_at": t, "metadata": dict(metadata or {})}
                self.series[eid] = {}
                self.events[eid] = []
                self.recent[eid] = deque()
        return eid

    def update_metadata(self, eid, metadata):
        with self.lock:
            e = self.get(eid)
            e["metadata"].update(metadata)
            e["updated_at"] = now_ms()

    def get(self, eid):
        e = self.experiments.get(eid)
        if e is None:
            raise NotFound(f"experiment {eid} not found")
        return e

    def log_metrics(self, eid, key, steps, values, wallclocks=None):
        self.get(eid)
        if wallclocks is None:
            wallclocks = [now_ms()] * len(steps)
        with self.lock:
            s = self.series[eid].setdefault(key, Series())
            self.recent[eid].append((time.monotonic(), len(steps)))
            self.counters["points_accepted_total"] += len(steps)
            self.counters["wal_appends_total"] += 1
        s.append(steps, wallclocks, values)

    def log_events(self, eid, events):
        self.get(eid)
        with self.lock:
            for ev in events:
                self.events[eid].append({"name": ev["name"], "source": ev.get("source", ""),
                                         "wallclock": int(ev.get("wallclock") or now_ms()), "metadata": ev.get("metadata") or {}})
            self.events[eid].sort(key=lambda e: e["wallclock"])
            self.counters["events_accepted_total"] += len(events)
            self.counters["wal_appends_total"] += 1

    def points_last_minute(self, eid):
        q = self.recent[eid]
        cutoff = time.monotonic() - 60
        while q and q[0][0] < cutoff:
            q.popleft()
        return sum(n for _, n in q)

    def summaries(self, eid):
        out = {}
        for k, s in sorted(self.series[eid].items()):
            sm = s.summary()
            if sm:
                out[k] = sm
        return out

    def record(self, eid, with_keys=False):
        e = dict(self.get(eid))
        e["metadata"] = dict(e["metadata"])
        e["summaries"] = self.summaries(eid)
        e["points_last_minute"] = self.points_last_minute(eid)
        if with_keys:
            e["keys"] = sorted(self.series[eid])
        return e


# --- The filter grammar (a mock of README "Run search") -------------------------------

COND_RE = re.compile(
    r'\s*(?P<field>[A-Za-z_][\w./\-]*)\s*(?P<op>~|!=|<=|>=|=|<|>)\s*'
    r'(?P<lit>"(?:[^"\\]|\\.)*"|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|true|false)\s*$'
)


def split_and(text):
    """Splits on the word `and` outside string literals."""
    parts, cur, i, in_str = [], [], 0, False
    while i < len(text):
        c = text[i]
        if in_str:
            cur.append(c)
            if c == "\\" and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            cur.append(c)
        elif re.match(r"\sand\s", text[i:i + 5], re.I):
            parts.append("".join(cur))
            cur = []
            i += 4
            continue
        else:
            cur.append(c)
        i += 1
    if in_str:
        raise BadParameter("filter", "unterminated string literal")
    parts.append("".join(cur))
    return parts


def parse_literal(lit):
    if lit.startswith('"'):
        return re.sub(r"\\(.)", r"\1", lit[1:-1])
    if lit in ("true", "false"):
        return lit == "true"
    return float(lit)


def parse_filter(text):
    conds = []
    if not text.strip():
        return conds
    for part in split_and(text):
        m = COND_RE.match(part)
        if not m:
            raise BadParameter("filter", f"cannot parse condition {part.strip()!r}: expected <field> <op> <value>")
        field, op, lit = m["field"], m["op"], parse_literal(m["lit"])
        if field.startswith("metrics."):
            rest = field[len("metrics."):]
            key, _, agg = rest.rpartition(".")
            if not key or agg not in ("last", "min", "max", "count"):
                raise BadParameter("filter", f"{field}: expected metrics.<key>.<last|min|max|count>")
        elif not field.startswith("params.") and field not in (
                "id", "name", "namespace", "owner", "framework", "task", "external_id", "created_at", "updated_at"):
            raise BadParameter("filter", f"unknown field {field!r}")
        if op == "~" and not isinstance(lit, str):
            raise BadParameter("filter", f"{field} ~ needs a string")
        conds.append((field, op, lit))
    return conds


def field_value(rec, field):
    if field.startswith("params."):
        return rec["metadata"].get(field[len("params."):])
    if field.startswith("metrics."):
        key, _, agg = field[len("metrics."):].rpartition(".")
        s = rec["summaries"].get(key)
        return s.get(agg) if s else None
    return rec.get(field)


def matches(rec, conds):
    for field, op, lit in conds:
        v = field_value(rec, field)
        if v is None:
            return False
        if op == "~":
            if not isinstance(v, str) or lit.lower() not in v.lower():
                return False
            continue
        if isinstance(lit, str) != isinstance(v, str) or isinstance(v, (dict, list)):
            return False
        if isinstance(v, bool) != isinstance(lit, bool):
            return False
        ok = {"=": v == lit, "!=": v != lit, "<": v < lit, "<=": v <= lit, ">": v > lit, ">=": v >= lit}[op]
        if not ok:
            return False
    return True


ORDER_RE = re.compile(r"^\s*(?P<field>[A-Za-z_][\w./\-]*)(?:\s+(?P<dir>ASC|DESC))?\s*$", re.I)


def parse_order(values):
    out = []
    for v in values or ["created_at DESC"]:
        m = ORDER_RE.match(v)
        if not m:
            raise BadParameter("order_by", f"cannot parse {v!r}: expected <field> [ASC|DESC]")
        field = m["field"]
        if not (field in ("created_at", "updated_at", "name", "namespace", "owner") or field.startswith("params.")
                or (field.startswith("metrics.") and field.rpartition(".")[2] in ("last", "min", "max", "count"))):
            raise BadParameter("order_by", f"cannot sort by {field!r}")
        out.append((field, (m["dir"] or "ASC").upper() == "DESC"))
    return out


# --- HTTP ------------------------------------------------------------------------------


def int_param(q, name, lo=None, hi=None, default=None):
    vals = q.get(name)
    if not vals:
        return default
    v = vals[-1]
    if not re.fullmatch(r"-?\d+", v):
        raise BadParameter(name, f"{name} must be an integer, got {v!r}")
    n = int(v)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise BadParameter(name, f"{name} must be in {rng}, got {n}")
    return n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mboxd-mock"

    def log_message(self, fmt, *args):  # quiet
        if self.server.verbose:
            super().log_message(fmt, *args)

    @property
    def store(self) -> Store:
        return self.server.store

    def send(self, status, body: bytes, content_type, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def json(self, status, obj, extra=None):
        self.send(status, json.dumps(obj, allow_nan=False).encode(), "application/json; charset=utf-8", extra)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        path = unquote(url.path)
        if self.server.delay_s and url.path.startswith("/api/"):
            time.sleep(self.server.delay_s)
        try:
            if url.path.startswith("/api/"):
                token = self.server.token
                if token and self.headers.get("Authorization") != f"Bearer {token}":
                    return self.json(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"})
                return self.api(url.path, parse_qs(url.query, keep_blank_values=True))
            if url.path.startswith("/assets/"):
                return self.static(path[len("/assets/"):])
            if PAGE_RE.match(url.path):
                return self.static("index.html")
            return self.send(404, b"not found\n", "text/plain; charset=utf-8")
        except BadParameter as e:
            return self.json(400, {"error": str(e), "parameter": e.parameter})
        except NotFound as e:
            return self.json(404, {"error": str(e)})

    def do_POST(self):
        url = urlsplit(self.path)
        if not url.path.startswith("/_mock/"):
            if url.path.startswith("/api/"):
                return self.json(405, {"error": "the API is read-only: GET only"}, {"Allow": "GET, HEAD"})
            return self.send(405, b"", "text/plain", {"Allow": "GET, HEAD"})
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        try:
            out = self.mock_ingest(url.path, body)
        except BadParameter as e:
            return self.json(400, {"error": str(e), "parameter": e.parameter})
        except NotFound as e:
            return self.json(404, {"error": str(e)})
        return self.json(200, out)

    do_PUT = do_DELETE = do_PATCH = do_POST

    def mock_ingest(self, path, b):
        s = self.store
        if path == "/_mock/experiments":
            return {"id": s.create_experiment(b["name"], b.get("namespace", ""), b.get("owner", ""), b.get("external_id", ""),
                                              b.get("framework", "UNKNOWN"), b.get("task", ""), b.get("metadata"))}
        if path == "/_mock/metrics":
            s.log_metrics(b["id"], b["key"], b["steps"], b["values"], b.get("wallclocks"))
            return {"points_accepted": len(b["steps"])}
        if path == "/_mock/events":
            s.log_events(b["id"], b["events"])
            return {"events_accepted": len(b["events"])}
        if path == "/_mock/metadata":
            s.update_metadata(b["id"], b["metadata"])
            return {}
        raise NotFound(f"no mock endpoint {path}")

    def static(self, rel):
        root = WEB.resolve()
        p = (root / rel).resolve()
        if root not in p.parents or not p.is_file():
            return self.send(404, b"not found\n", "text/plain; charset=utf-8")
        ctype = CONTENT_TYPES.get(p.suffix, "text/plain; charset=utf-8")
        self.send(200, p.read_bytes(), ctype)

    def api(self, path, q):
        s = self.store
        if path == "/api/v1/namespaces":
            with s.lock:
                return self.json(200, {"namespaces": sorted({e["namespace"] for e in s.experiments.values()})})
        if path == "/api/v1/experiments":
            return self.json(200, self.list_experiments(q))
        if path == "/api/v1/health":
            with s.lock:
                c = dict(s.counters)
                buffered = 0
            return self.json(200, {"version": "mock", "uptime_s": round(time.monotonic() - s.started, 3), **c, "points_rejected_total": 0,
                                   "buffered_bytes": buffered, "memory_budget_bytes": 268435456, "queue_depth": 0,
                                   "wal_bytes": 0, "spool_bytes": 0, "spool_files": 0, "summaries_pending_files": 0, "compactions_total": 0,
                                   "compacted_files_total": 0})
        m = re.fullmatch(r"/api/v1/experiments/([^/]+)(/events|/series)?", path)
        if not m:
            return self.json(404, {"error": f"no endpoint {path}"})
        eid = unquote(m[1])
        with s.lock:
            s.get(eid)
        if m[2] is None:
            with s.lock:
                return self.json(200, s.record(eid, with_keys=True))
        if m[2] == "/events":
            since = int_param(q, "since", lo=0)
            with s.lock:
                evs = [e for e in s.events[eid] if since is None or e["wallclock"] >= since]
            return self.json(200, {"events": evs})
        start = int_param(q, "start_step", lo=0)
        end = int_param(q, "end_step", lo=0)
        if start is not None and end is not None and end < start:
            raise BadParameter("end_step", f"end_step {end} is before start_step {start}")
        max_points = int_param(q, "max_points", lo=1, hi=100000, default=1000)
        keys = q.get("keys")
        for k in keys or []:
            if not k:
                raise BadParameter("keys", "keys must not be empty")
        with s.lock:
            series = dict(s.series[eid])
        wanted = sorted(series) if not keys else sorted(k for k in set(keys) if k in series)
        return self.json(200, {"series": [query_series(series[k], k, start, end, max_points) for k in wanted]})

    def list_experiments(self, q):
        s = self.store
        ns = (q.get("namespace") or [""])[-1]
        if not NAMESPACE_RE.match(ns):
            raise BadParameter("namespace", f"invalid namespace {ns!r}: letters, digits, '.', '_' and '-' only")
        conds = parse_filter((q.get("filter") or [""])[-1])
        order = parse_order(q.get("order_by"))
        page_size = int_param(q, "page_size", lo=1, hi=1000, default=100)
        token = (q.get("page_token") or [""])[-1]
        offset = 0
        if token:
            try:
                offset = int(base64.urlsafe_b64decode(token.encode()).decode().removeprefix("o:"))
            except Exception:
                raise BadParameter("page_token", "invalid page_token")
        with s.lock:
            recs = [s.record(eid) for eid, e in s.experiments.items() if not ns or e["namespace"] == ns]
        recs = [r for r in recs if matches(r, conds)]
        for field, desc in reversed(order):
            present = [r for r in recs if field_value(r, field) is not None]
            absent = [r for r in recs if field_value(r, field) is None]
            present.sort(key=lambda r: field_value(r, field), reverse=desc)
            recs = present + absent
        page = recs[offset:offset + page_size]
        nxt = ""
        if offset + page_size < len(recs):
            nxt = base64.urlsafe_b64encode(f"o:{offset + page_size}".encode()).decode()
        return {"experiments": page, "next_page_token": nxt}


class MockServer:
    """The mock on a loopback port, in a background thread."""

    def __init__(self, port=0, host="127.0.0.1", token=None, verbose=False, delay_s=0.0):
        self.store = Store()
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.store = self.store
        self.httpd.token = token
        self.httpd.verbose = verbose
        self.httpd.delay_s = delay_s
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# --- Demo data ---------------------------------------------------------------------------


def curve(n, seed, floor=0.1, scale=2.5, noise=0.05):
    rng = np.random.default_rng(seed)
    x = np.arange(n, dtype=np.float64)
    return floor + scale * np.exp(-x / (n / 5 + 1)) + noise * rng.standard_normal(n) * (1 + np.exp(-x / (n / 5 + 1)))


def seed_demo(store: Store, big_points=1_000_000):
    t0 = now_ms() - 3 * 3600_000
    runs = [
        ("resnet50-baseline", "cv", "ana@example.com", {"lr": 0.001, "batch_size": 256, "optimizer": "sgd", "model": {"depth": 50, "width": 64}}, 20000),
        ("resnet50-adamw", "cv", "ana@example.com", {"lr": 0.0003, "batch_size": 256, "optimizer": "adamw", "model": {"depth": 50, "width": 64}}, 20000),
        ("resnet101-adamw", "cv", "ben@example.com", {"lr": 0.0003, "batch_size": 128, "optimizer": "adamw", "model": {"depth": 101, "width": 64}}, 15000),
        ("vit-b16", "cv", "ben@example.com", {"lr": 0.0001, "batch_size": 512, "optimizer": "adamw", "patch": 16}, big_points),
        ("gpt-small", "nlp", "chen@example.com", {"lr": 0.0006, "batch_size": 64, "optimizer": "adamw", "warmup": 2000}, 50000),
        ("<img src=x onerror=alert(1)>", "default", "eve@example.com",
         {"note": "<script>alert(2)</script>", "html": '<b onmouseover="alert(3)">bold</b>'}, 300),
    ]
    keys = ["train/loss", "train/acc", "val/loss", "val/acc", "system/gpu_util", "system/mem_gb", "lr"]
    for ri, (name, ns, owner, meta, n) in enumerate(runs):
        eid = store.create_experiment(name, ns, owner, framework="PYTORCH", metadata=meta)
        steps = np.arange(n, dtype=np.int64)
        wall = t0 + ri * 60_000 + steps * (3_600_000 // max(n, 1) + 1)
        loss = curve(n, ri, floor=0.15 + 0.05 * ri)
        for k in keys:
            if k.startswith("val/"):
                st = steps[::100]
                v = (loss[::100] * 1.1) if k.endswith("loss") else 1 - loss[::100] / 3
                store.log_metrics(eid, k, st, v, wall[::100])
            elif k == "train/loss":
                store.log_metrics(eid, k, steps, loss, wall)
            elif k == "train/acc":
                store.log_metrics(eid, k, steps, np.clip(1 - loss / 3, 0, 1), wall)
            elif k == "lr":
                store.log_metrics(eid, k, steps, meta.get("lr", 0.001) * np.minimum(1, steps / (n / 10 + 1)), wall)
            else:
                st = steps[::50]
                rng = np.random.default_rng(ri * 7 + len(k))
                base = 80 if "gpu" in k else 30
                store.log_metrics(eid, k, st, base + 5 * rng.standard_normal(len(st)), wall[::50])
        store.log_events(eid, [{"name": "checkpoint", "source": "trainer", "wallclock": int(wall[i]), "metadata": {"step": int(i)}}
                               for i in range(n // 4, n, n // 4)])
        store.log_events(eid, [{"name": "eval <started>", "source": "evaluator", "wallclock": int(wall[n // 2]), "metadata": {"html": "<i>x</i>"}}])
    live = store.create_experiment("gpt-small-live", "nlp", "chen@example.com", framework="PYTORCH",
                                   metadata={"lr": 0.0006, "batch_size": 64, "optimizer": "adamw", "warmup": 500})
    store.log_events(live, [{"name": "started", "source": "trainer", "wallclock": now_ms()}])

    def trainer():
        step = 0
        while True:
            steps = np.arange(step, step + 20)
            wall = np.full(20, now_ms())
            loss = 0.3 + 2.5 * np.exp(-steps / 3000) + 0.05 * np.random.standard_normal(20)
            store.log_metrics(live, "train/loss", steps, loss, wall)
            store.log_metrics(live, "train/acc", steps, np.clip(1 - loss / 3, 0, 1), wall)
            store.log_metrics(live, "system/gpu_util", steps, 85 + 5 * np.random.standard_normal(20), wall)
            if step % 200 == 0:
                store.log_metrics(live, "val/loss", [step], [float(loss[-1]) * 1.1], [int(wall[-1])])
            if step and step % 1000 == 0:
                store.log_events(live, [{"name": "checkpoint", "source": "trainer", "wallclock": now_ms(), "metadata": {"step": step}}])
            step += 20
            time.sleep(0.5)

    threading.Thread(target=trainer, daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9185)
    ap.add_argument("--demo", action="store_true", help="generate demo experiments (one of 1M points per key, one live)")
    ap.add_argument("--big-points", type=int, default=1_000_000)
    ap.add_argument("--token", help="require this bearer token on /api/")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    server = MockServer(args.port, args.host, token=args.token, verbose=args.verbose)
    if args.demo:
        seed_demo(server.store, args.big_points)
    print(f"mock mboxd web view on {server.base_url}/", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
