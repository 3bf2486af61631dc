"""The modelbox.ModelStore protocol, built at import from a serialized descriptor.

``descriptor.py`` holds proto/modelbox.proto as a FileDescriptorProto (regenerate it
with scripts/gen_descriptor.py); ``modelbox.py`` turns it into message classes and a
``ModelStoreStub`` with protobuf and grpcio APIs that every supported version has, so
no generated code pins the runtime's versions.
"""
