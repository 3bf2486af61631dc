"""`import mbox` on whatever protobuf and grpcio a training image carries: messages
built from the shipped descriptor, with the runtime's own well-known types, beside
other copies of the ModelBox proto, on either protobuf backend; no torch or
lightning imported. (test_sdk_descriptor.py, in the daemon suite, checks the
descriptor against proto/modelbox.proto.)"""

import os
import subprocess
import sys

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

import mbox
from mbox._proto import modelbox as pb


def run_python(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_messages_use_the_runtimes_well_known_types():
    md = pb.Metadata(metadata={"a": struct_pb2.Value(number_value=1.5)})
    assert type(md.metadata["a"]) is struct_pb2.Value
    exp = pb.Experiment(created_at=timestamp_pb2.Timestamp(seconds=5))
    assert type(exp.created_at) is timestamp_pb2.Timestamp
    assert exp.created_at.ToMilliseconds() == 5000
    # proto3 `optional` keeps presence: step 0 is a range start, unset is none.
    req = pb.GetMetricsRequest(parent_id="x")
    assert not req.HasField("start_step")
    req.start_step = 0
    assert req.HasField("start_step")
    assert pb.GetMetricsRequest.FromString(req.SerializeToString()) == req


def test_field_numbers_on_the_wire_are_the_protos():
    # client_batch_id is field 11 (length-delimited: tag 0x5a); start_step field 12
    # (varint: tag 0x60); Metrics.bucketed field 10; LogMetricsResponse.duplicate 2.
    assert pb.LogMetricsRequest(client_batch_id="ab").SerializeToString() == b"\x5a\x02ab"
    assert pb.LogEventRequest(client_batch_id="ab").SerializeToString() == b"\x5a\x02ab"
    assert pb.GetMetricsRequest(start_step=0).SerializeToString() == b"\x60\x00"
    assert pb.Metrics(bucketed=True).SerializeToString() == b"\x50\x01"
    assert pb.LogMetricsResponse.FromString(b"\x10\x01").duplicate
    assert pb.LogEventResponse.FromString(b"\x58\x01").duplicate


def test_the_stub_has_every_rpc_at_modelbox_paths():
    names = [m.name for m in pb.DESCRIPTOR.services_by_name["ModelStore"].methods]
    assert "LogMetrics" in names and "UploadFile" in names
    paths = []

    class Recorder:
        def __getattr__(self, kind):
            def make(path, request_serializer, response_deserializer):
                paths.append((kind, path))
                return path
            return make

    stub = pb.ModelStoreStub(Recorder())
    assert {n: getattr(stub, n) for n in names} == {n: f"/modelbox.ModelStore/{n}" for n in names}
    kinds = dict((p.rsplit("/", 1)[1], k) for k, p in paths)
    assert kinds["LogMetrics"] == "unary_unary"
    assert kinds["UploadFile"] == "stream_unary"
    assert kinds["DownloadFile"] == "unary_stream"
    # And a real channel accepts those calls (no keyword a grpcio lacks).
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        pb.ModelStoreStub(channel)


def test_mbox_shares_a_process_with_another_copy_of_the_modelbox_proto():
    # ModelBox's own client, or stubs generated from mboxd's proto, register
    # `modelbox.*` in protobuf's default pool; a second, different definition of the
    # same names would be refused. The SDK registers its copy under its own names.
    code = """
from google.protobuf import descriptor_pb2, descriptor_pool
other = descriptor_pb2.FileDescriptorProto(name="modelbox.proto", package="modelbox", syntax="proto3")
msg = other.message_type.add(name="Experiment")
msg.field.add(name="something_else", number=1, type=9, label=1)
descriptor_pool.Default().AddSerializedFile(other.SerializeToString())
import mbox
from mbox._proto import modelbox as pb
print(pb.Experiment.DESCRIPTOR.full_name, pb.Experiment(id="x").SerializeToString())
"""
    assert run_python(code).split() == ["mbox.sdk.modelbox.Experiment", "b'\\n\\x01x'"]


def test_the_pure_python_protobuf_backend_works_too():
    code = """
from google.protobuf.internal import api_implementation
import mbox
from mbox.client import to_value_proto
from mbox._proto import modelbox as pb
md = pb.Metadata(metadata={"lr": to_value_proto({"a": [1, 2]})})
assert pb.Metadata.FromString(md.SerializeToString()) == md
print(api_implementation.Type())
"""
    assert run_python(code, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python").strip() == "python"


def test_importing_mbox_imports_neither_torch_nor_lightning(tmp_path):
    # Importable stand-ins, so an accidental import would succeed and show up in
    # sys.modules even where the real packages are not installed.
    for name in ("torch", "lightning"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = "import sys, mbox; assert not {'torch', 'lightning'} & set(sys.modules), sorted(sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    # The probe itself works: the stand-ins are importable from PYTHONPATH.
    probe = "import sys, lightning; assert 'lightning' in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True, env=env)


def test_the_public_api():
    for name in ("new_experiment", "experiments", "experiment", "search", "search_df", "flush", "close",
                 "Client", "MetricSeries", "MetricSummary"):
        assert hasattr(mbox, name), name
