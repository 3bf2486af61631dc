"""An experiment: the handle training code logs through."""

import datetime
from typing import Dict, List, Optional

from ._proto import modelbox as pb
from ._types import Event, EventSource, MetricSeries, MLFramework, UpdateMetadataResult
from .client import Client, from_value_proto, timestamp_of_ms, to_value_proto


class Experiment:
    def __init__(self, client: Client, id: str, *, name: str = "", owner: str = "", namespace: str = "",
                 external_id: str = "", framework: MLFramework = MLFramework.UNKNOWN,
                 created_at: Optional[datetime.datetime] = None, updated_at: Optional[datetime.datetime] = None,
                 exists: bool = False):
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

    @classmethod
    def from_proto(cls, client: Client, e) -> "Experiment":
        utc = datetime.timezone.utc
        return cls(client, e.id, name=e.name, owner=e.owner, namespace=e.namespace, external_id=e.external_id,
                   framework=MLFramework(e.framework), created_at=e.created_at.ToDatetime(utc),
                   updated_at=e.updated_at.ToDatetime(utc), exists=True)

    def __repr__(self):
        return f"Experiment(id={self.id!r}, name={self.name!r}, namespace={self.namespace!r})"

    # -- writing ------------------------------------------------------------------

    def update_metadata(self, key: str, value) -> UpdateMetadataResult:
        """Stores `value` (any JSON-like value, nested dicts kept) under `key`,
        merged with the experiment's other metadata. Synchronous."""
        resp = self.client.stub.UpdateMetadata(
            pb.UpdateMetadataRequest(parent_id=self.id, metadata=pb.Metadata(metadata={key: to_value_proto(value)})),
            timeout=self.client.request_timeout_s)
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

    def start_system_metrics(self, interval_s: float = 10.0):
        """Samples CPU, memory, disk, network and (with NVML) GPU figures every
        `interval_s` into `system/...` metrics. Returns a handle with stop()."""
        from .system import SystemMetrics

        return SystemMetrics(self, interval_s).start()

    # -- reading (everything logged so far is flushed first) ----------------------

    def metadata(self) -> Dict:
        self.client.flush()
        resp = self.client.stub.ListMetadata(pb.ListMetadataRequest(parent_id=self.id),
                                             timeout=self.client.request_timeout_s)
        return {k: from_value_proto(v) for k, v in resp.metadata.items()}

    def metrics(self) -> Dict[str, MetricSeries]:
        self.client.flush()
        resp = self.client.stub.GetMetrics(pb.GetMetricsRequest(parent_id=self.id, full_precision=True),
                                           timeout=self.client.request_timeout_s)
        out = {}
        for m in resp.metrics:
            series = out[m.key] = MetricSeries()
            for v in m.values:
                series.steps.append(v.step)
                series.wallclocks.append(v.wallclock_time)
                series.values.append(getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None)
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
