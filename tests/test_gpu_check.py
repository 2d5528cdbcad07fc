"""scripts/gpu_check.sh, run on the CPU at a tiny size: its steps, logs and summary, so that the one
run a GPU machine gets is not spent on a broken script."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "gpu-tests", "train-step", "rerank", "train", "evaluate"]


def _run(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_every_step_runs_and_the_summary_has_its_figures(synthetic_root, tmp_path):
    out = tmp_path / "check"
    result = _run(str(out), str(synthetic_root), GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_EPOCHS="1",
                  GPU_CHECK_BACKBONES="resnet_50", GPU_CHECK_BATCH="4", GPU_CHECK_STEPS="1",
                  GPU_CHECK_RERANK_SIZE="40 200",
                  GPU_CHECK_OVERRIDES="dataset.batch_size=16 dataset.num_workers=0 model.input_height=64 model.input_width=32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for step in STEPS:
        assert re.search(rf"^{step} +exit 0 ", summary, re.M), summary
        assert (out / f"{step}.log").is_file()
    assert re.search(r"train step +resnet_50 +[\d.]+ images/s", summary)
    assert "torch:cpu against cpu" in summary  # the GPU code path of re-ranking, on torch's CPU device
    assert re.search(r"max \|distance diff\| \d\.\d+e-0[5-9]", summary)  # and it agreed with the CPU path
    assert re.search(r"mAP +\d+\.\d", summary)
    assert list((out / "train" / "train").glob("model_epoch_001.pth"))
    assert re.search(r"^serve +skipped: no GPU_CHECK_MODEL$", summary, re.M)


def test_the_serving_benchmark_runs_with_a_model(tiny_onnx, tmp_path):
    """Run from another folder with paths relative to it, as a user would: the steps run from the
    repository root, so the script must have made them absolute."""
    (tmp_path / "model.onnx").symlink_to(tiny_onnx)
    out = tmp_path / "check"
    result = _run("check", cwd=tmp_path, GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_ONLY="serve", GPU_CHECK_MODEL="model.onnx",
                  GPU_CHECK_SERVE_ARGS="--clients 4 --crops 1 --seconds 0.5 --check-seconds 0.1 --engine-seconds 0.1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^serve +exit 0 ", summary, re.M)
    assert "engine best overall" in summary and "batching on:" in summary and "batching off:" in summary
    # batching on and off, each a row for 4 clients x 1 crop: the comparison a GPU is checked for
    assert len(re.findall(r"4 clients x 1 crops: +[\d.]+ img/s", summary)) == 2


def test_a_failing_step_fails_the_run_but_not_the_steps_after_it(synthetic_root, tmp_path):
    out = tmp_path / "check"
    result = _run(str(out), str(synthetic_root), GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_BACKBONES="no_such_backbone",
                  GPU_CHECK_RERANK_SIZE="20 100", GPU_CHECK_EPOCHS="0", GPU_CHECK_ONLY="train-step rerank train")
    assert result.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^train-step +exit [1-9]", summary, re.M)
    assert re.search(r"^rerank +exit 0 ", summary, re.M)  # ran after the failure
    assert re.search(r"^train +exit 2 ", summary, re.M)  # 0 epochs: the spec check's exit status
    assert "train.num_epochs" in (out / "train.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    result = _run(str(tmp_path / "check"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpu_check: {sys.executable} sees no CUDA device (torch.cuda.is_available() is False); nothing run"]
    assert not (tmp_path / "check" / "environment.log").exists()


def test_only_the_steps_asked_for_run(tmp_path):
    out = tmp_path / "check"
    result = _run(str(out), GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_ONLY="environment rerank", GPU_CHECK_RERANK_SIZE="20 100")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.log")) == ["environment.log", "rerank.log"]
    assert re.findall(r"^(\S+) +exit", (out / "summary.txt").read_text(), re.M) == ["environment", "rerank"]


def test_a_step_name_that_does_not_exist_is_refused_up_front(tmp_path):
    result = _run(str(tmp_path / "check"), GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_ONLY="rerank trian")
    assert result.returncode == 2
    assert "GPU_CHECK_ONLY names no step 'trian'" in result.stderr
    assert not (tmp_path / "check").exists()


def test_a_folder_that_is_not_a_dataset_is_refused_up_front(tmp_path):
    result = _run(str(tmp_path / "check"), str(tmp_path), GPU_CHECK_ALLOW_CPU="1")
    assert result.returncode == 2
    assert "has no bounding_box_train folder" in result.stderr
    assert not (tmp_path / "check").exists()
