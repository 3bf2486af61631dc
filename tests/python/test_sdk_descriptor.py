"""The SDK ships proto/modelbox.proto as a serialized descriptor
(sdk/python/mbox/_proto/descriptor.py); it must match the proto. Needs grpcio-tools,
a development dependency, so it runs here rather than in the SDK matrix."""

import importlib.util
import pathlib
import subprocess
import sys

from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
GEN = ROOT / "sdk" / "python" / "scripts" / "gen_descriptor.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_descriptor", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_descriptor_matches_the_proto():
    gen = load_generator()
    fresh = gen.descriptor_proto()
    namespace = {}
    exec((ROOT / "sdk" / "python" / "mbox" / "_proto" / "descriptor.py").read_text(), namespace)
    shipped = descriptor_pb2.FileDescriptorProto.FromString(namespace["SERIALIZED"])
    assert shipped == fresh, "stale: run python sdk/python/scripts/gen_descriptor.py"
    # And byte for byte, as the script writes it.
    assert subprocess.run([sys.executable, str(GEN), "--check"]).returncode == 0


def test_the_descriptor_keeps_the_protos_messages_fields_and_rpcs():
    gen = load_generator()
    original = gen._protoc_descriptor()
    shipped = gen.descriptor_proto()
    assert [m.name for m in shipped.message_type] == [m.name for m in original.message_type]
    for a, b in zip(shipped.message_type, original.message_type):
        assert [(f.name, f.number, f.type, f.label) for f in a.field] == \
            [(f.name, f.number, f.type, f.label) for f in b.field], a.name
    assert [(m.name, m.client_streaming, m.server_streaming) for m in shipped.service[0].method] == \
        [(m.name, m.client_streaming, m.server_streaming) for m in original.service[0].method]
    assert shipped.package == "mbox.sdk.modelbox" and original.package == "modelbox"
