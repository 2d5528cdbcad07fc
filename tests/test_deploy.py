"""deploy/kubernetes.yaml against what it configures: reid-serve's flags and config keys, the health
probe's flags, Dockerfile.serve's entrypoint and ports, and the manifest's own mounts and names.
No cluster runs it here; these are the mistakes a manifest makes silently (a renamed flag, a probe
at another port, a file outside every mount, a grace period shorter than the drain)."""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from serving.cli import build_config, parse_serve_args, serve_parser
from serving.healthcheck import probe_parser

ROOT = Path(__file__).resolve().parents[1]
FILE_FLAGS = ("--model", "--config", "--tls-cert", "--tls-key", "--tokens-file", "--tls-ca")


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text())}


@pytest.fixture(scope="module")
def container(manifest) -> dict:
    return manifest["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def _entrypoint() -> list[str]:
    line = next(line for line in (ROOT / "Dockerfile.serve").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT"))


def _flag(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not given")


def _mounted_at(container: dict, path: str) -> dict:
    """The volume mount that holds ``path`` (the deepest, as the kubelet resolves it)."""
    mounts = [m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume mount"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def test_the_server_command_line_and_config_are_what_reid_serve_accepts(manifest, container, tmp_path):
    """The image's entrypoint plus the manifest's args, with the config map's file, parse and build
    a server configuration; the files they name are stood in for under tmp_path."""
    argv = _entrypoint()[1:] + container["args"]
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    exact = {name for action in serve_parser()._actions for name in action.option_strings}
    assert flags <= exact, f"not reid-serve's own names (argparse takes prefixes, until a new flag shares one): {flags - exact}"
    stand_ins = {}
    for flag in ("--config", "--tokens-file"):
        stand_ins[flag] = tmp_path / PurePosixPath(_flag(argv, flag)).name
    config_mount = _mounted_at(container, _flag(argv, "--config"))
    config_map = next(v for v in manifest["Deployment"]["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == config_mount["name"])["configMap"]["name"]
    assert config_map == manifest["ConfigMap"]["metadata"]["name"]
    stand_ins["--config"].write_text(manifest["ConfigMap"]["data"][PurePosixPath(_flag(argv, "--config")).name])
    stand_ins["--tokens-file"].write_text("a-token-of-32-characters-or-so.. write\n")
    argv = [f"{a.split('=', 1)[0]}={stand_ins[a.split('=', 1)[0]]}" if a.split("=", 1)[0] in stand_ins else a for a in argv]
    config = build_config(parse_serve_args(argv))
    grace = manifest["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.shutdown_delay_seconds > 1  # raised from the default, for the endpoint update
    assert grace > config.shutdown_delay_seconds + config.grace_seconds
    assert config.max_connection_age_seconds > 0  # the headless Service balances per connection


def test_every_file_the_server_and_probes_read_is_mounted_from_the_right_volume(manifest, container):
    argv = container["args"] + container["startupProbe"]["exec"]["command"]
    volumes = {v["name"]: v for v in manifest["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    for flag in FILE_FLAGS:
        path = _flag(argv, flag)
        mount = _mounted_at(container, path)
        assert mount.get("readOnly"), f"{path}: the server only reads it"
        volume = volumes[mount["name"]]
        if flag in ("--tls-cert", "--tls-key", "--tls-ca"):  # cert-manager's secret, with its key names
            assert volume["secret"]["secretName"] == manifest["Certificate"]["spec"]["secretName"]
            assert PurePosixPath(path).name in ("tls.crt", "tls.key", "ca.crt")
        assert "subPath" not in mount  # a subPath mount never sees a secret's update


def test_the_probes_ask_the_health_service_at_the_servers_port_under_a_name_the_certificate_holds(manifest, container):
    probes = [container[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert probes[0] == probes[1] == probes[2]
    command = probes[0]
    assert command[:3] == ["python3", "-m", "serving.healthcheck"]
    args = probe_parser().parse_args(command[3:])
    port = _flag(_entrypoint(), "--port")
    assert args.target == f"127.0.0.1:{port}"
    assert args.tls_server_name in manifest["Certificate"]["spec"]["dnsNames"]
    assert {"containerPort": int(port), "name": "grpc"} in container["ports"]


def test_the_service_and_the_metrics_annotations_name_the_containers_ports(manifest, container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(_flag(_entrypoint(), "--metrics-port"))
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile.serve").read_text(), re.M).group(1).split()
    assert sorted(map(int, exposed)) == sorted(ports.values())
    service = manifest["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: clients see every replica
    assert {p["targetPort"] for p in service["ports"]} <= set(ports)
    template = manifest["Deployment"]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert service["selector"] == template["metadata"]["labels"] == manifest["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("version", ["1.25.0", "latest"])
def test_every_kubernetes_resource_matches_the_api_schema(version):
    """Strict schemas (kubernetes-validate's, from the API's OpenAPI): a misspelt or misplaced field
    (``periodSecond``, a probe's ``command`` outside ``exec``) is dropped by ``kubectl apply`` with a
    warning at most, and the setting silently never applies. 1.25 is the oldest release the schemas
    cover (the manifest needs nothing newer than policy/v1 budgets, 1.21). cert-manager's Certificate
    has no schema there: the tests above check the fields of it that the server depends on."""
    from kubernetes_validate import utils as kv  # a dev dependency: missing, this fails rather than skips
    target = kv.latest_version() if version == "latest" else version
    checked = []
    for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()):
        if doc["apiVersion"].startswith("cert-manager.io/"):
            continue
        try:
            kv.validate(doc, target, strict=True)
        except kv.ValidationError as exc:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at "
                                 f"{'.'.join(map(str, exc.path))} (Kubernetes {target})") from None
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(checked)


def test_the_container_runs_as_the_images_user(container, manifest):
    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile.serve").read_text(), re.M).group(1)
    assert manifest["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)
    assert container["securityContext"]["readOnlyRootFilesystem"]
