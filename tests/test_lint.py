"""Static checks: ruff (pyflakes' rules, configured in pyproject.toml) on the code, hadolint on the
Dockerfiles (which cannot be built where this project is developed). Both tools come with the dev
extra, pinned; a test skips with the reason when one is missing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's, when the tests run from it
    exe = str(beside) if beside.exists() else shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed (dev extra)")
    return exe


def test_code_passes_ruff():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pass_hadolint():
    result = subprocess.run([_tool("hadolint"), "Dockerfile.serve", "Dockerfile.train"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
