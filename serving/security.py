"""Transport security and token authentication for reid-serve.

- TLS with ``--tls-cert/--tls-key``; mutual TLS when ``--tls-client-ca`` is given (clients must
  present a certificate signed by that CA).
- Bearer tokens (``authorization: Bearer TOKEN`` metadata) from a file (``--tokens-file``, one
  ``TOKEN ROLE`` per line) or an environment variable (``--tokens-env VAR``: ``TOKEN:ROLE,...``).
  Role ``read`` may embed, search and list entries; ``write`` may also change galleries and list
  the stored embeddings (a gallery's biometric templates: what backups and moves need, and more
  than a searching client should hold). Tokens are compared in constant time against every known
  token. Health checks and reflection stay open.
- Plaintext is allowed on loopback; on any other address it needs ``--insecure`` and logs a warning.
- Both rotate without a restart: the certificate, key and client CA files, and the tokens file,
  are read again when they change (looked at at most once a second), so that cert-manager's
  renewals and a Kubernetes secret's updates take effect. Files that no longer hold a valid set
  (written half, a new certificate beside the old key) keep the one in use, with a warning.
"""
from __future__ import annotations

import base64
import datetime
import hmac
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

ROLES = ("read", "write")
WRITE_METHODS = {"CreateGallery", "DropGallery", "AddToGallery", "RemoveFromGallery"}
# Methods that decide part of the answer by the caller's role, read from CALLER_ROLE (only these
# pay for setting it: Embed stays as light as it was).
ROLE_AWARE_METHODS = {"ListEntries"}
SERVICE_PREFIX = "/reid.v1.ReIdentification/"
# The role of the token the current call presented; "write" where the server has no tokens. Only
# the methods in ROLE_AWARE_METHODS get it set: read elsewhere, it would say "write" to any token.
CALLER_ROLE: ContextVar[str] = ContextVar("caller_role", default="write")


class SecurityError(ValueError):
    """Bad security configuration; reid-serve reports it in one line."""


def parse_tokens(lines: list[str], source: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(":", " ").split()
        if len(parts) != 2 or parts[1] not in ROLES:
            raise SecurityError(f"{source}: entry {n} must be 'TOKEN read' or 'TOKEN write'")
        if len(parts[0]) < 16:
            raise SecurityError(f"{source}: entry {n}: tokens must be at least 16 characters")
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise SecurityError(f"{source} holds no tokens")
    return tokens


def read_tokens_file(path: Path) -> dict[str, str]:
    """The tokens of a ``--tokens-file``. A byte-order mark (Windows editors write one) is not part
    of the first token: kept, it made that token one no client could present."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SecurityError(f"cannot read tokens file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecurityError(f"tokens file {path} is not UTF-8 text") from None
    return parse_tokens(text.splitlines(), str(path))


def env_tokens(variable: str) -> dict[str, str]:
    """The tokens of a ``--tokens-env`` variable (``TOKEN:ROLE,...``)."""
    value = os.environ.get(variable)
    if not value:
        raise SecurityError(f"environment variable {variable} is not set")
    return parse_tokens(value.split(","), f"${variable}")


# How often, at most, the server looks whether its certificate or tokens files changed.
RELOAD_CHECK_SECONDS = 1.0


class FileWatch:
    """Whether some files changed since the last look, looking at most once per ``every`` seconds,
    so that a caller may ask on every call. A change is a new modification time, inode, device or
    size: an editor or cert-manager writes a file anew, a Kubernetes secret volume swaps the
    symbolic link the files are reached through."""

    def __init__(self, paths: Iterable[Path], every: float | None = None):
        self.paths = tuple(paths)
        self.every = RELOAD_CHECK_SECONDS if every is None else every
        self._seen = self._signature()
        self._next = time.monotonic() + self.every

    def _signature(self) -> tuple:
        out = []
        for path in self.paths:
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_ino, st.st_dev, st.st_size))
            except OSError:  # gone for now (mid-swap): a change, looked at again later
                out.append(None)
        return tuple(out)

    def changed(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every
        signature = self._signature()
        if signature == self._seen:
            return False
        self._seen = signature
        return True


class TokenTable:
    """The tokens a server takes: ``fixed`` ones (given in code, or by ``--tokens-env``) and those
    of ``path`` (``--tokens-file``), read again when the file changes so that tokens rotate
    without a restart. A file that no longer reads as tokens (written half, emptied) keeps the
    tokens in use, with a warning: refusing every caller for a typo would be an outage.
    ``on_reload(ok)`` hears of each reload (the server counts them in its metrics)."""

    def __init__(self, fixed: dict[str, str], path: Path | None = None,
                 on_reload: Callable[[bool], None] | None = None):
        self._fixed = dict(fixed)
        self._path = path
        self._watch = FileWatch([path]) if path else None
        self._on_reload = on_reload
        self._entries = self._combined(read_tokens_file(path) if path else {})

    def _combined(self, from_file: dict[str, str]) -> list[tuple[bytes, str]]:
        return [(token.encode(), role) for token, role in {**from_file, **self._fixed}.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[tuple[bytes, str]]:
        """(token, role) pairs, after reading the file again if it changed."""
        if self._watch is not None and self._watch.changed():
            try:
                self._entries = self._combined(read_tokens_file(self._path))
            except SecurityError as exc:
                log.warning("kept the %d tokens in use: %s (read again when the file changes)", len(self._entries), exc)
                ok = False
            else:
                log.info("tokens reloaded from %s: %d token(s)", self._path, len(self._entries))
                ok = True
            if self._on_reload is not None:
                self._on_reload(ok)
        return self._entries


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None,
                       on_reload: Callable[[bool], None] | None = None,
                       on_certificate: Callable[[float], None] | None = None):
    """``grpc.ServerCredentials`` for TLS (mutual when ``client_ca``), or None for plaintext.

    The files are checked here, each named where it is wrong: gRPC finds out only when the port is
    bound, and then logs "Unable to create secure server with credentials of type Ssl" and fails
    the bind, which read as a port already taken. They are read again when they change
    (``_CertificateFiles``); ``on_reload(ok)`` hears of each time, and ``on_certificate(not_after)``
    of each certificate taken (its expiry, in seconds since the epoch)."""
    if not cert and not key:
        if client_ca:
            raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise SecurityError("TLS needs both --tls-cert and --tls-key")
    files = _CertificateFiles(cert, key, client_ca, on_reload, on_certificate)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch, require_client_authentication=client_ca is not None)


class _CertificateFiles:
    """The server's certificate configuration, read again from its files when they change.

    gRPC asks ``fetch`` before each TLS handshake, on its own threads: it answers a new
    configuration once the files changed and hold a valid set, else None (keep the one in use).
    A renewal seen half done (the new certificate beside the old key) keeps the old set, with a
    warning, and is read again when the rest arrives."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None, on_reload: Callable[[bool], None] | None,
                 on_certificate: Callable[[float], None] | None):
        self._files = (cert, key, client_ca)
        self._watch = FileWatch([p for p in self._files if p])
        self._on_reload = on_reload
        self._on_certificate = on_certificate
        self._lock = threading.Lock()  # handshakes on several gRPC threads ask at once
        self.initial = self._configuration()

    def _configuration(self):
        cert, key, client_ca = self._files
        private_key, chain = read_key_pair(cert, key, "--tls-cert", "--tls-key")
        root = read_certificates(client_ca, "--tls-client-ca") if client_ca else None
        if (_read(key, "--tls-key"), _read(cert, "--tls-cert")) != (private_key, chain):
            # checked by path: the bytes read before must be the ones checked
            raise SecurityError(f"{cert} or {key} changed while being read")
        not_after = certificate_not_after(chain)
        if not_after is not None:
            _warn_of_expiry(cert, not_after)
            if self._on_certificate is not None:
                self._on_certificate(not_after)
        return grpc.ssl_server_certificate_configuration([(private_key, chain)], root_certificates=root)

    def fetch(self):
        try:
            with self._lock:
                if not self._watch.changed():
                    return None
                try:
                    configuration = self._configuration()
                except SecurityError as exc:
                    log.warning("kept the TLS certificate in use: %s (read again when the files change)", exc)
                    configuration = None
                else:
                    log.info("TLS certificate reloaded from %s", self._files[0])
            if self._on_reload is not None:
                self._on_reload(configuration is not None)
            return configuration
        except Exception:  # raised into gRPC's C core, it would fail the handshake without a word
            log.exception("cannot look at the TLS files again; the certificate in use stays")
            return None


# A certificate that expires sooner than this is named in the log at start and at each reload.
EXPIRY_WARNING_DAYS = 14


def _warn_of_expiry(cert: Path, not_after: float) -> None:
    left = not_after - time.time()
    when = datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if left <= 0:
        log.warning("the TLS certificate %s expired on %s: clients will refuse it; renew it (the server reads it "
                    "again when it changes)", cert, when)
    elif left < EXPIRY_WARNING_DAYS * 86400:
        log.warning("the TLS certificate %s expires on %s, in %.1f days; renew it (the server reads it again when "
                    "it changes)", cert, when, left / 86400)


def certificate_not_after(pem: bytes) -> float | None:
    """When the first certificate of a PEM chain (the server's own) expires, in seconds since the
    epoch; None where it cannot be read (the TLS library has accepted the file by then, so this
    is for the log and the metrics only). X.509 in DER: Certificate = SEQUENCE { tbsCertificate =
    SEQUENCE { [0] version (optional), serialNumber, signature, issuer, validity = SEQUENCE {
    notBefore, notAfter }, ... }, ... } (RFC 5280, 4.1)."""
    try:
        body = pem.split(b"-----BEGIN CERTIFICATE-----", 1)[1].split(b"-----END CERTIFICATE-----", 1)[0]
        der = base64.b64decode(b"".join(body.split()))
        _, start, _ = _der_item(der, 0)  # into Certificate
        _, at, _ = _der_item(der, start)  # into tbsCertificate
        if der[at] == 0xA0:  # explicit version tag
            at = _der_item(der, at)[2]
        for _ in range(3):  # serialNumber, signature, issuer
            at = _der_item(der, at)[2]
        _, at, _ = _der_item(der, at)  # into validity
        at = _der_item(der, at)[2]  # past notBefore
        tag, start, end = _der_item(der, at)
        text = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280, 4.1.2.5.1)
            text = ("19" if int(text[:2]) >= 50 else "20") + text
        elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
            return None
        moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    except (IndexError, ValueError):
        return None


def _der_item(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER item at ``at``."""
    tag, length, at = der[at], der[at + 1], at + 2
    if length & 0x80:
        count = length & 0x7F
        length, at = int.from_bytes(der[at : at + count], "big"), at + count
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {flag} {path}: {exc.strerror}") from None


def read_certificates(path: Path, flag: str) -> bytes:
    """The PEM certificate(s) in ``path``, given as ``flag``. A file that holds none is one line
    naming the flag, for servers and clients alike: gRPC itself fails later and vaguely (a client
    given a key as its CA: "Failed to create security handshaker")."""
    data = _read(path, flag)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError):  # ValueError: empty, or not text
        held = " (it holds a private key)" if b"PRIVATE KEY" in data else ""
        raise SecurityError(f"{flag} {path} holds no PEM certificate{held}") from None
    return data


TLS_CA_ENV = "REID_TLS_CA"  # the clients' CA when no --tls-ca is given (reid-client, evaluation through a server)
# ... and their client pair (mutual TLS) and the name to check the server's certificate against
TLS_CLIENT_ENV = {"cert": "REID_TLS_CERT", "key": "REID_TLS_KEY", "server_name": "REID_TLS_SERVER_NAME"}


def client_ca(given: str | Path | None = None) -> bytes | None:
    """The CA a client verifies the server with: ``given`` (its --tls-ca), else the file $REID_TLS_CA
    names, else None (plaintext)."""
    if given:
        return read_certificates(Path(given), "--tls-ca")
    named = os.environ.get(TLS_CA_ENV)
    return read_certificates(Path(named), f"${TLS_CA_ENV}") if named else None


def client_tls(ca: str | None = None, cert: str | None = None, key: str | None = None,
               server_name: str | None = None) -> dict:
    """The TLS keyword arguments of the Python clients (``root_certificates``, ``client_cert``,
    ``client_key``, ``tls_server_name``) from reid-client's flags, each else its environment
    variable ($REID_TLS_CA, $REID_TLS_CERT, $REID_TLS_KEY, $REID_TLS_SERVER_NAME), so that
    ``reid evaluate evaluate.server=`` reaches the servers reid-client reaches. Empty without TLS."""
    cert = cert or os.environ.get(TLS_CLIENT_ENV["cert"])
    key = key or os.environ.get(TLS_CLIENT_ENV["key"])
    server_name = server_name or os.environ.get(TLS_CLIENT_ENV["server_name"])
    if bool(cert) != bool(key):
        raise SecurityError("--tls-cert and --tls-key ($REID_TLS_CERT and $REID_TLS_KEY) go together")
    root = client_ca(ca)
    if root is None and (cert or server_name):
        raise SecurityError("--tls-cert and --tls-server-name need TLS: give --tls-ca (or set REID_TLS_CA)")
    if root is None:
        return {}
    private_key, chain = read_key_pair(Path(cert), Path(key), "--tls-cert", "--tls-key") if cert else (None, None)
    return {"root_certificates": root, "client_cert": chain, "client_key": private_key, "tls_server_name": server_name}


def read_key_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> tuple[bytes, bytes]:
    """(private key, certificate chain), as gRPC takes them, once ``key`` is found to be the
    unencrypted PEM private key of the certificate in ``cert`` (Python's ssl reads the same PEM
    files as gRPC)."""
    chain = read_certificates(cert, cert_flag)
    private_key = _read(key, key_flag)
    try:  # a password callback that gives none: an encrypted key fails here instead of prompting on the terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise SecurityError(f"{key_flag} {key} is not the private key of {cert_flag} {cert}") from None
        raise SecurityError(f"{key_flag} {key} is not an unencrypted PEM private key") from None
    return private_key, chain


def check_bind(host: str, tls: bool, insecure: bool) -> None:
    if tls or is_loopback(host):
        return
    if not insecure:
        raise SecurityError(f"refusing plaintext on {host}: give --tls-cert/--tls-key, or --insecure to serve "
                            "unencrypted beyond localhost")
    log.warning("serving PLAINTEXT on %s (--insecure): anyone on the network can read and send requests", host)


def _abort(code: grpc.StatusCode, message: str):
    async def handler(request_or_iterator, context):
        await context.abort(code, message)

    return handler


def _with_role(handler, role: str):
    """``handler`` (unary) with CALLER_ROLE set to ``role`` while it runs."""
    inner = handler.unary_unary

    async def behaviour(request, context):
        token = CALLER_ROLE.set(role)
        try:
            return await inner(request, context)
        finally:
            CALLER_ROLE.reset(token)

    return grpc.unary_unary_rpc_method_handler(behaviour, handler.request_deserializer, handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token check per call; read tokens may not call gallery-changing methods."""

    def __init__(self, tokens: TokenTable, on_refused: Callable[[str, grpc.StatusCode], None] | None = None):
        """``on_refused(method, code)`` hears of each call refused here (the server counts them in
        its metrics: they never reach the service, and a client with a stale token went unseen)."""
        self._tokens = tokens
        self._on_refused = on_refused

    def _role(self, presented: str) -> str | None:
        given = presented.encode()
        found = None
        for token, role in self._tokens.entries():  # no early exit: time does not depend on which token matched
            if hmac.compare_digest(given, token):
                found = role
        return found

    async def intercept_service(self, continuation, details):
        method = details.method
        if not method.startswith(SERVICE_PREFIX):
            return await continuation(details)  # health and reflection stay open
        name = method[len(SERVICE_PREFIX):]
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        role = self._role(header[7:]) if header.startswith("Bearer ") else None
        handler = await continuation(details)
        if handler is None:
            return None
        if role is None:
            code, message = grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        elif name in WRITE_METHODS and role != "write":
            code, message = grpc.StatusCode.PERMISSION_DENIED, "this token may read (embed, search) but not change galleries"
        elif name in ROLE_AWARE_METHODS:
            return _with_role(handler, role)
        else:
            return handler
        if self._on_refused is not None:
            self._on_refused(name, code)
        failure = _abort(code, message)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(failure, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(failure, handler.request_deserializer, handler.response_serializer)
