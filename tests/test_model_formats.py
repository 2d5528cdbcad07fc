"""Checkpoints and exported models written by earlier versions of reid work in this one.

Every other test trains, exports and serves with the same code, so a change that strands the
models users already have passes them all: a model argument added without a default, a metadata
key renamed in the ONNX export, a timm release that renames a Swin layer (timm's range is open).
tests/fixtures/model-format<N>/ holds each checkpoint format's files as the version that
introduced it wrote them (tests/fixtures/make_model_fixture.py, run once per format), with the
embeddings they gave then."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx import export_onnx
from export.verify import row_cosines
from serving.engines import open_engine
from training.checkpoint import FORMAT_VERSION, load_checkpoint
from training.config.load import build_spec
from training.data.synthetic import make_synthetic
from training.embed import model_from_checkpoint
from training.engine import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import make_model_fixture as fx  # noqa: E402
from formats import fixture_dir, fixture_dirs  # noqa: E402

FOLDERS = fixture_dirs("model")
ids = [f.name for f in FOLDERS]


def _expected(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(folder / "expected.npz")
    return data["pixels"], data["embeddings"]


def _checkpoint(folder: Path) -> Path:
    return next(folder.glob("*.pth"))


def test_the_current_format_has_a_fixture():
    """A new FORMAT_VERSION comes with its fixture, written by the version that introduces it."""
    assert fixture_dir("model", FORMAT_VERSION).is_dir(), "run tests/fixtures/make_model_fixture.py"


@pytest.mark.parametrize("folder", FOLDERS, ids=ids)
def test_an_earlier_checkpoint_rebuilds_its_model_and_exports(tmp_path, folder):
    pixels, expected = _expected(folder)
    model, _ = model_from_checkpoint(str(_checkpoint(folder)))
    with torch.no_grad():
        got = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    report = export_onnx(_checkpoint(folder), tmp_path / "again.onnx")  # checks ONNX Runtime against PyTorch
    engine = open_engine(report["onnx"], device="cpu")
    assert row_cosines(engine.run_pixels(pixels), expected).min() > 0.9999
    # the new export is the same model as the earlier one: galleries that one filled stay searchable
    assert engine.model_id == open_engine(folder / "model.onnx", device="cpu").model_id


@pytest.mark.parametrize("folder", FOLDERS, ids=ids)
def test_an_earlier_export_is_served_as_the_same_model(folder):
    """Its metadata still gives the server its input size and preprocessing (its model id, the one a
    new export of the same checkpoint gets, is checked above)."""
    pixels, expected = _expected(folder)
    engine = open_engine(folder / "model.onnx", device="cpu")
    md = engine.metadata
    assert (md.input_height, md.input_width, md.embedding_dim, engine.uses_fallback) == (fx.HEIGHT, fx.WIDTH, expected.shape[1], False)
    assert row_cosines(engine.run_pixels(pixels), expected).min() > 0.9999


@pytest.mark.parametrize("folder", FOLDERS, ids=ids)
def test_training_resumes_from_an_earlier_checkpoint_with_its_own_spec(tmp_path, folder):
    """The spec saved in the checkpoint still loads (its keys are the spec's contract), and the
    optimizer state goes on where it stopped."""
    checkpoint = shutil.copy(_checkpoint(folder), tmp_path / "old.pth")
    saved = load_checkpoint(checkpoint)
    data = tmp_path / "data"
    make_synthetic(data, identities=8, cameras=2, images_per_identity=4, seed=1)
    spec = build_spec(saved["spec"], [
        f"results_dir={tmp_path / 'results'}", f"dataset.train_dataset_dir={data / 'bounding_box_train'}",
        f"dataset.query_dataset_dir={data / 'query'}", f"dataset.test_dataset_dir={data / 'bounding_box_test'}",
        f"train.num_epochs={saved['epoch'] + 1}", f"train.resume_training_checkpoint_path={checkpoint}",
    ])
    last = Trainer(spec, torch.device("cpu")).fit()
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == saved["epoch"] + 1
    assert resumed["model_args"] == saved["model_args"]
    moved = [not torch.equal(resumed["model_state"][k], v) for k, v in saved["model_state"].items() if v.is_floating_point()]
    assert any(moved) and all(torch.isfinite(v).all() for v in resumed["model_state"].values() if v.is_floating_point())
