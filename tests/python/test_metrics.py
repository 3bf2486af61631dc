"""The Prometheus endpoint during ingest: counters match exactly what was sent, and
the text parses as the Prometheus (OpenMetrics) exposition format."""

import time
import urllib.request

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from harness import Mboxd, free_port


def scrape(port):
    response = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    text = response.read().decode()
    families = {}
    for family in text_string_to_metric_families(text):  # raises if the text does not parse
        families.setdefault(family.name, []).append(family)
    return text, families


def samples(families, name):
    return [s for f in families.get(name, []) for s in f.samples]


def value(families, name, **labels):
    for s in samples(families, name):
        if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def test_metrics_count_exactly_what_was_sent(full, tmp_path):
    pb2, pb2_grpc = full
    port = free_port()
    # Summary log lines every second run alongside publishing: they read the same
    # metric families the writer updates (a deadlock here once hung shutdown).
    config = tmp_path / "mboxd.toml"
    config.write_text("[log]\nsummary_interval_s = 1\n[writer]\nmax_age_ms = 100\n")
    server = Mboxd(tmp_path / "data", ["--config", str(config)], metrics_listen=f"127.0.0.1:{port}")
    s = pb2_grpc.ModelStoreStub(server.channel)
    exp = s.CreateExperiment(pb2.CreateExperimentRequest(name="m", namespace="ops")).experiment_id
    sent_bytes = 0
    for i in range(7):
        block = pb2.MetricsBlock(parent_id=exp, keys=["loss"], key_index=[0] * 1000,
                                 steps=range(i * 1000, i * 1000 + 1000), wallclock_times=[1] * 1000,
                                 values=[0.5] * 1000)
        req = pb2.LogMetricsRequest(blocks=[block])
        sent_bytes += req.ByteSize()
        assert s.LogMetrics(req).points_accepted == 1000
    # A retry with the same client batch id: acknowledged again, written once.
    block = pb2.MetricsBlock(parent_id=exp, keys=["loss"], key_index=[0] * 1000,
                             steps=range(7000, 8000), wallclock_times=[1] * 1000, values=[0.5] * 1000)
    for _ in range(2):
        assert s.LogMetrics(pb2.LogMetricsRequest(blocks=[block], client_batch_id="b-1")).points_accepted == 1000
    for _ in range(3):
        s.LogEvent(pb2.LogEventRequest(parent_id=exp, event=pb2.Event(name="e")))
    # Refused: 2 points for an unknown experiment, 5 events without a name.
    with pytest.raises(grpc.RpcError):
        s.LogMetrics(pb2.LogMetricsRequest(blocks=[pb2.MetricsBlock(
            parent_id="nope", keys=["k"], key_index=[0, 0], steps=[1, 2], wallclock_times=[1, 1], values=[1, 1])]))
    with pytest.raises(grpc.RpcError):
        s.LogEvent(pb2.LogEventRequest(parent_id=exp, events=[pb2.Event(name="")] * 5))

    text, f = scrape(port)
    assert value(f, "mboxd_points_accepted") == 8000
    assert value(f, "mboxd_events_accepted") == 3
    assert value(f, "mboxd_points_rejected", reason="not_found") == 2
    assert value(f, "mboxd_events_rejected", reason="invalid_argument") == 5
    assert value(f, "mboxd_queue_pushes") == 11
    # Request bodies: at least the protobuf payloads (plus gRPC's 5-byte framing).
    assert value(f, "mboxd_received_bytes") >= sent_bytes
    assert value(f, "mboxd_wal_appends") == 11
    assert f["mboxd_wal_fsync_duration_seconds"][0].type == "histogram"
    # Accepted writes only: 8 LogMetrics and 3 LogEvent, not the 2 refused nor the
    # duplicate.
    assert f["mboxd_ingest_ack_duration_seconds"][0].type == "histogram"
    ack = {s.name: s.value for s in samples(f, "mboxd_ingest_ack_duration_seconds") if not s.labels}
    assert ack["mboxd_ingest_ack_duration_seconds_count"] == 11
    assert ack["mboxd_ingest_ack_duration_seconds_sum"] > 0
    assert samples(f, "mboxd_build_info")[0].labels["version"]
    # The wall clock did not go back: the catalog clock is not ahead of it.
    assert [s.value for s in samples(f, "mboxd_catalog_clock_lead_seconds")] == [0.0]
    assert "# TYPE mboxd_points_accepted counter" in text

    # Once the roll age passes, everything is published and popped; wait past a
    # summary line too.
    time.sleep(1.2)
    deadline = time.time() + 10
    while time.time() < deadline:
        _, f = scrape(port)
        if value(f, "mboxd_published_rows", table="metrics") == 8000 and \
                value(f, "mboxd_published_rows", table="events") == 3:
            break
        time.sleep(0.05)
    assert value(f, "mboxd_published_rows", table="metrics") == 8000
    assert value(f, "mboxd_files_published", table="events") >= 1
    assert value(f, "mboxd_queue_pops") == 11
    assert value(f, "mboxd_buffered_bytes") == 0
    for name in ("mboxd_points_accepted", "mboxd_publish_duration_seconds"):
        assert "experiment" not in str([s.labels for s in samples(f, name)])
    assert server.stop() == 0
