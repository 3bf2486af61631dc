"""An in-process gRPC server that answers ModelStore RPCs with Python functions: for
testing what the SDK sends, whatever mboxd binary is at hand."""

from concurrent.futures import ThreadPoolExecutor

import grpc

from mbox._proto import modelbox as pb


class FakeModelStore:
    """handlers: RPC name -> fn(request, context) -> response message. Every request
    is recorded in `requests` as (name, request)."""

    def __init__(self, handlers):
        self.requests = []
        methods = {m.name: m for m in pb.DESCRIPTOR.services_by_name["ModelStore"].methods}
        rpc_handlers = {}
        for name, fn in handlers.items():
            method = methods[name]
            rpc_handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._recording(name, fn),
                request_deserializer=getattr(pb, method.input_type.name).FromString,
                response_serializer=getattr(pb, method.output_type.name).SerializeToString)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("modelbox.ModelStore",
                                                                                   rpc_handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.addr = f"127.0.0.1:{self.port}"
        self.server.start()

    def _recording(self, name, fn):
        def handle(request, context):
            self.requests.append((name, request))
            return fn(request, context)

        return handle

    def of(self, name):
        return [r for n, r in self.requests if n == name]

    def stop(self):
        self.server.stop(0)
