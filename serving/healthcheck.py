"""gRPC health probe: ``python -m serving.healthcheck [HOST:PORT] [--wait SECONDS]``.

Exit 0 when the server reports SERVING, 1 otherwise. Used by the serving image's HEALTHCHECK and
by scripts that wait for a server to come up.
"""
from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(target: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(target: str, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_serving(target):
            return True
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("target", nargs="?", default="127.0.0.1:50051")
    p.add_argument("--wait", type=float, default=0.0, help="keep trying this many seconds")
    args = p.parse_args(argv)
    ok = wait_serving(args.target, args.wait) if args.wait else is_serving(args.target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
