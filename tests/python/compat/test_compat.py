"""An unmodified ModelBox 0.0.5 client (stubs from a proto without mboxd's extensions)
drives every served RPC and gets ModelBox's answers."""

# Runs in its own pytest process: its stubs declare the same protobuf symbols as mboxd's.

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2


def stub(compat, mboxd):
    pb2, pb2_grpc = compat
    return pb2, pb2_grpc.ModelStoreStub(mboxd.channel)


def test_every_rpc_through_modelbox_stubs(compat, mboxd):
    pb2, s = stub(compat, mboxd)
    md = pb2.Metadata()
    md.metadata["lr"].number_value = 0.0002
    req = pb2.CreateExperimentRequest(
        name="yolo-v4", owner="foo@bar.com", namespace="cv", external_id="ext1",
        framework=pb2.PYTORCH, task="detection", metadata=md,
    )
    created = s.CreateExperiment(req)
    assert created.experiment_id == "2b2a19e145c92827d50144d50ee13c68"
    assert not created.experiment_exists
    assert created.created_at.seconds > 0
    again = s.CreateExperiment(req)
    assert again.experiment_id == created.experiment_id and again.experiment_exists
    eid = created.experiment_id

    exp = s.GetExperiment(pb2.GetExperimentRequest(id=eid)).experiment
    assert (exp.name, exp.owner, exp.namespace, exp.external_id, exp.framework) == (
        "yolo-v4", "foo@bar.com", "cv", "ext1", pb2.PYTORCH)
    listed = s.ListExperiments(pb2.ListExperimentsRequest(namespace="cv")).experiments
    assert [e.id for e in listed] == [eid]

    update = pb2.Metadata()
    update.metadata["hyperparams"].struct_value.update({"fc_layers": 3, "lr": 0.0002})
    update.metadata["lr"].number_value = 0.1
    resp = s.UpdateMetadata(pb2.UpdateMetadataRequest(parent_id=eid, metadata=update))
    assert resp.num_keys_written == 2
    assert resp.updated_at.seconds >= created.created_at.seconds
    listed_md = s.ListMetadata(pb2.ListMetadataRequest(parent_id=eid)).metadata
    assert set(listed_md) == {"hyperparams", "lr"}
    assert listed_md["lr"].number_value == 0.1
    assert dict(listed_md["hyperparams"].struct_value) == {"fc_layers": 3.0, "lr": 0.0002}

    sent = [("loss", 1, pb2.MetricsValue(step=1, wallclock_time=100, f_val=2.5)),
            ("loss", 2, pb2.MetricsValue(step=2, wallclock_time=200, f_val=1.5)),
            ("tensor", 1, pb2.MetricsValue(step=1, wallclock_time=100, s_tensor="[1,2]")),
            ("raw", 1, pb2.MetricsValue(step=1, wallclock_time=100, b_tensor=b"\x00\x01"))]
    for key, _, value in sent:
        resp = s.LogMetrics(pb2.LogMetricsRequest(parent_id=eid, key=key, value=value))
        # mboxd's count is an unknown field to this client: no known field is set.
        assert isinstance(resp, pb2.LogMetricsResponse) and resp.ListFields() == []
    metrics = {m.key: list(m.values) for m in s.GetMetrics(pb2.GetMetricsRequest(parent_id=eid)).metrics}
    assert sorted(metrics) == ["loss", "raw", "tensor"]
    assert [(v.step, v.wallclock_time, v.f_val) for v in metrics["loss"]] == [(1, 100, 2.5), (2, 200, 1.5)]
    assert all(v.WhichOneof("value") == "f_val" for v in metrics["loss"])
    assert metrics["tensor"][0].s_tensor == "[1,2]"
    assert metrics["raw"][0].b_tensor == b"\x00\x01"

    emd = pb2.Metadata()
    emd.metadata["chk_size"].number_value = 2345
    ev = pb2.Event(name="checkpoint_started", source=pb2.EventSource(name="trainer"),
                   wallclock_time=timestamp_pb2.Timestamp(seconds=12000), metadata=emd)
    logged = s.LogEvent(pb2.LogEventRequest(parent_id=eid, event=ev))
    assert logged.created_at.seconds > 0
    ev2 = pb2.Event(name="checkpoint_finish", source=pb2.EventSource(name="trainer"),
                    wallclock_time=timestamp_pb2.Timestamp(seconds=12500))
    s.LogEvent(pb2.LogEventRequest(parent_id=eid, event=ev2))
    events = s.ListEvents(pb2.ListEventsRequest(parent_id=eid)).events
    assert [e.name for e in events] == ["checkpoint_started", "checkpoint_finish"]
    assert events[0].source.name == "trainer"
    assert events[0].metadata.metadata["chk_size"].number_value == 2345
    since = s.ListEvents(pb2.ListEventsRequest(parent_id=eid, since=timestamp_pb2.Timestamp(seconds=12100))).events
    assert [e.name for e in since] == ["checkpoint_finish"]

    with pytest.raises(grpc.RpcError) as err:
        s.CreateModel(pb2.CreateModelRequest(name="m", owner="o", namespace="cv"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CreateModel" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        s.LogMetrics(pb2.LogMetricsRequest(parent_id="missing", key="loss",
                                           value=pb2.MetricsValue(step=1, f_val=1.0)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        s.LogMetrics(pb2.LogMetricsRequest(parent_id=eid, key="", value=pb2.MetricsValue(step=1, f_val=1.0)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key" in err.value.details()
