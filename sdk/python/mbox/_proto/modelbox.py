"""Message classes and the ModelStore stub, built from descriptor.SERIALIZED.

Works with protobuf 4.21 through 7.x and grpcio 1.56 onwards: protoc's generated
code would check the runtime's versions and refuse older ones, so the SDK builds
what generated code would hold, at import, with long-standing APIs:

- ``DescriptorPool.AddSerializedFile`` into the default pool, after importing the
  well-known types, so ``google.protobuf.Value`` and ``Timestamp`` fields use the
  runtime's own ``struct_pb2`` / ``timestamp_pb2`` classes;
- ``message_factory.GetMessageClass`` (protobuf >= 4.22), or
  ``MessageFactory.GetPrototype`` where it is missing;
- ``channel.unary_unary(path, request_serializer=..., response_deserializer=...)``.

Every message of the proto is an attribute of this module (``modelbox.LogMetricsRequest``).
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import struct_pb2 as _struct_pb2  # noqa: F401 - registers the dependencies
from google.protobuf import timestamp_pb2 as _timestamp_pb2  # noqa: F401
from google.protobuf.internal import enum_type_wrapper

from . import descriptor as _descriptor

_pool = descriptor_pool.Default()
try:
    DESCRIPTOR = _pool.FindFileByName(_descriptor.FILE_NAME)
except KeyError:
    _pool.AddSerializedFile(_descriptor.SERIALIZED)
    DESCRIPTOR = _pool.FindFileByName(_descriptor.FILE_NAME)

if hasattr(message_factory, "GetMessageClass"):
    _message_class = message_factory.GetMessageClass
else:  # protobuf 4.21
    _message_class = message_factory.MessageFactory(_pool).GetPrototype

for _name, _desc in DESCRIPTOR.message_types_by_name.items():
    globals()[_name] = _message_class(_desc)
for _name, _desc in DESCRIPTOR.enum_types_by_name.items():
    globals()[_name] = enum_type_wrapper.EnumTypeWrapper(_desc)
    for _value in _desc.values:
        globals()[_value.name] = _value.number
del _name, _desc

_SERVICE = DESCRIPTOR.services_by_name["ModelStore"]


class ModelStoreStub:
    """A callable per RPC of modelbox.ModelStore, as protoc's gRPC plugin makes."""

    def __init__(self, channel):
        service = descriptor_pb2.ServiceDescriptorProto()
        _SERVICE.CopyToProto(service)  # streaming flags, in every protobuf version
        descriptors = {m.name: m for m in _SERVICE.methods}
        for method in service.method:
            request = _message_class(descriptors[method.name].input_type)
            response = _message_class(descriptors[method.name].output_type)
            make = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(method.client_streaming, method.server_streaming)]
            setattr(self, method.name, make(f"/{_descriptor.SERVICE}/{method.name}",
                                            request_serializer=request.SerializeToString,
                                            response_deserializer=response.FromString))
