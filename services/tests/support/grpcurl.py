#!/usr/bin/env python3
"""A stand-in for grpcurl in the tests (the Go tool cannot be installed on the build machines):
the subset docs/api.md uses, driven like grpcurl by server reflection and protobuf's JSON mapping.

    grpcurl -plaintext [-d JSON] [-max-time SECONDS] ADDR list [SERVICE]
    grpcurl -plaintext [-d JSON] [-max-time SECONDS] ADDR SERVICE/METHOD

Responses print as JSON (camelCase names, as grpcurl does); an RPC error prints grpcurl's
ERROR block and exits 64 + the gRPC code, as grpcurl does.
"""

import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def usage(msg: str) -> None:
    print(f"grpcurl (test stand-in): {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    data, max_time, rest = None, None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-plaintext":
            pass
        elif a == "-d":
            i += 1
            data = argv[i]
        elif a == "-max-time":
            i += 1
            max_time = float(argv[i])
        elif a.startswith("-"):
            usage(f"flag {a} is not supported")
        else:
            rest.append(a)
        i += 1
    if len(rest) < 2:
        usage("expected ADDR and a verb or method")
    addr, verb = rest[0], rest[1]
    channel = grpc.insecure_channel(addr)
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    if verb == "list":
        if len(rest) == 2:
            for s in sorted(db.get_services()):
                print(s)
        else:
            svc = pool.FindServiceByName(rest[2])
            for m in svc.methods:
                print(f"{svc.full_name}.{m.name}")
        return 0
    service, _, method = verb.replace("/", ".").rpartition(".")
    m = pool.FindServiceByName(service).FindMethodByName(method)
    req_cls = message_factory.GetMessageClass(m.input_type)
    resp_cls = message_factory.GetMessageClass(m.output_type)
    req = json_format.Parse(data or "{}", req_cls())
    path = f"/{service}/{method}"
    try:
        if getattr(m, "server_streaming", False):
            call = channel.unary_stream(
                path,
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
            for r in call(req, timeout=max_time):
                print(json_format.MessageToJson(r))
        else:
            call = channel.unary_unary(
                path,
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
            print(json_format.MessageToJson(call(req, timeout=max_time)))
    except grpc.RpcError as e:
        name = "".join(w.capitalize() for w in e.code().name.split("_"))
        print(f"ERROR:\n  Code: {name}\n  Message: {e.details()}", file=sys.stderr)
        return 64 + e.code().value[0]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
