#!/usr/bin/env python3
"""Generate an image through the mulo gateway over gRPC.

The stubs come from the repository's proto files (see docs/api.md):

    mkdir -p examples/python/gen
    python -m grpc_tools.protoc -I proto --python_out=examples/python/gen \
        --grpc_python_out=examples/python/gen proto/mulo/v1/*.proto
    python examples/python/mulo_client.py --gateway localhost:50051 --prompt "red apple" --out apple.png
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

import grpc  # noqa: E402
from mulo.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateway", default="localhost:50051", help="gateway host:port")
    ap.add_argument("--prompt", required=True, help="what to draw (free text)")
    ap.add_argument("--method", default="mulo", help='decoding method, e.g. "ar", "mulo:tau=0.05"')
    ap.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    ap.add_argument("--out", default="out.png", help="PNG file to write")
    ap.add_argument("--stream", action="store_true", help="report each committed block")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    ap.add_argument("--ca-cert", help="PEM CA of the gateway's TLS certificate (TLS; default: plaintext)")
    ap.add_argument(
        "--token",
        default=os.environ.get("MULO_TOKEN"),
        help="bearer token for a gateway with --auth-tokens (default: $MULO_TOKEN)",
    )
    args = ap.parse_args()
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None

    request = gateway_pb2.GenerateRequest(
        condition=common_pb2.Condition(prompt=args.prompt),
        method=args.method,
        seed=args.seed,
    )
    if args.ca_cert:
        with open(args.ca_cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(args.gateway, creds)
    else:
        channel = grpc.insecure_channel(args.gateway)
    with channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        try:
            if args.stream:
                response = None
                for event in gateway.GenerateStream(request, timeout=args.timeout, metadata=metadata):
                    if event.HasField("block"):
                        b = event.block
                        print(f"{b.committed}/{b.total} tokens", file=sys.stderr)
                    else:
                        response = event.done
            else:
                response = gateway.Generate(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as e:
            # INVALID_ARGUMENT names the bad field; RESOURCE_EXHAUSTED means retry later;
            # UNAUTHENTICATED: no or a wrong --token.
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if response is None:
        print("error: the stream ended without a result", file=sys.stderr)
        return 1
    with open(args.out, "wb") as f:
        f.write(response.png)
    s = response.stats
    print(
        f"{args.out}: {response.grid.rows}x{response.grid.cols} tokens by {s.method}, "
        f"{s.target_passes} target passes, {s.accepted}/{s.proposed} proposals accepted, "
        f"{s.seconds:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
