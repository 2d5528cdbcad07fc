"""Engine interface and the one preprocessing function every engine and the offline path share.

An engine only loads a model and runs float32 N x 3 x H x W batches; this base class owns decoding,
cropping, resizing and scaling, so every runtime sees identical input (the BoxMOT/Triton split).
"""
from __future__ import annotations

import abc
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

METADATA_PREFIX = "reid."


class ModelFileError(Exception):
    """The model file is missing, of an unknown kind, or lacks what serving needs; the message says which."""


class ImageError(ValueError):
    """One input image cannot be used (undecodable, too large, bad crop box); fails that image only."""


@dataclass
class ModelMetadata:
    """What a caller must know to feed a model: input size, output size, and preprocessing.

    ``pixel_mean``/``pixel_std`` are empty for models that normalize inside the graph (ours);
    models from other tools list them and the engine normalizes before running.
    """

    input_height: int
    input_width: int
    embedding_dim: int
    output_normalized: bool = False
    pixel_mean: list = field(default_factory=list)
    pixel_std: list = field(default_factory=list)
    input_name: str = "images"
    output_name: str = "embeddings"
    backbone: str = ""
    spec_sha256: str = ""
    checkpoint_sha256: str = ""

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """0..1 input -> what the graph expects: unchanged when normalization is inside the graph."""
        if not self.pixel_mean:
            return batch
        mean = np.asarray(self.pixel_mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.pixel_std, dtype=np.float32).reshape(1, 3, 1, 1)
        return (batch - mean) / std

    def to_props(self) -> dict[str, str]:
        """As ONNX ``metadata_props`` / sidecar JSON: string values under the ``reid.`` prefix."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata | None":
        values = {k[len(METADATA_PREFIX):]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}
        if not values:
            return None
        known = cls.__dataclass_fields__
        try:
            return cls(**{k: json.loads(v) for k, v in values.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"model metadata is malformed: {exc}") from None


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> H x W x 3 uint8 RGB; the pixel limit is checked before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageError(f"image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("cannot decode image: not a JPEG, PNG or other supported image") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def preprocess(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8 RGB -> 3 x height x width float32 in 0..1.

    Bicubic resize through PIL, exactly as the training/evaluation transforms do, so a served
    embedding equals the offline one.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected an H x W x 3 uint8 image, got shape {image.shape} and dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError("image has no pixels")
    resized = Image.fromarray(image).resize((width, height), Image.BICUBIC)
    return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0


class Engine(abc.ABC):
    """Load once, then run batches. Subclasses implement ``_run`` and set ``metadata``/``max_batch_size``."""

    metadata: ModelMetadata
    max_batch_size: int = 64
    name: str = "engine"

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x H x W float32 -> N x D float32 (N <= max_batch_size)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Model input in 0..1 -> embeddings; applies the metadata's normalization if the graph lacks it."""
        md = self.metadata
        batch = md.normalize(np.ascontiguousarray(batch, dtype=np.float32))
        outs = [self._run(batch[i : i + self.max_batch_size]) for i in range(0, len(batch), self.max_batch_size)]
        return np.concatenate(outs).astype(np.float32, copy=False) if outs else np.zeros((0, md.embedding_dim), np.float32)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded RGB images -> embeddings, in order."""
        md = self.metadata
        return self.run(np.stack([preprocess(img, md.input_height, md.input_width) for img in images]))
