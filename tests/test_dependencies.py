"""The dependency direction the README states ("Dependency direction"), checked on the source.

`serving` never imports `training`, `export` or torch, so a serving image needs neither torch nor the
training code; `retrieval` imports no other package of ours and torch only inside the functions that
use it (GPU re-ranking), so training, evaluation and serving share it without pulling each other in.
"""
from __future__ import annotations

import ast
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
