"""TLS, mutual TLS and token authentication with read/write permissions."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.gallery import FaissGalleryStore
from serving.client import GalleryClient, ReidClient
from serving.engines.onnxruntime import OnnxRuntimeEngine
from serving.security import (SecurityError, certificate_not_after, check_bind, env_tokens, parse_tokens, read_tokens_file,
                              server_credentials)
from serving.server import ServerConfig
from tests.serving_support import ServerThread

READ, WRITE = "r" * 24, "w" * 24
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem",
            "-days", "2", "-extfile", f"{name}.ext")
    return d


def _image():
    return np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)


def test_tls_and_mutual_tls(tiny_onnx, pki):
    engine = OnnxRuntimeEngine(tiny_onnx)
    ca = (pki / "ca.pem").read_bytes()
    config = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    with ServerThread(engine, config) as s:
        with ReidClient(s.target, root_certificates=ca) as c:
            assert c.embed([_image()])[0].ok
        with ReidClient(s.target, timeout=3) as plain, pytest.raises(grpc.RpcError):
            plain.embed([_image()])  # a plaintext client cannot talk to a TLS port
    mtls = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
    with ServerThread(engine, mtls) as s:
        with ReidClient(s.target, root_certificates=ca, client_cert=(pki / "client.pem").read_bytes(),
                        client_key=(pki / "client.key").read_bytes()) as c:
            assert c.embed([_image()])[0].ok
        with ReidClient(s.target, root_certificates=ca, timeout=3) as no_cert, pytest.raises(grpc.RpcError):
            no_cert.embed([_image()])


def test_the_health_probe_speaks_tls(tiny_onnx, pki, capsys):
    from serving.healthcheck import main as probe

    tls = [f"--tls-ca={pki / 'ca.pem'}"]
    client = [f"--tls-cert={pki / 'client.pem'}", f"--tls-key={pki / 'client.key'}"]
    config = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
    with ServerThread(OnnxRuntimeEngine(tiny_onnx), config) as s:
        assert probe([s.target, *tls, *client]) == 0
        assert probe([s.target, *tls, *client, "--tls-server-name", "localhost"]) == 0  # a name the certificate holds
        assert probe([s.target, *tls, *client, "--tls-server-name", "elsewhere.example"]) == 1
        assert probe([s.target, *tls]) == 1  # mutual TLS: no client certificate
        assert probe([s.target]) == 1  # plaintext
    for bad, message in [([*tls, client[0]], "--tls-cert and --tls-key go together"),
                         (["--tls-server-name", "x"], "--tls-server-name need --tls-ca"),
                         (["--tls-ca", "/nonexistent/ca.pem"], "cannot read --tls-ca /nonexistent/ca.pem"),
                         ([f"--tls-ca={pki / 'ca.key'}"], f"--tls-ca {pki / 'ca.key'} holds no PEM certificate (it holds a private key)"),
                         ([*tls, client[0], f"--tls-key={pki / 'server.key'}"],
                          f"--tls-key {pki / 'server.key'} is not the private key of --tls-cert {pki / 'client.pem'}")]:
        with pytest.raises(SystemExit) as exit_:
            probe(["127.0.0.1:1", *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_reid_client_says_when_tls_is_on_one_side_only(tiny_onnx, pki, capsys):
    """gRPC reports a plaintext client at a TLS port as "Socket closed", and a TLS client at a
    plaintext port as an SSL WRONG_VERSION_NUMBER: reid-client adds what to change."""
    from serving.client_cli import client_main

    engine = OnnxRuntimeEngine(tiny_onnx)
    tls = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    for config, flags, hint in [(tls, [], "(if the server serves TLS, give --tls-ca)"),
                                (ServerConfig(port=0), ["--tls-ca", str(pki / "ca.pem")],
                                 "(the server speaks plaintext: leave out --tls-ca and REID_TLS_CA)")]:
        with ServerThread(engine, config) as s:
            capsys.readouterr()
            # 127.0.0.1: "localhost" also names ::1, where nothing listens, and its refusal can be the error reported
            assert client_main(["--server", s.target, "--timeout", "5", *flags, "galleries"]) == 1
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith("reid-client: error: UNAVAILABLE: ") and err.endswith(hint), err


def test_clients_take_the_ca_and_token_from_the_environment(tiny_onnx, pki, tmp_path, synthetic_root, monkeypatch, capsys):
    """reid-client and `reid evaluate evaluate.server=` reach a server with TLS and tokens through
    REID_TLS_CA and REID_TOKEN (evaluation through such a server could not connect at all); a CA
    file that holds no certificate is one line naming it, not gRPC's "Failed to create security
    handshaker" at the first call."""
    import json

    from serving.client_cli import client_main
    from tests.conftest import quick_overrides
    from training.cli import main as reid_main

    config = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tokens={WRITE: "write"})
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), config)
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    with thread as s:
        target = s.target  # 127.0.0.1, an address the certificate holds
        monkeypatch.setenv("REID_TLS_CA", str(pki / "ca.pem"))
        monkeypatch.setenv("REID_TOKEN", WRITE)
        assert client_main(["--server", target, "galleries"]) == 0
        overrides = quick_overrides(synthetic_root, tmp_path / "eval")
        assert reid_main(["evaluate", *overrides, f"evaluate.server={target}"]) == 0
        report = json.loads((tmp_path / "eval" / "evaluate" / "results.json").read_text())
        assert 0 < report["results"]["without re-ranking"]["mAP"] <= 1
        monkeypatch.setenv("REID_TLS_CA", str(pki / "ca.key"))
        capsys.readouterr()
        assert client_main(["--server", target, "galleries"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"reid-client: error: $REID_TLS_CA {pki / 'ca.key'} holds no PEM certificate (it holds a private key)")
        assert reid_main(["evaluate", *overrides, f"evaluate.server={target}"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"reid evaluate: error: $REID_TLS_CA {pki / 'ca.key'} holds no PEM certificate (it holds a private key)")


def test_reid_client_reaches_a_mutual_tls_server_and_checks_the_name_it_is_told(tiny_onnx, pki, tmp_path, monkeypatch, capsys,
                                                                               synthetic_root):
    """reid-client had no client certificate options, so it could not call a server started with
    --tls-client-ca, nor one called by an address its certificate does not hold; nor could
    `reid evaluate evaluate.server=`, which takes the same settings from the environment."""
    from serving.client_cli import client_main
    from tests.conftest import quick_overrides
    from training.cli import main as reid_main

    monkeypatch.delenv("REID_TLS_CA", raising=False)
    config = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), config)
    thread.server.store = FaissGalleryStore(tmp_path)
    with thread as s:
        tls = ["--server", s.target, "--tls-ca", str(pki / "ca.pem"), "--timeout", "5"]
        pair = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
        assert client_main([*tls, "galleries"]) == 1  # no client certificate: the handshake fails
        assert capsys.readouterr().err.strip().endswith(
            "(if the server wants a client certificate, mutual TLS, give --tls-cert and --tls-key)")
        assert client_main([*tls, *pair, "galleries"]) == 0
        assert client_main([*tls, *pair, "--tls-server-name", "localhost", "galleries"]) == 0  # a name the certificate holds
        capsys.readouterr()
        assert client_main([*tls, *pair, "--tls-server-name", "elsewhere.example", "galleries"]) == 1
        assert capsys.readouterr().err.strip().endswith("(the server's certificate does not hold the name called: call it "
                                                        "by a name it holds, or give --tls-server-name)")
        for argv, message in [([*tls, "--tls-cert", str(pki / "client.pem"), "galleries"], "--tls-cert and --tls-key"),
                              (["--server", s.target, *pair, "galleries"], "--tls-cert and --tls-server-name need TLS: give --tls-ca"),
                              ([*tls, "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "server.key"), "galleries"],
                               "is not the private key of --tls-cert")]:
            assert client_main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("reid-client: error: ") and message in err, err
        for name, value in [("REID_TLS_CA", "ca.pem"), ("REID_TLS_CERT", "client.pem"), ("REID_TLS_KEY", "client.key"),
                            ("REID_TLS_SERVER_NAME", "localhost")]:
            monkeypatch.setenv(name, str(pki / value) if "." in value and name != "REID_TLS_SERVER_NAME" else value)
        assert client_main(["--server", s.target, "galleries"]) == 0
        overrides = quick_overrides(synthetic_root, tmp_path / "eval")
        assert reid_main(["evaluate", *overrides, f"evaluate.server={s.target}"]) == 0
        monkeypatch.delenv("REID_TLS_KEY")
        assert client_main(["--server", s.target, "galleries"]) == 2
        assert capsys.readouterr().err.strip().endswith("--tls-cert and --tls-key ($REID_TLS_CERT and $REID_TLS_KEY) go together")


def test_reid_client_says_what_is_wrong_with_its_token(tiny_onnx, tmp_path, monkeypatch, capsys):
    from serving.client_cli import client_main

    monkeypatch.delenv("REID_TOKEN", raising=False)
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, tokens={READ: "read", WRITE: "write"}))
    thread.server.store = FaissGalleryStore(tmp_path)
    with thread as s:
        for token, hint in [([], "(the server wants a token: give --token or set REID_TOKEN)"),
                            (["--token", "x" * 24], "(the server does not know this token: check --token or REID_TOKEN)")]:
            assert client_main(["--server", s.target, "galleries", *token]) == 1
            assert capsys.readouterr().err.strip() == (
                f"reid-client: error: UNAUTHENTICATED: missing or invalid bearer token {hint}")
        assert client_main(["--server", s.target, "--token", READ, "create", "g"]) == 1
        assert capsys.readouterr().err.strip().endswith("(this is a read token: changes need a write token)")


def test_tokens_separate_read_and_write(tiny_onnx, tmp_path):
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, tokens={READ: "read", WRITE: "write"}))
    thread.server.store = FaissGalleryStore(tmp_path)
    with thread as s:
        with ReidClient(s.target) as anonymous, pytest.raises(grpc.RpcError) as err:
            anonymous.embed([_image()])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ReidClient(s.target, token="x" * 24) as wrong, pytest.raises(grpc.RpcError) as err:
            wrong.embed([_image()])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ReidClient(s.target, token=READ) as reader:
            assert reader.embed([_image()])[0].ok
        with GalleryClient(s.target, token=READ) as reader, pytest.raises(grpc.RpcError) as err:
            reader.create("g")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with GalleryClient(s.target, token=WRITE) as writer:
            writer.create("g")
            writer.add("g", embeddings=np.ones((1, 32)))
        with GalleryClient(s.target, token=READ) as reader:
            assert reader.search("g", embeddings=np.ones((1, 32)), top_k=1)[0].hits[0].id == 1
            assert [e.id for e in reader.entries("g")] == [1]
            with pytest.raises(grpc.RpcError) as err:  # a gallery's biometric templates: not for readers
                list(reader.entries("g", include_embeddings=True))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "write token" in err.value.details()
        with GalleryClient(s.target, token=WRITE) as writer:
            assert [len(e.embedding.values) for e in writer.entries("g", include_embeddings=True)] == [32]
        # refused by the token check, before the service: counted too (a client with a stale token went unseen)
        assert s.metrics.value("reid_requests_total", method="Embed", code="UNAUTHENTICATED") == 2
        assert s.metrics.value("reid_requests_total", method="CreateGallery", code="PERMISSION_DENIED") == 1
        assert s.metrics.value("reid_errors_total", code="UNAUTHENTICATED") == 2
        # health stays open without a token
        status = health_pb2_grpc.HealthStub(grpc.insecure_channel(s.target)).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _embeds(target: str, **tls) -> str:
    """"ok", or the code a fresh connection's call fails with (a new TLS handshake each time)."""
    try:
        with ReidClient(target, timeout=3, **tls) as client:
            return "ok" if client.embed([_image()])[0].ok else "image failed"
    except grpc.RpcError as exc:
        return exc.code().name


def test_a_renewed_certificate_is_served_without_a_restart(tiny_onnx, pki, tmp_path, monkeypatch, caplog):
    """cert-manager renews certificates every few weeks: the server read its files once, kept
    serving the old certificate until it expired, and every client then failed its handshake."""
    monkeypatch.setattr("serving.security.RELOAD_CHECK_SECONDS", 0.05)
    run = functools.partial(subprocess.run, cwd=tmp_path, check=True, capture_output=True)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca2.key", "-out", "ca2.pem", "-days", "2",
         "-subj", "/CN=test-ca-2"])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "new.key", "-out", "new.csr", "-subj", "/CN=server"])
    run(["openssl", "x509", "-req", "-in", "new.csr", "-CA", "ca2.pem", "-CAkey", "ca2.key", "-CAcreateserial", "-out",
         "new.pem", "-days", "2", "-extfile", str(pki / "server.ext")])
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "server.pem", cert)
    shutil.copy(pki / "server.key", key)
    old_ca, new_ca = {"root_certificates": (pki / "ca.pem").read_bytes()}, {"root_certificates": (tmp_path / "ca2.pem").read_bytes()}
    with ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key))) as s:
        assert s.metrics.registry.get_sample_value(  # there at 0 from the start, for alerts on its rise
            "reid_credential_reloads_total", {"credential": "tls", "outcome": "refused"}) == 0.0
        assert (_embeds(s.target, **old_ca), _embeds(s.target, **new_ca)) == ("ok", "UNAVAILABLE")
        shutil.copy(tmp_path / "new.pem", cert)  # half a renewal: the new certificate beside the old key
        time.sleep(0.1)
        assert _embeds(s.target, **old_ca) == "ok"  # the old pair stays
        assert "kept the TLS certificate in use" in caplog.text and "is not the private key of" in caplog.text
        shutil.copy(tmp_path / "new.key", key)
        time.sleep(0.1)
        assert (_embeds(s.target, **new_ca), _embeds(s.target, **old_ca)) == ("ok", "UNAVAILABLE")
        assert s.metrics.value("reid_credential_reloads_total", credential="tls", outcome="refused") == 1
        assert s.metrics.value("reid_credential_reloads_total", credential="tls", outcome="loaded") == 1
        assert s.metrics.value("reid_tls_certificate_expiry_timestamp_seconds") == _not_after(tmp_path / "new.pem")


def _not_after(pem) -> float:
    """The certificate's expiry as openssl reads it."""
    import email.utils

    end = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-enddate"], capture_output=True, text=True,
                         check=True).stdout.strip().split("=", 1)[1]
    return email.utils.parsedate_to_datetime(end.replace("GMT", "+0000")).timestamp()


def test_the_certificates_expiry_is_logged_when_near_and_exported(tiny_onnx, pki, tmp_path, caplog, capsys, monkeypatch):
    """Nothing said when the served certificate would expire: clients found out by failing, with
    gRPC's CERTIFICATE_VERIFY_FAILED and nothing more."""
    from serving.client_cli import client_main

    monkeypatch.delenv("REID_TLS_CA", raising=False)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "far.key", "-out", "far.pem",
                    "-days", "12000", "-subj", "/CN=far"], cwd=tmp_path, check=True, capture_output=True)
    far = tmp_path / "far.pem"  # past 2049: its expiry is a GeneralizedTime, not a UTCTime
    for pem in (pki / "server.pem", far):
        assert certificate_not_after(pem.read_bytes()) == _not_after(pem)
    assert certificate_not_after((pki / "server.pem").read_bytes() + far.read_bytes()) == _not_after(pki / "server.pem")
    assert certificate_not_after(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n") is None
    config = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    with ServerThread(OnnxRuntimeEngine(tiny_onnx), config) as s:  # the test certificates last 2 days
        assert s.metrics.value("reid_tls_certificate_expiry_timestamp_seconds") == _not_after(pki / "server.pem")
    assert re.search(rf"the TLS certificate {re.escape(str(pki / 'server.pem'))} expires on \S+ \S+ UTC, in [12]\.\d days",
                     caplog.text)
    caplog.clear()
    config = ServerConfig(port=0, tls_cert=str(far), tls_key=str(tmp_path / "far.key"))
    with ServerThread(OnnxRuntimeEngine(tiny_onnx), config) as s:
        assert client_main(["--server", s.target, "--tls-ca", str(pki / "ca.pem"), "--timeout", "5", "galleries"]) == 1
        assert capsys.readouterr().err.strip().endswith(
            f"(the server's certificate is not signed by the CA in {pki / 'ca.pem'}: give the CA that signed it as --tls-ca)")
    assert "expire" not in caplog.text
    run = functools.partial(subprocess.run, cwd=tmp_path, check=True, capture_output=True)
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "old.key", "-out", "old.csr", "-subj", "/CN=server"])
    run(["openssl", "x509", "-req", "-in", "old.csr", "-CA", str(pki / "ca.pem"), "-CAkey", str(pki / "ca.key"),
         "-CAcreateserial", "-out", "old.pem", "-days", "-1", "-extfile", str(pki / "server.ext")])  # expired yesterday
    config = ServerConfig(port=0, tls_cert=str(tmp_path / "old.pem"), tls_key=str(tmp_path / "old.key"))
    with ServerThread(OnnxRuntimeEngine(tiny_onnx), config) as s:
        assert client_main(["--server", s.target, "--tls-ca", str(pki / "ca.pem"), "--timeout", "5", "galleries"]) == 1
        assert capsys.readouterr().err.strip().endswith(
            "(the server's certificate has expired: renew it; reid-serve reads it again when it changes)")
    assert f"the TLS certificate {tmp_path / 'old.pem'} expired on " in caplog.text


def test_a_changed_tokens_file_takes_effect_without_a_restart(tiny_onnx, tmp_path, monkeypatch, caplog):
    """Rotating a token meant restarting every server. The file sits behind symbolic links as a
    Kubernetes secret volume places it, and changes as such a volume changes: by a new folder and a
    swapped link. Tokens from --tokens-env stay; a file that no longer reads keeps the tokens in use."""
    monkeypatch.setattr("serving.security.RELOAD_CHECK_SECONDS", 0.05)
    fixed, first, second = "f" * 20, "1" * 20, "2" * 20

    def publish(version: str, text: str) -> None:  # what the kubelet does: a new folder, then one rename
        (tmp_path / version).mkdir()
        (tmp_path / version / "tokens").write_text(text)
        (tmp_path / "..data_tmp").symlink_to(version)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    publish("v1", f"{first} write\n")
    (tmp_path / "tokens").symlink_to("..data/tokens")
    config = ServerConfig(port=0, tokens={fixed: "read"}, tokens_file=str(tmp_path / "tokens"))
    with ServerThread(OnnxRuntimeEngine(tiny_onnx), config) as s:
        def code(token: str) -> str:
            try:
                with ReidClient(s.target, token=token) as client:
                    client.embed([_image()])
                return "ok"
            except grpc.RpcError as exc:
                return exc.code().name

        assert [code(t) for t in (fixed, first, second)] == ["ok", "ok", "UNAUTHENTICATED"]
        publish("v2", f"# rotated\n{second} write\n")
        time.sleep(0.1)
        assert [code(t) for t in (fixed, first, second)] == ["ok", "UNAUTHENTICATED", "ok"]
        publish("v3", f"{second} admin\n")  # a mistake: no role of ours
        time.sleep(0.1)
        assert [code(t) for t in (fixed, first, second)] == ["ok", "UNAUTHENTICATED", "ok"]
        assert "kept the 2 tokens in use" in caplog.text and "entry 1 must be 'TOKEN read' or 'TOKEN write'" in caplog.text
        assert s.metrics.value("reid_credential_reloads_total", credential="tokens", outcome="loaded") == 1
        assert s.metrics.value("reid_credential_reloads_total", credential="tokens", outcome="refused") == 1


def test_token_sources_and_errors(tmp_path, monkeypatch):
    f = tmp_path / "tokens"
    f.write_text(f"# comment\n{READ} read\n{WRITE} write\n")
    monkeypatch.setenv("REID_TOKENS", f"{'e' * 20}:write")
    assert read_tokens_file(f) == {READ: "read", WRITE: "write"}
    assert env_tokens("REID_TOKENS") == {"e" * 20: "write"}
    with pytest.raises(SecurityError, match="'TOKEN read' or 'TOKEN write'"):
        parse_tokens(["abcdefghijklmnopqrstuvwxyz admin"], "x")
    with pytest.raises(SecurityError, match="at least 16"):
        parse_tokens(["short read"], "x")
    with pytest.raises(SecurityError, match="not set"):
        env_tokens("REID_NO_SUCH_VAR")
    (tmp_path / "empty").write_text("# only a comment\n\n")
    with pytest.raises(SecurityError, match="empty holds no tokens"):
        read_tokens_file(tmp_path / "empty")
    with pytest.raises(SecurityError, match="cannot read tokens file .*missing: No such file"):
        read_tokens_file(tmp_path / "missing")
    (tmp_path / "bom").write_bytes(f"\ufeff{READ} read\r\n{WRITE} write\r\n".encode())  # as Notepad saves it
    assert read_tokens_file(tmp_path / "bom") == {READ: "read", WRITE: "write"}  # the mark was part of the first token
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + f"{READ} read".encode("utf-16-le"))
    with pytest.raises(SecurityError, match="binary is not UTF-8 text"):  # was a bare UnicodeDecodeError
        read_tokens_file(tmp_path / "binary")


def test_tls_files_come_in_pairs_and_unreadable_ones_are_named(tmp_path):
    pem = tmp_path / "cert.pem"
    pem.write_text("x")
    assert server_credentials(None, None, None) is None
    for args, says in (((None, None, pem), "--tls-client-ca needs --tls-cert and --tls-key"),
                       ((pem, None, None), "TLS needs both --tls-cert and --tls-key"),
                       ((None, pem, None), "TLS needs both --tls-cert and --tls-key"),
                       ((pem, tmp_path / "key.pem", None), f"--tls-cert {pem} holds no PEM certificate"),
                       ((tmp_path / "key.pem", pem, None), "cannot read --tls-cert .*key.pem: No such file")):
        with pytest.raises(SecurityError, match=says):
            server_credentials(*args)


def test_tls_files_that_do_not_fit_are_named_before_the_port_is_bound(pki, tmp_path, tiny_onnx, capsys):
    """A key that is not the certificate's, swapped files, an encrypted key or a client CA that is
    no certificate: gRPC logged "Unable to create secure server" and the bind failed, which
    reid-serve reported as "the port is taken"."""
    from serving.cli import serve_main

    (tmp_path / "locked.key").write_bytes(subprocess.run(
        ["openssl", "rsa", "-in", str(pki / "server.key"), "-aes256", "-passout", "pass:secret"],
        check=True, capture_output=True).stdout)
    server, client = (pki / "server.pem", pki / "server.key"), (pki / "client.pem", pki / "client.key")
    for files, says in [((server[0], client[1], None), f"--tls-key {client[1]} is not the private key of --tls-cert {server[0]}"),
                        ((server[1], server[0], None), f"--tls-cert {server[1]} holds no PEM certificate (it holds a "
                                                       "private key)"),
                        ((server[0], tmp_path / "locked.key", None), f"--tls-key {tmp_path / 'locked.key'} is not an "
                                                                     "unencrypted PEM private key"),
                        ((*server, pki / "server.csr"), f"--tls-client-ca {pki / 'server.csr'} holds no PEM certificate")]:
        argv = ["--model", str(tiny_onnx), "--port", "0", "--no-gallery", "--tls-cert", str(files[0]), "--tls-key", str(files[1])]
        assert serve_main(argv + (["--tls-client-ca", str(files[2])] if files[2] else [])) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"reid-serve: error: {says}"
    assert server_credentials(*server, pki / "ca.pem") is not None  # the files that fit still do


def test_plaintext_beyond_localhost_needs_insecure(caplog):
    check_bind("127.0.0.1", tls=False, insecure=False)
    check_bind("::1", tls=False, insecure=False)
    check_bind("0.0.0.0", tls=True, insecure=False)
    check_bind("localhost", tls=False, insecure=False)
    check_bind("[::1]", tls=False, insecure=False)
    for host in ("", "[::]", "reid.example.com", "10.0.0.5"):  # "": every interface
        with pytest.raises(SecurityError, match="refusing plaintext"):
            check_bind(host, tls=False, insecure=False)
    with pytest.raises(SecurityError, match="refusing plaintext on 0.0.0.0"):
        check_bind("0.0.0.0", tls=False, insecure=False)
    check_bind("0.0.0.0", tls=False, insecure=True)
    assert "PLAINTEXT" in caplog.text


def test_failed_handshakes_do_not_break_the_json_logs(tiny_onnx, pki):
    """gRPC's C core wrote "I1207 ... ssl_transport_security.cc] Handshake failed ..." to stderr
    for every failed TLS handshake (a TCP probe, a plaintext client), outside the JSON lines."""
    import json
    import signal
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}  # as a fresh shell has it
    proc = subprocess.Popen([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                             "--model", str(tiny_onnx), "--port", "0", "--no-gallery", "--log-format", "json",
                             "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")],
                            env={**env, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while not any("serving reid.v1.ReIdentification on" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stderr.readline())
        target = "127.0.0.1:" + lines[-1].split("127.0.0.1:")[1].split()[0]
        assert _embeds(target) == "UNAVAILABLE"  # plaintext at a TLS port
        assert _embeds(target, root_certificates=(pki / "client.pem").read_bytes()) == "UNAVAILABLE"  # another CA
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines += proc.stderr.read().splitlines()
    finally:
        proc.kill()
        proc.stderr.close()
    assert [json.loads(line)["message"] for line in lines if line.strip()][-1] == "server stopped", lines
