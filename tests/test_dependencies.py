"""The dependency direction the README states ("Dependency direction"), checked on the source.

`serving` never imports `training`, `export` or torch, so a serving image needs neither torch nor the
training code; `retrieval` imports no other package of ours and torch only inside the functions that
use it (GPU re-ranking), so training, evaluation and serving share it without pulling each other in.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> list[tuple[str, int, str, bool]]:
    """(file, line, imported top-level name, at module level) for every import in ``package``."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.append((str(path.relative_to(ROOT)), node.lineno, name.split(".")[0], id(node) in top_level))
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("serving", {"torch", "torchvision", "timm", "training", "export"}),
    ("retrieval", {"training", "export", "serving"}),
])
def test_package_never_imports(package, forbidden):
    bad = [f"{file}:{line} imports {name}" for file, line, name, _ in _imports(package) if name in forbidden]
    assert bad == []


def test_retrieval_imports_torch_only_where_it_runs_on_a_gpu():
    bad = [f"{file}:{line}" for file, line, name, module_level in _imports("retrieval") if name == "torch" and module_level]
    assert bad == [], "torch imported at module level: importing retrieval would then need torch"


def test_starting_the_serving_modules_loads_no_torch():
    """What the static check cannot see: a third-party module that serving imports pulling torch in."""
    code = ("import sys, serving.cli, serving.server, serving.client, serving.client_cli, serving.engines.onnxruntime, "
            "retrieval.rerank, retrieval.gallery; "
            "print(sorted(m for m in ('torch', 'timm', 'training', 'export') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_client_library_loads_no_decoder_runtime_or_index():
    """Pipelines import ``serving.client`` beside their own stack: it needs grpc and numpy, not the
    server's decoders (OpenCV, Pillow, simplejpeg), ONNX Runtime or FAISS."""
    code = ("import sys, serving.client, serving.client_cli; "
            "print(sorted(m for m in ('cv2', 'PIL', 'simplejpeg', 'onnxruntime', 'faiss') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _without_torch(call: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``call`` (Python) where torch, torchvision and timm cannot be imported, as in the serving
    image, whose install has none of them."""
    code = "import sys\nfor name in ('torch', 'torchvision', 'timm'): sys.modules[name] = None\n" + call
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_onnx_file_becomes_fp16_and_meets_the_engine_stage_without_pytorch(tiny_onnx, tmp_path):
    """The deployment guide builds the TensorRT engine in the serving image, from the ONNX file:
    ``reid-export`` failed there at import (``No module named 'torch'``), even for ``--help``."""
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_onnx, model)
    result = _without_torch(f"from export.cli import main\nsys.exit(main(['--onnx', {str(model)!r}, '--fp16']))", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fp16_onnx" in result.stdout and (tmp_path / "model.fp16.onnx").is_file()
    result = _without_torch(f"from export.cli import main\nsys.exit(main(['--onnx', {str(model)!r}, '--engine', 'm.engine']))",
                            tmp_path)
    assert result.returncode == 2
    assert "cannot build a TensorRT engine here" in result.stderr and "torch" not in result.stderr


@pytest.mark.parametrize("call, command", [
    ("from export.cli import main\nsys.exit(main(['--checkpoint', 'run.pth', '--onnx', 'm.onnx']))", "reid-export: error: --checkpoint"),
    ("from training.cli import main\nsys.exit(main(['train', '-e', 'spec.yaml']))", "reid train: error: this command"),
    ("from training.cli import main\nsys.exit(main(['evaluate', '-e', 'spec.yaml']))", "reid evaluate: error: this command"),
], ids=["reid-export --checkpoint", "reid train", "reid evaluate"])
def test_commands_that_need_pytorch_say_so_in_one_line_without_it(tmp_path, call, command):
    (tmp_path / "spec.yaml").write_text("results_dir: out\n")
    (tmp_path / "run.pth").write_bytes(b"not read")
    result = _without_torch(call, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"{command} needs PyTorch, and torch is not installed here")
    assert "'.[train]'" in lines[0]


def test_onnx_runtime_sends_and_keeps_no_telemetry(tiny_onnx, tmp_path):
    """ONNX Runtime's builds report usage to Microsoft from Linux too, with a device id and an event
    cache under ~/.cache: a network call in code that users run offline."""
    code = ("import numpy as np\nfrom serving.engines import open_engine\nfrom export.onnx_file import run_onnx\n"
            f"engine = open_engine({str(tiny_onnx)!r}, device='cpu')\n"
            "engine.run(np.zeros((2, 3, engine.metadata.input_height, engine.metadata.input_width), np.float32))\n"
            f"run_onnx({str(tiny_onnx)!r}, np.zeros((1, 3, engine.metadata.input_height, engine.metadata.input_width), np.float32))\n")

    def files_kept(home: Path, **env: str) -> list[Path]:
        home.mkdir()
        environment = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**environment, "HOME": str(home), **env})
        assert result.returncode == 0, result.stderr
        return [p for p in home.rglob("*") if p.is_file()]

    if not files_kept(tmp_path / "opted_in", ORT_DISABLE_TELEMETRY="0"):  # the user's choice wins, and shows what to look for
        pytest.skip("this onnxruntime keeps no telemetry files, even when asked to: nothing to check")
    assert files_kept(tmp_path / "default") == []
