"""Server addresses: URLs refused, bare hosts told apart from host:port and resolver forms."""
import subprocess
import sys

import pytest

from serving.targets import check_target, port_missing


@pytest.mark.parametrize("target, missing", [
    ("reid.example.com", True), ("10.0.0.7", True), ("[::1]", True),
    ("localhost:50051", False), ("[::1]:50051", False), ("dns:///reid:50051", False),
    ("ipv4:10.0.0.7:1,10.0.0.8:1", False), ("unix:/run/reid.sock", False),
])
def test_a_bare_host_is_told_from_one_with_a_port(target, missing):
    assert port_missing(target) is missing


def test_urls_are_refused_naming_the_address_to_give():
    check_target("reid.example.com:50051")
    with pytest.raises(ValueError, match=r"^server address 'http://10.0.0.7:50051/' is a URL; give host:port, e.g. 10.0.0.7:50051$"):
        check_target("http://10.0.0.7:50051/")


def test_the_health_probe_refuses_a_url_in_one_line():
    """It answered "not serving", forever, with no word why."""
    run = subprocess.run([sys.executable, "-m", "serving.healthcheck", "http://127.0.0.1:50051"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        "python -m serving.healthcheck: error: server address 'http://127.0.0.1:50051' is a URL; give host:port, e.g. "
        "127.0.0.1:50051")
