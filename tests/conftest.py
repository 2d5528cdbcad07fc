"""Shared fixtures: a small synthetic Market-1501-layout set and a quick spec for it."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from training.config.load import build_spec
from training.data.synthetic import make_synthetic

torch.set_num_threads(2)

TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}
# Opt-in: a Milvus server (http://host:19530, or https:// with REID_MILVUS_CA) for the Milvus tests
# instead of Milvus Lite, with REID_MILVUS_TOKEN where it checks tokens. It must hold no galleries:
# the tests create and drop their own.
MILVUS_URI = os.environ.get("REID_MILVUS_URI", "")


def open_milvus_store(tmp_path: Path):
    """A MilvusGalleryStore on Milvus Lite in ``tmp_path``, or on the server in REID_MILVUS_URI."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    from retrieval.gallery.milvus_store import MilvusGalleryStore

    if not MILVUS_URI:
        return MilvusGalleryStore(str(tmp_path / "milvus.db"))
    ca = os.environ.get("REID_MILVUS_CA", "")
    store = MilvusGalleryStore(MILVUS_URI, token=os.environ.get("REID_MILVUS_TOKEN", ""),
                               **({"server_pem_path": ca, "secure": True} if ca else {}))
    held = [g.name for g in store.list()]
    if held:
        store.close()
        pytest.skip(f"REID_MILVUS_URI={MILVUS_URI} holds galleries {held[:5]}; the tests need a server without any")
    return store


def drop_test_galleries(store) -> None:
    """On the server in REID_MILVUS_URI, drop every gallery the test made (it held none before)."""
    if MILVUS_URI:
        for info in store.list():
            store.drop(info.name)


def close_milvus_store(store) -> None:
    drop_test_galleries(store)
    store.close()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, identities=16, cameras=2, images_per_identity=6, seed=3)
    return root


class Terminal(io.StringIO):
    """A stand-in for stderr on a terminal, where progress bars are drawn (elsewhere they are log lines)."""

    def isatty(self) -> bool:
        return True


def quick_overrides(root: Path, results: Path, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run of a tiny Swin on ``root``."""
    base = {
        "results_dir": str(results),
        "dataset.train_dataset_dir": str(root / "bounding_box_train"),
        "dataset.query_dataset_dir": str(root / "query"),
        "dataset.test_dataset_dir": str(root / "bounding_box_test"),
        "dataset.num_classes": 8,
        "dataset.batch_size": 8,
        "dataset.num_instances": 2,
        "dataset.num_workers": 0,
        "model.pretrain_choice": '""',
        "model.input_height": 64,
        "model.input_width": 32,
        "model.feat_dim": 32,
        "model.backbone_overrides": "{embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2]}",
        "train.num_epochs": 2,
        "train.checkpoint_interval": 1,
        "train.optim.warmup_epochs": 1,
        "train.optim.base_lr": 0.01,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def quick_spec(synthetic_root, tmp_path):
    def make(**extra):
        return build_spec({}, quick_overrides(synthetic_root, tmp_path / "results", **extra))

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, synthetic_root) -> Path:
    """A one-epoch tiny Swin checkpoint (64x32 input, 32-d embeddings)."""
    from training.engine import Trainer

    out = tmp_path_factory.mktemp("tiny_ckpt")
    spec = build_spec({}, quick_overrides(synthetic_root, out, **{"train.num_epochs": 1}))
    return Trainer(spec, torch.device("cpu")).fit()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_checkpoint) -> Path:
    from export.onnx import export_onnx

    path = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    export_onnx(tiny_checkpoint, path)
    return path
