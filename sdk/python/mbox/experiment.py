"""An experiment: the handle training code logs through."""

import datetime
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Union

from ._proto import modelbox as pb
from ._types import Event, EventSource, MetricSeries, MetricSummary, MLFramework, UpdateMetadataResult
from .client import Client, from_value_proto, timestamp_of_ms, to_value_proto


class Experiment:
    def __init__(self, client: Client, id: str, *, name: str = "", owner: str = "", namespace: str = "",
                 external_id: str = "", framework: MLFramework = MLFramework.UNKNOWN,
                 created_at: Optional[datetime.datetime] = None, updated_at: Optional[datetime.datetime] = None,
                 exists: bool = False, task: str = "", metadata: Optional[Dict] = None,
                 summaries: Optional[Dict[str, MetricSummary]] = None):
        self.client = client
        self.id = id
        self.name = name
        self.owner = owner
        self.namespace = namespace
        self.external_id = external_id
        self.framework = framework
        self.created_at = created_at
        self.updated_at = updated_at
        #: Whether CreateExperiment found it already there (another rank made it).
        self.exists = exists
        self.task = task
        #: Metric summaries (key -> MetricSummary) as search() found them; None for
        #: experiments that did not come from a search.
        self.summaries = summaries
        self._metadata = metadata

    @classmethod
    def from_proto(cls, client: Client, e, detailed: bool = False) -> "Experiment":
        """`detailed`: the message came from a request with include_details, so its
        metadata and metric summaries are filled (empty ones included)."""
        utc = datetime.timezone.utc
        return cls(client, e.id, name=e.name, owner=e.owner, namespace=e.namespace, external_id=e.external_id,
                   framework=MLFramework(e.framework), created_at=e.created_at.ToDatetime(utc),
                   updated_at=e.updated_at.ToDatetime(utc), exists=True, task=e.task,
                   metadata={k: from_value_proto(v) for k, v in e.metadata.metadata.items()} if detailed else None,
                   summaries={s.key: MetricSummary(last=s.last, last_step=s.last_step, min=s.min, max=s.max,
                                                   count=s.count) for s in e.metric_summaries} if detailed else None)

    def __repr__(self):
        return f"Experiment(id={self.id!r}, name={self.name!r}, namespace={self.namespace!r})"

    # -- writing ------------------------------------------------------------------

    def update_metadata(self, key: str, value) -> UpdateMetadataResult:
        """Stores `value` (any JSON-like value, nested dicts kept) under `key`,
        merged with the experiment's other metadata. Synchronous."""
        resp = self.client.stub.UpdateMetadata(
            pb.UpdateMetadataRequest(parent_id=self.id, metadata=pb.Metadata(metadata={key: to_value_proto(value)})),
            timeout=self.client.request_timeout_s)
        self._metadata = None
        return UpdateMetadataResult(updated_at=resp.updated_at.ToDatetime(datetime.timezone.utc),
                                    num_keys_written=resp.num_keys_written)

    def log_metrics(self, metrics: Dict, step: int = 0, wallclock: Optional[int] = None) -> None:
        """Buffers one point per key and returns at once. Values: numbers (numpy
        scalars and 0-d tensors too, read now), str or bytes. `wallclock` is
        milliseconds since the Unix epoch, by default the time of this call."""
        self.client.log_metrics(self.id, metrics, step, wallclock)

    def log_event(self, event: Event) -> None:
        """Buffers an event and returns at once."""
        self.client.log_event(self.id, event)

    def flush(self, timeout: Optional[float] = None) -> None:
        self.client.flush(timeout)

    def start_system_metrics(self, interval_s: float = 10.0, *, all_ranks: bool = False,
                             node: Optional[str] = None):
        """Samples CPU, memory, disk, network and (with NVML) GPU figures every
        `interval_s` into ``system/<node>/...`` metrics, once per node: only on local
        rank 0 (``LOCAL_RANK``), or on every rank with ``all_ranks=True`` (then under
        ``system/<node>/rank<local rank>/...``). `node` defaults to ``node<NODE_RANK>``,
        else the host name. Returns a handle with stop() (and ``active``, False on
        the ranks that do not sample)."""
        from .system import SystemMetrics

        return SystemMetrics(self, interval_s, all_ranks=all_ranks, node=node).start()

    # -- reading (everything logged so far is flushed first) ----------------------

    @property
    def metadata(self) -> "MetadataView":
        """The experiment's metadata. Call it, ``experiment.metadata()``, to read it
        from mboxd now (a dict); use it as a mapping, ``experiment.metadata["lr"]``,
        for the copy a search() returned (or read on first use)."""
        return MetadataView(self)

    def _read_metadata(self) -> Dict:
        self.client.flush()
        resp = self.client.stub.ListMetadata(pb.ListMetadataRequest(parent_id=self.id),
                                             timeout=self.client.request_timeout_s)
        self._metadata = {k: from_value_proto(v) for k, v in resp.metadata.items()}
        return dict(self._metadata)

    def metrics(self, keys: Union[str, Iterable[str], None] = None, start_step: Optional[int] = None,
                end_step: Optional[int] = None, max_points: Optional[int] = None) -> Dict[str, MetricSeries]:
        """Metric series by key. Without arguments: every point of every key, at full
        precision. `keys` selects series; `start_step` / `end_step` an inclusive step
        range; with `max_points`, longer series come back as at most that many step
        buckets (see MetricSeries). Follows mboxd's pages until the end."""
        self.client.flush()
        req = pb.GetMetricsRequest(parent_id=self.id, full_precision=True)
        if keys is not None:
            req.keys.extend([keys] if isinstance(keys, str) else list(keys))
        if start_step is not None:
            req.start_step = int(start_step)
        if end_step is not None:
            req.end_step = int(end_step)
        if max_points:
            req.max_points = int(max_points)
        out: Dict[str, MetricSeries] = {}
        while True:
            resp = self.client.stub.GetMetrics(req, timeout=self.client.request_timeout_s)
            for m in resp.metrics:
                series = out.get(m.key)
                if series is None:
                    series = out[m.key] = MetricSeries()
                for v in m.values:
                    kind = v.WhichOneof("value")
                    series.steps.append(v.step)
                    series.wallclocks.append(v.wallclock_time)
                    series.values.append(getattr(v, kind) if kind else None)
                if m.bucketed:
                    series.min = (series.min or []) + list(m.min)
                    series.max = (series.max or []) + list(m.max)
                series.total_points = max(series.total_points, m.total_points)
            if not resp.next_page_token:
                break
            req.page_token = resp.next_page_token
        for series in out.values():
            if not series.total_points and not series.bucketed:  # a server that does not count
                series.total_points = len(series.steps)
        return out

    def events(self, since=None) -> List[Event]:
        self.client.flush()
        req = pb.ListEventsRequest(parent_id=self.id)
        if since is not None:
            req.since.CopyFrom(timestamp_of_ms(since))
        resp = self.client.stub.ListEvents(req, timeout=self.client.request_timeout_s)
        return [Event(name=e.name, source=EventSource(name=e.source.name),
                      wallclock_time=e.wallclock_time.seconds * 1000 + e.wallclock_time.nanos // 1_000_000,
                      metadata={k: from_value_proto(v) for k, v in e.metadata.metadata.items()})
                for e in resp.events]


class MetadataView(Mapping):
    """An experiment's metadata, both ways it is asked for: called, it reads the
    metadata from mboxd now (ModelBox's ``experiment.metadata()``); as a mapping it is
    the copy a search() returned, else read once on first use (and again after this
    handle's update_metadata)."""

    __slots__ = ("_experiment",)

    def __init__(self, experiment: Experiment):
        self._experiment = experiment

    def __call__(self) -> Dict:
        return self._experiment._read_metadata()

    def _data(self) -> Dict:
        if self._experiment._metadata is None:
            self._experiment._read_metadata()
        return self._experiment._metadata

    def __getitem__(self, key):
        return self._data()[key]

    def __iter__(self):
        return iter(self._data())

    def __len__(self):
        return len(self._data())

    def __repr__(self):
        return repr(self._data())
