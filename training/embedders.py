"""Where embeddings come from for offline jobs: a training checkpoint, an exported model file
(through the serving engines, so the deployed artifact is scored with its own runtime and
preprocessing), or a file of stored embeddings from ``reid inference``. Chosen by content.
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from training.data.market1501 import ImageRecord
from training.data.workers import loader_workers
from training.errors import ReidError
from training.progress import progress

log = logging.getLogger(__name__)

class Embedder(Protocol):
    description: str
    reads_images: bool  # False for stored embeddings: their jobs need not decode the images first

    def embed(self, records: list[ImageRecord], desc: str) -> np.ndarray: ...


def detect_kind(path: str | Path) -> str:
    """"checkpoint", "onnx", "tensorrt" or "embeddings", by the file's content, not its name."""
    path = Path(path)
    if not path.is_file():
        raise ReidError(f"model file {path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return "checkpoint"
        if names and all(n.endswith(".npy") for n in names):
            return "embeddings"
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] == b"[":
        return "embeddings"
    from serving.engines import ModelFileError, model_kind

    try:
        return model_kind(path)
    except ModelFileError:
        raise ReidError(
            f"{path} is not a training checkpoint, an ONNX model, a TensorRT engine (with its .json sidecar) "
            "or an embeddings file from `reid inference`"
        ) from None


class CheckpointEmbedder:
    reads_images = True

    def __init__(self, path: str, device: torch.device, batch_size: int, num_workers: int):
        from training.embed import model_from_checkpoint

        self.device = device
        self.model, _ = model_from_checkpoint(path)
        self.model.to(self.device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.description = f"checkpoint {path} ({self.model.args.backbone}) on {self.device}"

    def embed(self, records, desc):
        from training.embed import embed_records

        return embed_records(self.model, records, self.device, self.batch_size, self.num_workers, desc=desc)


class EngineEmbedder:
    """An exported model through the serving engine: same decode, resize and runtime as live serving."""

    reads_images = True

    def __init__(self, path: str, spec, device: torch.device, batch_size: int):
        from serving.engines import ModelFileError, ModelMetadata, NoPreprocessingMetadata, open_engine

        # A model from another tool is preprocessed as the spec says only where the spec says it: the
        # schema's defaults (TAO's 0.5/0.5, 384x128) once scored an ImageNet-normalized model 12 mAP
        # too low without a word.
        pixels = {"dataset.pixel_mean", "dataset.pixel_std"} <= spec.given_keys
        size = {"model.input_height", "model.input_width"} <= spec.given_keys
        fallback = ModelMetadata(
            input_height=spec.model.input_height if size else 0, input_width=spec.model.input_width if size else 0,
            embedding_dim=0, pixel_mean=list(spec.dataset.pixel_mean) if pixels else [], pixel_std=list(spec.dataset.pixel_std),
        )
        try:
            self.engine = open_engine(path, device=device.type, fallback=fallback,
                                      max_batch_size=batch_size)
        except NoPreprocessingMetadata:
            if not pixels:
                raise ReidError(f"{path} carries no reid preprocessing metadata (a model from another tool): set "
                                "dataset.pixel_mean and dataset.pixel_std in the spec or as overrides, e.g. "
                                "'dataset.pixel_mean=[0.485,0.456,0.406]' 'dataset.pixel_std=[0.229,0.224,0.225]' "
                                "for an ImageNet-normalized model") from None
            raise ReidError(f"{path} has a dynamic input size and no reid metadata: set model.input_height and "
                            "model.input_width to the size it was trained at (e.g. model.input_height=256 "
                            "model.input_width=128)") from None
        except ModelFileError as exc:
            raise ReidError(str(exc)) from None
        md = self.engine.metadata
        self.batch_size = min(batch_size, self.engine.max_batch_size)
        self.description = f"{self.engine.name} engine {path} (input {md.input_height}x{md.input_width})"
        if self.engine.uses_fallback:  # a spec written for another model gives wrong numbers that still run
            log.info("%s carries no reid metadata: its images are normalized with the spec's dataset.pixel_mean=%s "
                     "and dataset.pixel_std=%s; a model trained otherwise scores lower without failing",
                     path, md.pixel_mean, md.pixel_std)

    def embed(self, records, desc):
        from serving.engines import ImageError, decode_image

        out = []
        # ``with``: the bar is cleared however the loop ends, before a stop's or an error's line is printed
        with progress(range(0, len(records), self.batch_size), desc=desc, unit="batch", leave=False) as bar:
            for start in bar:
                images = []
                for rec in records[start : start + self.batch_size]:
                    try:
                        images.append(decode_image(Path(rec.path).read_bytes()))
                    except (ImageError, OSError) as exc:
                        raise ReidError(f"cannot read image {rec.path}: {exc}") from None
                out.append(self.engine.embed_images(images))
        return np.concatenate(out) if out else np.zeros((0, self.engine.metadata.embedding_dim), np.float32)


class StoredEmbedder:
    """Embeddings written by ``reid inference`` (.npz or TAO JSON), looked up by image path."""

    reads_images = False

    def __init__(self, path: str):
        p = Path(path)
        if zipfile.is_zipfile(p):
            data = np.load(p, allow_pickle=False)
            paths, feats = [str(x) for x in data["img_path"]], data["embedding"]
        else:
            try:
                items = json.loads(p.read_text())
                paths = [item["img_path"] for item in items]
                vectors = [item["embedding"] for item in items]
            except (ValueError, KeyError, TypeError) as exc:
                raise ReidError(f"{path} is not a `reid inference` embeddings file: {exc}") from None
            if len({len(v) for v in vectors}) > 1:
                raise ReidError(f"{path}: embeddings have mismatched lengths {sorted({len(v) for v in vectors})}")
            feats = np.asarray(vectors, dtype=np.float32)
        if feats.ndim != 2 or len(feats) != len(paths):
            raise ReidError(f"{path}: expected one embedding vector per image path")
        self.source = path
        self.lookup = {str(Path(x).resolve()): i for i, x in enumerate(paths)}
        # By file name too, where a name is unique in the file: a file written with relative paths
        # (by an older version) and read from another folder, or a dataset moved since, still matches.
        names: dict[str, int] = {}
        for i, x in enumerate(paths):
            name = Path(x).name
            names[name] = -1 if name in names else i
        self.by_name = {name: i for name, i in names.items() if i >= 0}
        self.feats = feats.astype(np.float32)
        self.description = f"stored embeddings {path} ({len(paths)} images, {feats.shape[1]}-d)"

    def embed(self, records, desc):
        rows, by_name = [], 0
        for r in records:
            row = self.lookup.get(str(Path(r.path).resolve()))
            if row is None:
                row = self.by_name.get(Path(r.path).name)
                by_name += row is not None
            rows.append(row)
        missing = [r.path for r, row in zip(records, rows) if row is None]
        if missing:
            raise ReidError(f"{self.source} holds no embedding for {len(missing)} of the {len(records)} {desc} images "
                            f"(e.g. {missing[0]}): it was written for other images; run reid inference on these folders")
        if by_name:
            log.info("%d of the %s images matched %s by file name (their paths differ)", by_name, desc, self.source)
        return self.feats[rows]


def open_embedder(path: str, spec, device: torch.device, batch_size: int) -> Embedder:
    kind = detect_kind(path)
    if kind == "checkpoint":
        return CheckpointEmbedder(path, device, batch_size, loader_workers(spec))
    if kind == "embeddings":
        return StoredEmbedder(path)
    return EngineEmbedder(path, spec, device, batch_size)
