"""What the SDK sends and how it reads answers, against an in-process fake
ModelStore: batch ids and their retries, GetMetrics pages and buckets, lazy
ListExperiments pages for search. Independent of the mboxd binary."""

import datetime
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2

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


def series(key, steps, values, **kw):
    return pb.Metrics(key=key, values=[pb.MetricsValue(step=s, wallclock_time=1000 + s, d_val=v)
                                       for s, v in zip(steps, values)], **kw)


def test_metrics_sends_the_query_and_follows_pages(fake):
    pages = {
        "": pb.GetMetricsResponse(metrics=[series("a", [0, 1], [0.0, 1.0], total_points=4)], next_page_token="p2"),
        "p2": pb.GetMetricsResponse(metrics=[
            series("a", [2, 3], [2.0, 3.0], total_points=4),
            series("b", [9, 19], [0.5, 0.25], bucketed=True, min=[0.1, 0.2], max=[0.9, 0.8], total_points=20)],
            next_page_token="p3"),
        "p3": pb.GetMetricsResponse(metrics=[
            series("b", [29], [0.125], bucketed=True, min=[0.05], max=[0.3], total_points=20)]),
    }
    server = fake(GetMetrics=lambda request, context: pages[request.page_token])
    exp = mbox.Experiment(mbox.Client(server.addr), "e1")
    m = exp.metrics(keys=["a", "b"], start_step=0, end_step=100, max_points=3)

    assert m["a"] == mbox.MetricSeries(steps=[0, 1, 2, 3], wallclocks=[1000, 1001, 1002, 1003],
                                       values=[0.0, 1.0, 2.0, 3.0], min=None, max=None, total_points=4)
    assert not m["a"].bucketed
    assert m["b"].bucketed and m["b"].steps == [9, 19, 29] and m["b"].values == [0.5, 0.25, 0.125]
    assert (m["b"].min, m["b"].max, m["b"].total_points) == ([0.1, 0.2, 0.05], [0.9, 0.8, 0.3], 20)

    requests = server.of("GetMetrics")
    assert [r.page_token for r in requests] == ["", "p2", "p3"]
    for r in requests:
        assert (r.parent_id, list(r.keys), r.start_step, r.end_step, r.max_points, r.full_precision) == (
            "e1", ["a", "b"], 0, 100, 3, True)
        assert r.HasField("start_step") and r.page_size == 0  # mboxd picks the page size
    exp.client.close(timeout=5)


def test_metrics_without_arguments_asks_for_everything_at_full_precision(fake):
    server = fake(GetMetrics=lambda request, context: pb.GetMetricsResponse(metrics=[
        pb.Metrics(key="s", values=[pb.MetricsValue(step=1, s_tensor="text"), pb.MetricsValue(step=2, f_val=0.5)])]))
    exp = mbox.Experiment(mbox.Client(server.addr), "e1")
    m = exp.metrics()
    (r,) = server.of("GetMetrics")
    assert not r.HasField("start_step") and not r.HasField("end_step")
    assert (list(r.keys), r.max_points, r.page_size, r.full_precision) == ([], 0, 0, True)
    assert (m["s"].values, m["s"].min, m["s"].total_points) == (["text", 0.5], None, 2)
    exp.client.close(timeout=5)


def experiment_message(i):
    created = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(hours=i)
    e = pb.Experiment(id=f"id{i}", name=f"run{i}", namespace="cv", owner="me", framework=1, task="detect",
                      external_id=f"x{i}",
                      metadata=pb.Metadata(metadata={"lr": struct_pb2.Value(number_value=0.1 * i)}),
                      metric_summaries=[pb.MetricSummary(key="val/loss", last=1.0 / (i + 1), last_step=100,
                                                         min=0.1, max=2.0, count=101)])
    e.created_at.FromDatetime(created)
    e.updated_at.FromDatetime(created)
    return e


def test_search_passes_the_query_through_and_fetches_pages_lazily(fake):
    pages = {"": (["id0", "id1"], "t2"), "t2": (["id2", "id3"], "t3"), "t3": (["id4"], "")}

    def list_experiments(request, context):
        ids, token = pages[request.page_token]
        return pb.ListExperimentsResponse(experiments=[experiment_message(int(i[2:])) for i in ids],
                                          next_page_token=token)

    server = fake(ListExperiments=list_experiments)
    client = mbox.Client(server.addr)
    results = client.search("cv", filter='params.lr = 0.1 and metrics.val/loss.last < 0.2',
                            order_by=["metrics.val/loss.last ASC"], page_size=2)
    assert server.of("ListExperiments") == []  # nothing asked before iterating
    first = next(results)
    assert len(server.of("ListExperiments")) == 1
    assert (first.id, first.name, first.task, first.framework) == ("id0", "run0", "detect", mbox.MLFramework.PYTORCH)
    assert dict(first.metadata) == {"lr": 0.0}
    assert first.summaries == {"val/loss": mbox.MetricSummary(last=1.0, last_step=100, min=0.1, max=2.0, count=101)}
    rest = list(results)
    assert [e.id for e in rest] == ["id1", "id2", "id3", "id4"]
    requests = server.of("ListExperiments")
    assert [r.page_token for r in requests] == ["", "t2", "t3"]
    for r in requests:
        assert (r.namespace, r.filter, list(r.order_by), r.include_details, r.page_size) == (
            "cv", 'params.lr = 0.1 and metrics.val/loss.last < 0.2', ["metrics.val/loss.last ASC"], True, 2)

    # A limit stops early: three results need two pages of two, not three.
    del server.requests[:]
    assert [e.id for e in client.search("cv", limit=3, page_size=2)] == ["id0", "id1", "id2"]
    assert len(server.of("ListExperiments")) == 2
    client.close(timeout=5)


def test_search_df_makes_one_row_per_experiment(fake):
    pd = pytest.importorskip("pandas", reason="pandas is not installed")
    server = fake(ListExperiments=lambda request, context: pb.ListExperimentsResponse(
        experiments=[experiment_message(1), experiment_message(2)]))
    client = mbox.Client(server.addr)
    df = client.search_df("cv", order_by="created_at DESC")
    assert list(df.columns) == [
        "id", "name", "namespace", "owner", "framework", "task", "external_id", "created_at", "updated_at",
        "params.lr", "metrics.val/loss.last", "metrics.val/loss.last_step", "metrics.val/loss.min",
        "metrics.val/loss.max", "metrics.val/loss.count"]
    assert df["id"].tolist() == ["id1", "id2"]
    assert df["framework"].tolist() == ["PYTORCH", "PYTORCH"]
    assert df["params.lr"].tolist() == pytest.approx([0.1, 0.2])
    assert df["metrics.val/loss.last"].tolist() == pytest.approx([0.5, 1 / 3])
    assert df["created_at"].iloc[0] == pd.Timestamp("2026-11-01T01:00:00Z")
    assert list(server.of("ListExperiments")[0].order_by) == ["created_at DESC"]
    client.close(timeout=5)


def test_experiments_follows_pages(fake):
    pages = {"": (["id0"], "t2"), "t2": (["id1"], "")}
    server = fake(ListExperiments=lambda request, context: pb.ListExperimentsResponse(
        experiments=[experiment_message(int(i[2:])) for i in pages[request.page_token][0]],
        next_page_token=pages[request.page_token][1]))
    client = mbox.Client(server.addr)
    experiments = client.experiments("cv")
    assert [e.id for e in experiments] == ["id0", "id1"]
    assert not any(r.include_details for r in server.of("ListExperiments"))
    assert experiments[0].summaries is None  # no details were asked for
    client.close(timeout=5)
