"""The README's first command, at a reduced size, so the demo path cannot rot."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DEMO_OUT": str(out), "DEMO_EPOCHS": "1", "DEMO_IDENTITIES": "16",
           "DEMO_PORT": str(_free_port()), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    assert "enrolled 80 gallery images over gRPC" in text
    found = re.search(r"^(\d+) of (\d+) queries \([\d.]+ %\) found the right person first", text, re.M)
    assert found, text[-2000:]
    assert int(found[2]) == len(list((out / "data" / "query").glob("*.jpg")))  # every query searched, not a sample
    for artifact in ["results/evaluate/results.json", "results/evaluate/cmc_curve.png", "model.onnx", "model.fp16.onnx",
                     "galleries/demo/snapshot.npz"]:
        assert (out / artifact).is_file(), artifact
    assert "server stopped" in (out / "serve.log").read_text()
