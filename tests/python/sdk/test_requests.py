"""What the SDK sends, against an in-process fake ModelStore: batch ids and their
retries. Independent of the mboxd binary."""

import uuid

import grpc
import pytest

import mbox
from fake_modelstore import FakeModelStore
from mbox._proto import modelbox as pb


@pytest.fixture
def fake():
    servers = []

    def start(**handlers):
        server = FakeModelStore(handlers)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def test_every_batch_carries_a_fresh_id_and_keeps_it_on_retries(fake):
    # The first attempt of each batch "fails after mboxd stored it" (UNAVAILABLE);
    # the retry must carry the same id, and mboxd answers it as a duplicate.
    seen = set()

    def log_metrics(request, context):
        if request.client_batch_id not in seen:
            seen.add(request.client_batch_id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost after the WAL append")
        return pb.LogMetricsResponse(points_accepted=0, duplicate=True)

    def log_event(request, context):
        if request.client_batch_id not in seen:
            seen.add(request.client_batch_id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost after the WAL append")
        return pb.LogEventResponse(events_accepted=0, duplicate=True)

    server = fake(LogMetrics=log_metrics, LogEvent=log_event)
    client = mbox.Client(server.addr)
    for step in range(3):
        client.log_metrics("exp", {"loss": 1.0, "acc": 0.5}, step=step)
        client.flush(timeout=30)
    client.log_event("exp", mbox.Event(name="done"))
    client.flush(timeout=30)

    ids = [r.client_batch_id for r in server.of("LogMetrics")]
    assert len(ids) == 6 and ids[0::2] == ids[1::2], ids  # each batch twice, same id
    assert len(set(ids)) == 3
    for batch_id in ids:
        assert uuid.UUID(hex=batch_id).hex == batch_id and uuid.UUID(hex=batch_id).version == 4
    event_ids = [r.client_batch_id for r in server.of("LogEvent")]
    assert len(event_ids) == 2 and event_ids[0] == event_ids[1] and event_ids[0] not in ids
    assert client.duplicates == 4
    client.close(timeout=5)
