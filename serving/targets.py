"""Server addresses as gRPC takes them (``host:port``, or a resolver's form: ``dns:///name:port``,
``ipv4:h:p,h:p``), checked before a channel is made. Kept apart from the clients so that the
health probe, run every few seconds, loads no more than it needs."""
from __future__ import annotations

import re


def check_target(target: str) -> None:
    """A URL given as the server's address (``http://host:50051``, as for a web service) reads to
    gRPC as a host name with slashes in it: the call failed later with "Misformatted domain name".
    gRPC targets are ``host:port`` or a resolver's ``scheme:`` form (``dns:///``, ``ipv4:``)."""
    scheme = re.match(r"(https?)://", target)
    if scheme:
        rest = target[scheme.end():].rstrip("/")
        tls = " (and --tls-ca / root_certificates= for TLS)" if scheme.group(1) == "https" else ""
        raise ValueError(f"server address {target!r} is a URL; give host:port, e.g. {rest}{tls}")


def port_missing(target: str) -> bool:
    """Whether ``target`` is a bare host, to which gRPC adds port 443 (reid-serve listens on 50051)."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target) and not re.match(r"[^:/]+:\d+$", target):  # dns:///, ipv4:, unix:
        return False
    if target.startswith("["):
        return "]:" not in target
    return ":" not in target
