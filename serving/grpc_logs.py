"""gRPC's own log output, as the command-line programs (reid-serve, reid-client, the health
probe) set it: each imports this module before anything that imports gRPC.

gRPC's C core writes some events at INFO to stderr, past Python's logging: each failed TLS
handshake as an ``I1207 ... ssl_transport_security.cc:2563] Handshake failed ...`` line (a TCP
health probe at a TLS port, a client without TLS or with another CA). A server logged one such
line per probe for as long as it ran, and ``--log-format json`` was no longer one object a line.
Unless ``GRPC_VERBOSITY`` is set, only gRPC's errors print; a failed handshake still reaches the
client as its call's error, which says why. The core reads the variable once, when gRPC is
imported, so it is set on import here. The client library does not import this: a library does
not change its host process's settings.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
