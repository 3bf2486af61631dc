"""Exactly-once delivery: every SDK batch carries a client batch id, and mboxd
acknowledges a retried id again without storing it twice, durably (across a
SIGKILL). The proxy test loses responses on purpose: it cuts the connection after
mboxd answered (so after the batch reached its write-ahead log) and before the SDK
read the answer, which is exactly the failure a retry cannot tell from a lost request.

Needs an mboxd that deduplicates client_batch_id (against one that does not, the
proxy test finds the duplicates and fails)."""

import socket
import threading
import time

import duckdb
import grpc

import mbox
from harness import Mboxd, free_port
from mbox import Event
from mbox._proto import modelbox as pb

HEADERS, END_STREAM = 0x1, 0x1
ARGS = ["--durability", "wal-fsync", "--roll-max-age-ms", "200"]


class CuttingProxy:
    """Forwards TCP from the SDK to mboxd. It reads mboxd's HTTP/2 frames: each
    stream's first HEADERS frame without END_STREAM is a successful gRPC response
    starting (tonic sends it once the handler has returned, i.e. once the batch is
    acknowledged). When `cut(n)` is true for the n-th such response, the proxy drops
    it and closes both connections: the SDK sees UNAVAILABLE and retries. With
    `refuse_after_cut`, it then refuses connections until `refusing` is cleared."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.cut = None
        self.refuse_after_cut = False
        self.refusing = False
        self.responses = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self._listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:  # mboxd is down: so is the connection
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._responses, args=(client, upstream), daemon=True).start()

    def _requests(self, client, upstream):
        try:
            while True:
                data = client.recv(1 << 16)
                if not data:
                    break
                upstream.sendall(data)
        except OSError:
            pass
        _close(client, upstream)

    def _responses(self, client, upstream):
        buf = b""
        answered = set()
        try:
            while True:
                data = upstream.recv(1 << 16)
                if not data:
                    break
                buf += data
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    frame, buf = buf[:9 + length], buf[9 + length:]
                    kind, flags = frame[3], frame[4]
                    stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if kind == HEADERS and stream and stream not in answered:
                        answered.add(stream)
                        if not flags & END_STREAM and self._should_cut():
                            _close(client, upstream)
                            return
                    client.sendall(frame)
        except OSError:
            pass
        _close(client, upstream)

    def _should_cut(self):
        with self._lock:
            self.responses += 1
            if self.cut is None or not self.cut(self.responses):
                return False
            self.cuts += 1
            if self.refuse_after_cut:
                self.refusing = True
            return True


def _close(*sockets):
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


KEYS = ["loss", "acc", "lr", "grad_norm"]
STEPS = 10  # per batch


def log_batch(exp, b):
    for step in range(b * STEPS, (b + 1) * STEPS):
        exp.log_metrics({k: step + i / 10 for i, k in enumerate(KEYS)}, step=step)
    exp.log_event(Event(name=f"batch-{b}"))


def stored_metrics(data_dir, experiment_id):
    """(key, step) -> rows in the Parquet files."""
    rows = duckdb.connect().execute(
        f"SELECT key, step, count(*) FROM read_parquet('{data_dir}/metrics/**/*.parquet', hive_partitioning = true)"
        " WHERE experiment_id = ? GROUP BY ALL", [experiment_id]).fetchall()
    return {(k, s): n for k, s, n in rows}


def stored_events(data_dir, experiment_id):
    """name -> rows in the Parquet files."""
    return dict(duckdb.connect().execute(
        f"SELECT name, count(*) FROM read_parquet('{data_dir}/events/**/*.parquet', hive_partitioning = true)"
        " WHERE experiment_id = ? GROUP BY ALL", [experiment_id]).fetchall())


def test_lost_responses_and_crashes_store_every_point_exactly_once(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    server = Mboxd(data, ARGS, listen=f"127.0.0.1:{port}")
    proxy = CuttingProxy(port)
    client = mbox.Client(f"127.0.0.1:{proxy.port}", request_timeout_s=10)
    exp = client.new_experiment(name="exactly-once", namespace="t")
    every_fourth = lambda n: n % 4 == 1  # noqa: E731 - the 1st, 5th, 9th... response is lost (both RPCs)
    proxy.cut = every_fourth
    try:
        for b in range(25):
            log_batch(exp, b)
            client.flush(timeout=60)
        assert proxy.cuts >= 10

        # A crash with a batch on its way: killed, restarted on the same data (the WAL
        # replays), the batch retried.
        log_batch(exp, 25)
        time.sleep(0.02)
        server.kill()
        server = Mboxd(data, ARGS, listen=f"127.0.0.1:{port}")
        client.flush(timeout=60)

        # The hard case: a response lost, then mboxd killed before the retry arrives.
        # Only what mboxd made durable tells the restarted process it has the batch.
        proxy.cut, proxy.refuse_after_cut = (lambda n: True), True
        cuts = proxy.cuts
        log_batch(exp, 26)
        wait_for(lambda: proxy.cuts > cuts)
        server.kill()
        server = Mboxd(data, ARGS, listen=f"127.0.0.1:{port}")
        proxy.cut, proxy.refuse_after_cut, proxy.refusing = every_fourth, False, False
        client.flush(timeout=60)

        for b in range(27, 50):
            log_batch(exp, b)
            client.flush(timeout=60)
        client.close(timeout=30)
    finally:
        proxy.close()
        assert server.stop() == 0

    metrics, events = stored_metrics(data, exp.id), stored_events(data, exp.id)
    expected = {(k, s) for s in range(50 * STEPS) for k in KEYS}
    duplicated = sorted((k, s, n) for (k, s), n in metrics.items() if n > 1)
    assert not duplicated, f"{len(duplicated)} points stored more than once, e.g. {duplicated[:5]}"
    assert set(metrics) == expected, (f"missing {sorted(expected - set(metrics))[:5]}, "
                                      f"unexpected {sorted(set(metrics) - expected)[:5]}")
    assert sum(metrics.values()) == 50 * STEPS * len(KEYS)
    assert events == {f"batch-{b}": 1 for b in range(50)}
    # Every lost response was of a stored batch, so each cut made a duplicate retry.
    assert client.duplicates >= proxy.cuts, (client.duplicates, proxy.cuts)


def test_a_retried_batch_id_is_acknowledged_as_a_duplicate_across_a_crash(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    server = Mboxd(data, ARGS, listen=f"127.0.0.1:{port}")
    stub = pb.ModelStoreStub(server.channel)
    exp = stub.CreateExperiment(pb.CreateExperimentRequest(name="dedupe", namespace="t")).experiment_id

    def metrics(batch_id, step):
        return pb.LogMetricsRequest(client_batch_id=batch_id, blocks=[pb.MetricsBlock(
            parent_id=exp, keys=["loss"], key_index=[0, 0], steps=[step, step + 1], wallclock_times=[1, 2],
            values=[0.5, 0.25])])

    def event(batch_id, name):
        return pb.LogEventRequest(client_batch_id=batch_id, parent_id=exp, events=[pb.Event(name=name)])

    first = stub.LogMetrics(metrics("a" * 32, 0))
    assert (first.points_accepted, first.duplicate) == (2, False)
    again = stub.LogMetrics(metrics("a" * 32, 0))
    assert again.duplicate
    assert not stub.LogEvent(event("e" * 32, "once")).duplicate
    assert stub.LogEvent(event("e" * 32, "once")).duplicate
    # No id: ModelBox's behaviour, every request stored.
    stub.LogMetrics(metrics("", 10))
    stub.LogMetrics(metrics("", 10))

    server.kill()
    server = Mboxd(data, ARGS, listen=f"127.0.0.1:{port}")
    stub = pb.ModelStoreStub(server.channel)
    assert stub.LogMetrics(metrics("a" * 32, 0)).duplicate, "the id was forgotten in the crash"
    assert stub.LogEvent(event("e" * 32, "once")).duplicate
    assert not stub.LogMetrics(metrics("b" * 32, 20)).duplicate
    assert server.stop() == 0

    assert stored_metrics(data, exp) == {("loss", 0): 1, ("loss", 1): 1, ("loss", 10): 2, ("loss", 11): 2,
                              ("loss", 20): 1, ("loss", 21): 1}
    assert stored_events(data, exp) == {"once": 1}


def test_the_proxy_loses_responses_only_where_told(tmp_path):
    # The proxy itself: with nothing to cut, it passes every RPC through.
    server = Mboxd(tmp_path / "data", ARGS)
    proxy = CuttingProxy(server.port)
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
        stub = pb.ModelStoreStub(channel)
        exp = stub.CreateExperiment(pb.CreateExperimentRequest(name="p", namespace="t")).experiment_id
        proxy.cut = lambda n: n == 3
        stub.LogEvent(pb.LogEventRequest(parent_id=exp, event=pb.Event(name="two")))
        try:
            stub.LogEvent(pb.LogEventRequest(parent_id=exp, event=pb.Event(name="three")))
            raise AssertionError("the third response was not cut")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    # A new channel, so a new connection: an old one may not yet have seen the cut and
    # would send the next call into the closed socket (grpcio 1.84 does, now and then).
    # Its own subchannel pool, or grpcio hands it the old connection again (1.85 did).
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}",
                               options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        pb.ModelStoreStub(channel).LogEvent(pb.LogEventRequest(parent_id=exp, event=pb.Event(name="four")))
    proxy.close()
    assert (proxy.responses, proxy.cuts) == (4, 1)
    assert server.stop() == 0
    # The cut response's request did reach mboxd: the response was lost after it was stored.
    assert stored_events(tmp_path / "data", exp) == {"two": 1, "three": 1, "four": 1}
