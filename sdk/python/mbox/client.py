"""The client: synchronous calls for experiments and metadata, and a background sender
that batches metrics and events into mboxd's columnar requests."""

import atexit
import collections
import datetime
import json
import logging
import os
import random
import threading
import time
import uuid
import weakref
from typing import Dict, Iterable, List, Optional, Union

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from ._proto import modelbox as pb
from ._types import Event, MLFramework

log = logging.getLogger("mbox")

DEFAULT_ADDR = "localhost:8085"
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
# Keep one request comfortably under mboxd's default 4 MiB message limit: at most
_MAX_POINTS_PER_REQUEST = 100_000  # points (about 2.4 MB),
# and about this many bytes of string and bytes values.
_MAX_TEXT_BYTES_PER_REQUEST = 1 << 20


class DeliveryError(RuntimeError):
    """Some logged data was rejected by mboxd (not retryable) and is lost."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_value_proto(value) -> struct_pb2.Value:
    """A Python value (dicts, lists, numbers, numpy scalars...) as a protobuf Value."""

    def default(o):
        for attr in ("item", "tolist"):
            if hasattr(o, attr):
                return getattr(o, attr)()
        return str(o)

    return json_format.ParseDict(json.loads(json.dumps(value, default=default)), struct_pb2.Value())


def from_value_proto(value: struct_pb2.Value):
    return json_format.MessageToDict(value)


def timestamp_of_ms(ms) -> timestamp_pb2.Timestamp:
    if isinstance(ms, datetime.datetime):
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(ms if ms.tzinfo else ms.replace(tzinfo=datetime.timezone.utc))
        return ts
    if isinstance(ms, int):
        # Exact: a float holds milliseconds since the epoch times 10^6 only roughly.
        return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)
    total_ns = int(round(float(ms) * 1_000_000))
    return timestamp_pb2.Timestamp(seconds=total_ns // 1_000_000_000, nanos=total_ns % 1_000_000_000)


def to_metric_value(v):
    """float for numbers (numpy scalars and 0-d tensors included), or str / bytes."""
    t = type(v)
    if t is float or t is int:
        return float(v)
    if t is str or t is bytes:
        return v
    if isinstance(v, (bool, int, float)):
        return float(v)
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    item = getattr(v, "item", None)
    if item is not None:  # numpy scalar, 0-d array, 0-d torch tensor
        return to_metric_value(item())
    raise TypeError(f"metric values must be numbers, str or bytes, not {t.__name__}")


class TLS:
    """TLS for a connection to mboxd (``Client(tls=...)``).

    ca: the CA certificate(s) to trust, as a PEM file path or PEM bytes (default:
        the system's roots). cert, key: a client certificate and its key, path or
        PEM bytes, for mboxd with mutual TLS. server_name: the name to check the
        server's certificate for, when it differs from the host in addr.
    """

    def __init__(self, ca=None, cert=None, key=None, server_name: Optional[str] = None):
        if (cert is None) != (key is None):
            raise ValueError("TLS: give cert and key together")
        self.ca, self.cert, self.key, self.server_name = ca, cert, key, server_name

    @classmethod
    def from_env(cls) -> Optional["TLS"]:
        """TLS from MBOX_TLS_CA (a CA file; MBOX_TLS_CERT and MBOX_TLS_KEY for a
        client certificate), or MBOX_TLS=1 for the system's roots; None if unset."""
        ca = os.environ.get("MBOX_TLS_CA") or None
        cert = os.environ.get("MBOX_TLS_CERT") or None
        key = os.environ.get("MBOX_TLS_KEY") or None
        on = os.environ.get("MBOX_TLS", "").strip().lower() in ("1", "true", "yes")
        if ca or cert or key or on:
            return cls(ca=ca, cert=cert, key=key, server_name=os.environ.get("MBOX_TLS_SERVER_NAME") or None)
        return None

    @staticmethod
    def _pem(value) -> Optional[bytes]:
        if value is None or isinstance(value, bytes):
            return value
        with open(os.fspath(value), "rb") as f:
            return f.read()

    def credentials(self):
        return grpc.ssl_channel_credentials(root_certificates=self._pem(self.ca), private_key=self._pem(self.key),
                                            certificate_chain=self._pem(self.cert))

    def __repr__(self):
        return f"TLS(ca={self.ca!r}, cert={self.cert!r}, server_name={self.server_name!r})"


def _tls_of(tls) -> Optional[TLS]:
    """Client(tls=...): None (from the environment), False, True (system roots), a
    CA path or PEM bytes, or a TLS."""
    if tls is None:
        return TLS.from_env()
    if tls is False:
        return None
    if tls is True:
        return TLS()
    if isinstance(tls, TLS):
        return tls
    if isinstance(tls, (str, bytes, os.PathLike)):
        return TLS(ca=tls)
    raise TypeError(f"tls must be None, a bool, a CA path or PEM bytes, or mbox.TLS, not {type(tls).__name__}")


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call. Metadata rather than call
    credentials: those need TLS, and a token also serves over the loopback."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d):
        metadata = list(d.metadata or ()) + [self._header]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def _is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]") if ":" in addr else addr
    host = host.split("://")[-1]
    return host in ("localhost", "::1") or host.startswith("127.")


_clients = weakref.WeakSet()
_inherited: list = []


def _after_fork_in_child():
    # A forked child (a DataLoader worker, say) must not share the parent's sender
    # thread, lock or gRPC channel: each client starts afresh, empty.
    for c in list(_clients):
        c._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """A connection to mboxd.

    addr: host:port (default: $MBOX_ADDR, else localhost:8085).
    token: the bearer token mboxd asks for when its [auth] is on (default:
        $MBOX_TOKEN); sent as ``authorization: Bearer <token>`` on every call.
    tls: None (default: TLS if $MBOX_TLS_CA, $MBOX_TLS or a client certificate in
        $MBOX_TLS_CERT/$MBOX_TLS_KEY is set, else plain text), False, True (the
        system's roots), a CA file path or PEM bytes, or ``mbox.TLS(ca, cert, key,
        server_name)``.
    buffer_points: bound on points (and events) waiting to be sent.
    on_full: "block" (default) waits for room when the buffer is full; "drop" drops
        the new points, counts them in ``dropped`` and logs a warning.
    batch_points / linger_s: the sender sends once this many points wait, or once
        the oldest has waited this long.
    """

    def __init__(self, addr: Optional[str] = None, *, token: Optional[str] = None, tls=None,
                 buffer_points: int = 1_000_000, on_full: str = "block",
                 batch_points: int = 50_000, linger_s: float = 0.05, request_timeout_s: float = 30.0,
                 flush_at_exit_s: float = 30.0):
        if on_full not in ("block", "drop"):
            raise ValueError("on_full must be 'block' or 'drop'")
        self.addr = addr or os.environ.get("MBOX_ADDR", DEFAULT_ADDR)
        self._token = (token if token is not None else os.environ.get("MBOX_TOKEN", "")).strip() or None
        self.tls = _tls_of(tls)
        if self._token and self.tls is None and not _is_loopback(self.addr):
            log.warning("mbox: sending a token to %s without TLS; set tls= or MBOX_TLS_CA", self.addr)
        self.buffer_points = buffer_points
        self.on_full = on_full
        self.batch_points = batch_points
        self.linger_s = linger_s
        self.request_timeout_s = request_timeout_s
        self.flush_at_exit_s = flush_at_exit_s
        self.dropped = 0
        #: Batches mboxd recognised as retries of batches it already had (a response
        #: lost after mboxd stored the batch): acknowledged, not written twice.
        self.duplicates = 0
        self._init_state()
        _clients.add(self)
        atexit.register(self._at_exit)

    # -- state -------------------------------------------------------------------

    def _init_state(self):
        self._cond = threading.Condition(threading.Lock())
        self._pending: List[tuple] = []
        self._pending_points = 0
        self._first_pending_at = 0.0
        self._enqueued = 0  # points ever enqueued
        self._done = 0  # points sent (acknowledged, or rejected for good)
        self._errors: List[str] = []
        self._flush_wanted = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._channel = None
        self._stub = None
        self._last_drop_warning = 0.0
        #: The channel's last grpc.ChannelConnectivity, as gRPC reported it.
        self.connectivity = None

    def _reset_after_fork(self):
        # The parent's channel must not be destroyed here: its destructor would run
        # on gRPC state that is not valid in the child. Keep it, unused, forever.
        _inherited.append((self._channel, self._stub))
        self._init_state()

    @property
    def stub(self) -> pb.ModelStoreStub:
        if self._stub is None:
            options = [
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", -1),
                # Reconnect quickly once mboxd is back, rather than after minutes.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if self.tls is None:
                self._channel = grpc.insecure_channel(self.addr, options=options)
            else:
                if self.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                self._channel = grpc.secure_channel(self.addr, self.tls.credentials(), options=options)
            # Watching the connectivity state keeps a thread polling the channel
            # while no call is active. Without it some grpcio releases (1.70, and
            # 1.56 for seconds) leave an idle connection unread, so they never answer
            # the PING of mboxd's graceful shutdown (GOAWAY, then PING) and mboxd's
            # stop waits on that connection: it hung for good with 1.70.
            self._channel.subscribe(self._on_connectivity, try_to_connect=False)
            channel = self._channel
            if self._token:
                channel = grpc.intercept_channel(channel, _Bearer(self._token))
            self._stub = pb.ModelStoreStub(channel)
        return self._stub

    def _on_connectivity(self, state):
        self.connectivity = state
        log.debug("mbox: connection to %s is %s", self.addr, state)

    # -- synchronous API ---------------------------------------------------------

    def new_experiment(self, name, owner="", namespace="", external_id="", framework=MLFramework.UNKNOWN,
                       task="", metadata=None):
        from .experiment import Experiment

        md = pb.Metadata(metadata={k: to_value_proto(v) for k, v in (metadata or {}).items()})
        resp = self.stub.CreateExperiment(pb.CreateExperimentRequest(
            name=name, owner=owner, namespace=namespace, external_id=external_id or "",
            framework=int(framework), task=task, metadata=md), timeout=self.request_timeout_s)
        return Experiment(self, resp.experiment_id, name=name, owner=owner, namespace=namespace or "default",
                          external_id=external_id or "", framework=MLFramework(int(framework)),
                          created_at=resp.created_at.ToDatetime(datetime.timezone.utc),
                          exists=resp.experiment_exists)

    def experiment(self, id: str):
        from .experiment import Experiment

        e = self.stub.GetExperiment(pb.GetExperimentRequest(id=id), timeout=self.request_timeout_s).experiment
        return Experiment.from_proto(self, e)

    def experiments(self, namespace: str = ""):
        """Every experiment of a namespace, as a list (all pages)."""
        from .experiment import Experiment

        req = pb.ListExperimentsRequest(namespace=namespace)
        return [Experiment.from_proto(self, e) for e in self._list_experiments(req)]

    def search(self, namespace: str = "", filter: str = "", order_by: Union[str, Iterable[str], None] = None,
               limit: Optional[int] = None, page_size: Optional[int] = None):
        """Experiments matching `filter` (mboxd's run-search grammar, e.g.
        ``'params.lr = 0.0003 and metrics.val/loss.last < 0.2'``), sorted by `order_by`
        (e.g. ``["metrics.val/loss.last ASC"]``), with their metadata and metric
        summaries. Returns an iterator that fetches a page at a time as it is
        consumed (``page_size`` per request; unset: mboxd picks), stopping after
        `limit` experiments; its ``to_pandas()`` makes a DataFrame."""
        from .search import SearchResults

        req = pb.ListExperimentsRequest(namespace=namespace, filter=filter or "", include_details=True)
        req.order_by.extend([order_by] if isinstance(order_by, str) else list(order_by or ()))
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        if page_size is not None:
            req.page_size = int(page_size)
        elif limit:
            req.page_size = min(int(limit), 1000)
        return SearchResults(self, req, limit)

    def search_df(self, namespace: str = "", filter: str = "", order_by: Union[str, Iterable[str], None] = None,
                  limit: Optional[int] = None, page_size: Optional[int] = None):
        """``search(...).to_pandas()``: one row per experiment (needs pandas)."""
        return self.search(namespace, filter, order_by, limit, page_size).to_pandas()

    def _list_experiments(self, req):
        """Experiment messages of a ListExperiments request, following its pages."""
        while True:
            resp = self.stub.ListExperiments(req, timeout=self.request_timeout_s)
            yield from resp.experiments
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    # -- buffered logging --------------------------------------------------------

    def _enqueue(self, record: tuple, points: int):
        with self._cond:
            if self._closed:
                raise RuntimeError("mbox client is closed")
            if self._pending_points + points > self.buffer_points and self._pending_points > 0:
                if self.on_full == "drop":
                    self.dropped += points
                    now = time.monotonic()
                    if now - self._last_drop_warning > 10:
                        self._last_drop_warning = now
                        log.warning("mbox buffer full (%d points): dropped %d points so far", self.buffer_points,
                                    self.dropped)
                    return
                while self._pending_points + points > self.buffer_points and self._pending_points > 0:
                    self._cond.wait()
            if not self._pending:
                self._first_pending_at = time.monotonic()
            self._pending.append(record)
            self._pending_points += points
            self._enqueued += points
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mbox-sender", daemon=True)
                self._thread.start()
            if len(self._pending) == 1 or self._pending_points >= self.batch_points:
                self._cond.notify_all()

    def log_metrics(self, experiment_id: str, metrics: Dict, step: int = 0, wallclock: Optional[int] = None):
        keys = []
        values = []
        for k, v in metrics.items():
            keys.append(k)
            values.append(to_metric_value(v))
        if keys:
            self._enqueue(("m", experiment_id, keys, values, int(step),
                           now_ms() if wallclock is None else int(wallclock)), len(keys))

    def log_event(self, experiment_id: str, event: Event):
        wallclock = now_ms() if event.wallclock_time is None else event.wallclock_time
        self._enqueue(("e", experiment_id, event.name, event.source.name if event.source else "", wallclock,
                       dict(event.metadata or {})), 1)

    def flush(self, timeout: Optional[float] = None):
        """Waits until everything logged before this call is acknowledged by mboxd.
        Raises DeliveryError if some of it was rejected, TimeoutError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._enqueued
            self._flush_wanted = True
            self._cond.notify_all()
            while self._done < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"mbox flush: {target - self._done} points not yet acknowledged by {self.addr}")
                self._cond.wait(remaining)
            errors, self._errors = self._errors, []
        if errors:
            raise DeliveryError(errors)

    def close(self, timeout: Optional[float] = None):
        """Flushes, then stops the sender and closes the connection."""
        try:
            if self._thread is not None:
                self.flush(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join(timeout=5)
            if self._channel is not None:
                self._channel.close()

    def _at_exit(self):
        if self._closed or self._thread is None:
            return
        try:
            self.close(self.flush_at_exit_s)
        except Exception as e:  # noqa: BLE001 - at exit, report and carry on
            log.error("mbox: could not deliver everything before exit: %s", e)

    # -- the sender thread -------------------------------------------------------

    def _take(self):
        with self._cond:
            while True:
                if self._pending:
                    waited = time.monotonic() - self._first_pending_at
                    if (self._pending_points >= self.batch_points or waited >= self.linger_s
                            or self._flush_wanted or self._closed):
                        break
                    self._cond.wait(self.linger_s - waited)
                elif self._closed:
                    return None, 0
                else:
                    self._flush_wanted = False
                    self._cond.wait()
            taken, n = self._pending, self._pending_points
            self._pending, self._pending_points = [], 0
            self._cond.notify_all()  # room for blocked producers
            return taken, n

    def _run(self):
        while True:
            taken, n = self._take()
            if taken is None:
                return
            try:
                for request, rpc in self._requests(taken):
                    self._send(rpc, request)
            except Exception as e:  # noqa: BLE001 - the sender must survive anything
                self._record_error(f"building or sending a batch failed: {e!r}")
            with self._cond:
                self._done += n
                self._cond.notify_all()

    def _requests(self, taken):
        """Columnar LogMetrics requests (blocks per experiment) and LogEvent requests."""
        blocks: Dict[str, dict] = {}
        events: Dict[str, list] = {}
        points = 0
        text_bytes = 0
        for rec in taken:
            if rec[0] == "m":
                _, exp, keys, values, step, wallclock = rec
                b = blocks.get(exp)
                if b is None:
                    b = blocks[exp] = {"keys": {}, "ki": [], "steps": [], "wc": [], "vals": [], "sr": [], "sv": [],
                                       "br": [], "bv": []}
                kmap = b["keys"]
                for k, v in zip(keys, values):
                    row = len(b["steps"])
                    idx = kmap.get(k)
                    if idx is None:
                        idx = kmap[k] = len(kmap)
                    b["ki"].append(idx)
                    b["steps"].append(step)
                    b["wc"].append(wallclock)
                    if type(v) is float:
                        b["vals"].append(v)
                    else:
                        b["vals"].append(0.0)
                        if type(v) is str:
                            b["sr"].append(row)
                            b["sv"].append(v)
                        else:
                            b["br"].append(row)
                            b["bv"].append(v)
                        text_bytes += len(v)
                points += len(keys)
                if points >= _MAX_POINTS_PER_REQUEST or text_bytes >= _MAX_TEXT_BYTES_PER_REQUEST:
                    yield self._metrics_request(blocks), "LogMetrics"
                    blocks, points, text_bytes = {}, 0, 0
            else:
                _, exp, name, source, wallclock, metadata = rec
                events.setdefault(exp, []).append(pb.Event(
                    name=name, source=pb.EventSource(name=source), wallclock_time=timestamp_of_ms(wallclock),
                    metadata=pb.Metadata(metadata={k: to_value_proto(v) for k, v in metadata.items()})))
        if blocks:
            yield self._metrics_request(blocks), "LogMetrics"
        for exp, evs in events.items():
            yield pb.LogEventRequest(parent_id=exp, events=evs, client_batch_id=_batch_id()), "LogEvent"

    @staticmethod
    def _metrics_request(blocks):
        req = pb.LogMetricsRequest(client_batch_id=_batch_id())
        for exp, b in blocks.items():
            blk = req.blocks.add()
            blk.parent_id = exp
            blk.keys.extend(b["keys"])  # dict order = insertion order = index order
            blk.key_index.extend(b["ki"])
            blk.steps.extend(b["steps"])
            blk.wallclock_times.extend(b["wc"])
            blk.values.extend(b["vals"])
            blk.string_rows.extend(b["sr"])
            blk.string_values.extend(b["sv"])
            blk.bytes_rows.extend(b["br"])
            blk.bytes_values.extend(b["bv"])
        return req

    def _send(self, rpc: str, request):
        """Sends with retries (exponential backoff, full jitter) while mboxd is
        unavailable or pushing back; gives up only on a non-retryable status.

        Every retry sends the same request, with the same client_batch_id: when a
        response was lost after mboxd stored the batch (a connection cut after its
        write-ahead log append), mboxd acknowledges the retry as a duplicate instead of
        storing the batch twice."""
        delay = 0.05
        while True:
            try:
                resp = getattr(self.stub, rpc)(request, timeout=self.request_timeout_s)
                if resp.duplicate:
                    self.duplicates += 1
                    log.debug("mbox: %s batch %s was already stored", rpc, request.client_batch_id)
                return
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if code not in _RETRYABLE:
                    self._record_error(f"{rpc}: {code}: {e.details() if hasattr(e, 'details') else e}")
                    return
                pushback = _pushback_s(e)
                with self._cond:
                    # close() sets this only after its flush gave up waiting.
                    if self._closed:
                        self._errors.append(f"{rpc}: undelivered at close: {code}")
                        return
                time.sleep(pushback if pushback is not None else random.uniform(0, delay))
                delay = min(delay * 2, 2.0)

    def _record_error(self, message: str):
        log.error("mbox: %s", message)
        with self._cond:
            self._errors.append(message)


def _batch_id() -> str:
    """A fresh client_batch_id: unique per batch, kept on its retries."""
    return uuid.uuid4().hex


def _pushback_s(error) -> Optional[float]:
    try:
        for k, v in error.trailing_metadata() or ():
            if k == "grpc-retry-pushback-ms":
                return int(v) / 1000
    except Exception:  # noqa: BLE001
        return None
    return None


_default: Optional[Client] = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process-wide client (address from $MBOX_ADDR, default localhost:8085;
    token from $MBOX_TOKEN; TLS from $MBOX_TLS_CA)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Client()
        return _default
