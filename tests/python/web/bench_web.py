"""Benchmark of the web view (not part of the test suite).

Fills mboxd with RUNS runs x KEYS keys x POINTS points per series (default
20 x 20 x 1,000,000 = 400M points), generated with numpy in several processes and
sent as raw columnar LogMetrics batches (the protobuf bytes are built directly from
numpy arrays), then measures in headless Chromium how long pages take until every
chart is drawn (the page's `window.__mboxReadyAt`, a performance.now() reading, so
from navigation start):

- a run's page (KEYS charts): target < 1 s
- the compare page of 5 runs (KEYS charts x 5 lines): target < 2 s

    # start a daemon of its own (MBOXD_BIN or target/debug/mboxd; use a release build
    # for real numbers) with its data in --data-dir, kept for --skip-ingest reruns:
    python tests/python/web/bench_web.py --start --data-dir /var/tmp/mbox-bench
    # or an mboxd already running:
    python tests/python/web/bench_web.py --grpc 127.0.0.1:8085 --http http://127.0.0.1:9185
    # measure again without ingesting:
    python tests/python/web/bench_web.py --start --data-dir /var/tmp/mbox-bench --skip-ingest
    # against the Python mock (small data only: it keeps points in memory):
    python tests/python/web/bench_web.py --mock --points 100000

Exits 1 when a target is missed.
"""

import argparse
import multiprocessing as mp
import os
import pathlib
import statistics
import sys
import time
import urllib.parse

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

NAMESPACE = "bench"
BLOCK = 100_000  # points per block: about 1.9 MB per request
T0 = 1_760_000_000_000  # wallclock of step 0, ms


def key_names(n):
    groups = ["train", "val", "system", "grad"]
    return [f"{groups[i % len(groups)]}/metric_{i:02d}" for i in range(n)]


# --- Protobuf wire encoding from numpy --------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def varints(a: np.ndarray) -> bytes:
    """Packed varint encoding of a uint64 array."""
    a = a.astype(np.uint64)
    nbytes = np.ones(len(a), np.int64)
    for k in range(1, 10):
        nbytes += (a >> np.uint64(7 * k)) > 0
    cols = np.arange(10)
    shifted = (a[:, None] >> (np.uint64(7) * cols.astype(np.uint64))[None, :]) & np.uint64(0x7F)
    cont = (cols[None, :] < (nbytes[:, None] - 1)).astype(np.uint64) << np.uint64(7)
    grid = (shifted | cont).astype(np.uint8)
    return grid[cols[None, :] < nbytes[:, None]].tobytes()


def field(num: int, payload: bytes) -> bytes:
    return varint((num << 3) | 2) + varint(len(payload)) + payload


def metrics_request(eid: str, key: str, steps: np.ndarray, wallclocks: np.ndarray, values: np.ndarray, batch_id: str) -> bytes:
    """A serialized LogMetricsRequest with one MetricsBlock (proto/modelbox.proto)."""
    block = b"".join([
        field(1, eid.encode()),
        field(2, key.encode()),
        field(3, b"\x00" * len(steps)),  # key_index: all 0
        field(4, varints(steps)),
        field(5, varints(wallclocks)),
        field(6, values.astype("<f8").tobytes()),
    ])
    return field(10, block) + field(11, batch_id.encode())


# --- Ingest ------------------------------------------------------------------------------


def ingest_worker(args):
    grpc_addr, jobs, points, seed = args
    import grpc
    from mbox._proto import modelbox as pb2

    channel = grpc.insecure_channel(grpc_addr, options=[("grpc.max_send_message_length", 64 << 20)])
    call = channel.unary_unary("/modelbox.ModelStore/LogMetrics", request_serializer=lambda b: b,
                               response_deserializer=pb2.LogMetricsResponse.FromString)
    rng = np.random.default_rng(seed)
    sent = 0
    for eid, ri, key in jobs:
        level = 1.0 + rng.random()
        for lo in range(0, points, BLOCK):
            hi = min(points, lo + BLOCK)
            steps = np.arange(lo, hi, dtype=np.uint64)
            wall = T0 + ri * 3_600_000 + steps * np.uint64(10)
            x = steps.astype(np.float64)
            values = level * np.exp(-x / (points / 4)) + 0.05 * rng.standard_normal(hi - lo)
            req = metrics_request(eid, key, steps, wall, values, f"bench-{eid}-{key}-{lo}")
            for attempt in range(100):
                try:
                    resp = call(req, timeout=120)
                    assert resp.points_accepted == hi - lo or resp.duplicate, resp
                    break
                except grpc.RpcError as e:
                    if e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED) and attempt < 99:
                        time.sleep(0.2)
                        continue
                    raise
            sent += hi - lo
    channel.close()
    return sent


def create_runs(grpc_addr, runs):
    import grpc
    from mbox._proto import modelbox as pb2
    from mbox.client import to_value_proto

    stub = pb2.ModelStoreStub(grpc.insecure_channel(grpc_addr))
    ids = []
    for i in range(runs):
        req = pb2.CreateExperimentRequest(name=f"bench-run-{i:02d}", namespace=NAMESPACE, owner="bench@example.com",
                                          framework=pb2.MLFramework.Value("PYTORCH"))
        for k, v in {"lr": 0.0001 * (1 + i % 5), "batch_size": 64 * (1 + i % 3), "seed": i}.items():
            req.metadata.metadata[k].CopyFrom(to_value_proto(v))
        ids.append(stub.CreateExperiment(req).experiment_id)
    return ids


def ingest(grpc_addr, ids, keys, points, procs):
    jobs = [(eid, ri, k) for ri, eid in enumerate(ids) for k in keys]
    shares = [jobs[i::procs] for i in range(procs)]
    total = len(jobs) * points
    print(f"ingesting {len(ids)} runs x {len(keys)} keys x {points:,} points = {total:,} points with {procs} processes", flush=True)
    t = time.monotonic()
    with mp.get_context("spawn").Pool(procs) as pool:
        sent = sum(pool.map(ingest_worker, [(grpc_addr, s, points, i) for i, s in enumerate(shares) if s]))
    dt = time.monotonic() - t
    print(f"ingested {sent:,} points in {dt:.1f} s ({sent / dt / 1e6:.2f} M points/s)", flush=True)


def ingest_mock(store, keys, runs, points):
    ids = []
    rng = np.random.default_rng(0)
    for i in range(runs):
        eid = store.create_experiment(f"bench-run-{i:02d}", NAMESPACE, "bench@example.com", framework="PYTORCH",
                                      metadata={"lr": 0.0001 * (1 + i % 5), "batch_size": 64 * (1 + i % 3), "seed": i})
        steps = np.arange(points, dtype=np.int64)
        for k in keys:
            store.log_metrics(eid, k, steps, np.exp(-steps / (points / 4)) + 0.05 * rng.standard_normal(points),
                              T0 + i * 3_600_000 + steps * 10)
        ids.append(eid)
    return ids


# --- Measuring ---------------------------------------------------------------------------


def measure(base_url, run_ids, keys, repeats, width):
    from playwright.sync_api import sync_playwright

    from webtest import CHROMIUM, CHROMIUM_ARGS

    pages = [("run page", lambda i: f"/experiments/{run_ids[i % len(run_ids)]}", len(keys), 1.0),
             ("compare 5 runs", lambda i: "/compare?ids=" + ",".join(run_ids[(i + j) % len(run_ids)] for j in range(5)), len(keys), 2.0)]
    results = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for name, path_of, n_charts, target in pages:
            times = []
            for i in range(repeats + 1):  # the first load warms caches and is not counted
                context = browser.new_context(viewport={"width": width, "height": 1000})
                page = context.new_page()
                page.goto(base_url + path_of(i))
                page.wait_for_selector("html[data-ready]", timeout=120_000)
                state = page.evaluate("document.documentElement.dataset.ready")
                if state != "true":
                    raise SystemExit(f"{name}: the page failed: {page.inner_text('main')[:300]}")
                ready = page.evaluate("window.__mboxReadyAt")
                charts = page.evaluate("document.querySelectorAll('.chart-card[data-key]').length")
                assert charts == n_charts, (name, charts)
                if i:
                    times.append(ready / 1000)
                else:
                    info = page.evaluate(
                        "[...document.querySelectorAll('.chart-card')].slice(0, 1).map(c => ({...c.dataset}))")
                    print(f"{name}: first chart {info}", flush=True)
                context.close()
            results[name] = (times, target)
        browser.close()
    ok = True
    print(f"\n{'page':<16} {'median':>8} {'min':>8} {'max':>8} {'target':>8}")
    for name, (times, target) in results.items():
        med = statistics.median(times)
        ok &= med < target
        print(f"{name:<16} {med:8.3f} {min(times):8.3f} {max(times):8.3f} {target:8.1f}  {'ok' if med < target else 'MISSED'}")
    return ok


def find_runs(base_url):
    import json
    import urllib.request

    url = base_url + "/api/v1/experiments?" + urllib.parse.urlencode({"namespace": NAMESPACE, "page_size": 1000, "order_by": "created_at ASC"})
    with urllib.request.urlopen(url, timeout=30) as r:
        return [e["id"] for e in json.load(r)["experiments"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--keys", type=int, default=20)
    ap.add_argument("--points", type=int, default=1_000_000, help="points per series")
    ap.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="ingest processes")
    ap.add_argument("--repeats", type=int, default=5, help="measured loads per page")
    ap.add_argument("--width", type=int, default=1600, help="browser viewport width")
    ap.add_argument("--start", action="store_true", help="start mboxd (MBOXD_BIN) on --data-dir")
    ap.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("/var/tmp/mbox-bench"))
    ap.add_argument("--mboxd-arg", action="append", default=[], help="extra mboxd argument (repeatable)")
    ap.add_argument("--grpc", help="gRPC address of a running mboxd")
    ap.add_argument("--http", help="HTTP base URL of a running mboxd")
    ap.add_argument("--mock", action="store_true", help="the Python mock instead of mboxd")
    ap.add_argument("--skip-ingest", action="store_true", help="measure the bench runs already stored")
    args = ap.parse_args()
    keys = key_names(args.keys)
    server = None
    if args.mock:
        from mock_server import MockServer

        server = MockServer().start()
        base_url = server.base_url
        print(f"generating {args.runs * args.keys * args.points:,} points into the mock", flush=True)
        ids = ingest_mock(server.store, keys, args.runs, args.points)
    else:
        if args.start:
            from harness import Mboxd, free_port

            args.data_dir.mkdir(parents=True, exist_ok=True)
            server = Mboxd(args.data_dir / "data", args.mboxd_arg, metrics_listen=f"127.0.0.1:{free_port()}")
            grpc_addr, base_url = server.addr, server.http_url
        else:
            if not (args.grpc and args.http):
                ap.error("give --start, --mock, or both --grpc and --http")
            grpc_addr, base_url = args.grpc, args.http.rstrip("/")
        if args.skip_ingest:
            ids = find_runs(base_url)
            if len(ids) < 5:
                raise SystemExit(f"found {len(ids)} runs in namespace {NAMESPACE!r}: ingest first")
        else:
            ids = create_runs(grpc_addr, args.runs)
            ingest(grpc_addr, ids, keys, args.points, args.procs)
    try:
        ok = measure(base_url, ids, keys, args.repeats, args.width)
    finally:
        if server is not None:
            server.stop()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
