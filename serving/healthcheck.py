"""gRPC health probe: ``python -m serving.healthcheck [HOST:PORT] [--wait SECONDS] [--tls-ca CA ...]``.

Exit 0 when the server reports SERVING, 1 otherwise. Used by the serving image's HEALTHCHECK and
by scripts that wait for a server to come up. A server started with ``--tls-cert`` takes the probe
over TLS: ``--tls-ca`` (the CA that signed its certificate), with ``--tls-cert``/``--tls-key``
under mutual TLS, and ``--tls-server-name`` when the probe's address is not a name the
certificate holds (a container probing 127.0.0.1 with a certificate for reid.example.com).
"""
from __future__ import annotations

import serving.grpc_logs  # noqa: F401  first: sets gRPC's log level before gRPC is imported

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.security import SecurityError, read_certificates, read_key_pair
from serving.targets import check_target


def _channel(target: str, credentials: grpc.ChannelCredentials | None, server_name: str | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def is_serving(target: str, timeout: float = 2.0, credentials: grpc.ChannelCredentials | None = None,
               server_name: str | None = None) -> bool:
    with _channel(target, credentials, server_name) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(target: str, timeout: float = 120.0, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_serving(target, credentials=credentials, server_name=server_name):
            return True
        time.sleep(0.5)
    return False


def probe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default="127.0.0.1:50051")
    p.add_argument("--wait", type=float, default=0.0, help="keep trying this many seconds")
    p.add_argument("--tls-ca", type=Path, help="CA (PEM) that signed the server's certificate: probe over TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for a server under mutual TLS")
    p.add_argument("--tls-key", type=Path, help="the client certificate's key (PEM)")
    p.add_argument("--tls-server-name", help="the name to check the server's certificate against (default: the target's host)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = probe_parser()
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if (args.tls_cert or args.tls_server_name) and args.tls_ca is None:
        p.error("--tls-cert and --tls-server-name need --tls-ca")
    try:
        check_target(args.target)
    except ValueError as exc:  # else an unhealthy verdict, forever, with no word why
        p.error(str(exc))
    credentials = None
    if args.tls_ca is not None:
        try:
            ca = read_certificates(args.tls_ca, "--tls-ca")
            pair = read_key_pair(args.tls_cert, args.tls_key, "--tls-cert", "--tls-key") if args.tls_cert else (None, None)
        except SecurityError as exc:
            p.error(str(exc))
        credentials = grpc.ssl_channel_credentials(ca, *pair)
    if args.wait:
        ok = wait_serving(args.target, args.wait, credentials, args.tls_server_name)
    else:
        ok = is_serving(args.target, credentials=credentials, server_name=args.tls_server_name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
