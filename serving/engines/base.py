"""Engine interface and the one preprocessing function every engine and the offline path share.

An engine only loads a model and runs float32 N x 3 x H x W batches; this module owns decoding,
resizing, scaling and (for graphs without it) normalization, so every runtime sees identical input
(the BoxMOT/Triton split). Training's transforms call the same ``resize``.
"""
from __future__ import annotations

import abc
import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import simplejpeg
from PIL import Image

log = logging.getLogger(__name__)

METADATA_PREFIX = "reid."


class ModelFileError(Exception):
    """The model file is missing, of an unknown kind, or lacks what serving needs; the message says which."""


class NoPreprocessingMetadata(ModelFileError):
    """A model from another tool, given no pixel mean/std by the caller: each command says in its
    own terms (flags, spec keys) how to give them."""


def first_line(exc: BaseException) -> str:
    """An error's first line for a one-line message (ONNX Runtime, TensorRT, protobuf and onnx
    messages run over many), or its type's name when it has no message."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ImageError(ValueError):
    """One input image cannot be used (undecodable, too large, bad crop box); fails that image only."""


class NonFiniteEmbedding(Exception):
    """The model gave NaN or infinity for one image (an FP16 engine that overflows, say): that
    image's error (INTERNAL: the model's fault, not the caller's), never a vector that silently
    ranks nowhere or fails a gallery add with a message about embeddings the caller never sent."""


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
        """N x 3 x H x W input in 0..1 -> what the graph expects: unchanged when normalization is inside the graph."""
        if not self.pixel_mean:
            return batch
        return self._scale_into(np.empty(batch.shape, dtype=np.float32), [batch[:, c] for c in range(3)], 1.0)

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32: scaled to 0..1, then normalized as ``normalize`` does."""
        n, h, w, _ = pixels.shape
        return self._scale_into(np.empty((n, 3, h, w), dtype=np.float32), [pixels[..., c] for c in range(3)], 1.0 / 255.0)

    def _scale_into(self, out: np.ndarray, channels: list[np.ndarray], scale: float) -> np.ndarray:
        """``out[:, c] = (channels[c] * scale - mean[c]) / std[c]``, one multiply (and subtract) per channel
        straight into ``out`` with no float temporaries: for a model as cheap as OSNet-x0.25 a naive
        conversion costs a fifth of the inference time."""
        mean, std = (self.pixel_mean, self.pixel_std) if self.pixel_mean else ((0.0,) * 3, (1.0,) * 3)
        for c, channel in enumerate(channels):
            np.multiply(channel, np.float32(scale / std[c]), out=out[:, c])
            if mean[c]:
                np.subtract(out[:, c], np.float32(mean[c] / std[c]), out=out[:, c])
        return out

    def to_props(self) -> dict[str, str]:
        """As ONNX ``metadata_props`` / sidecar JSON: string values under the ``reid.`` prefix."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata | None":
        values = {k[len(METADATA_PREFIX):]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}
        if not values:
            return None
        known = cls.__dataclass_fields__
        unknown = sorted(set(values) - set(known))
        if unknown:  # a newer reid-export's keys may change how the model is fed: say they go unheeded
            log.warning("model metadata holds %s, which this version of reid does not know (a newer reid-export "
                        "wrote it?): ignored; if the model misbehaves, serve it with the version that exported it",
                        ", ".join(METADATA_PREFIX + k for k in unknown))
        try:
            return cls(**{k: json.loads(v) for k, v in values.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"model metadata is malformed: {exc}") from None


def check_pixel_flags(pixel_mean: list | None, pixel_std: list | None) -> None:
    """``--pixel-mean``/``--pixel-std`` of reid-serve and reid-export: both or neither, every std
    above 0. One alone used to leave the other at the identity (mean 0 or std 1), which a model
    trained with both answers with poor embeddings, silently; a std of 0 divides by zero."""
    if (pixel_mean is None) != (pixel_std is None):
        raise ValueError("give --pixel-mean and --pixel-std together (e.g. ImageNet's: --pixel-mean 0.485 0.456 0.406 "
                         "--pixel-std 0.229 0.224 0.225; 0 0 0 and 1 1 1 for a model fed 0..1 pixels)")
    if pixel_std is not None and min(pixel_std) <= 0:
        raise ValueError(f"--pixel-std {' '.join(map(str, pixel_std))}: every value must be above 0")
    problem = pixel_scale_problem(pixel_mean, pixel_std) if pixel_mean is not None else None
    if problem:
        raise ValueError(f"--pixel-mean {' '.join(map(str, pixel_mean))} --pixel-std {' '.join(map(str, pixel_std))} {problem}")


def pixel_scale_problem(pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> str | None:
    """What is wrong with pixel statistics given on the 0..255 scale (an OpenMMLab-style config's
    numbers), or None: images are scaled to 0..1 before they are normalized, so such values feed
    the model garbage without any error. One wording for the flags and the spec keys."""
    if max([*pixel_mean, *pixel_std]) <= 1:
        return None
    return ("look like 0..255 values, but images are scaled to 0..1 before they are normalized: divide them by 255 "
            "(ImageNet's: 0.485 0.456 0.406 / 0.229 0.224 0.225)")


def warn_if_wide(height: int, width: int, given_as: str) -> None:
    """Person crops are taller than wide (ReID models take 256x128 or 384x128, height first); an
    input size wider than tall is most likely the two swapped, which trains or embeds squashed
    people without any error. ``given_as`` says how the size was given (spec keys, a flag)."""
    if width > height:
        log.warning("%s: wider than high, but person crops are taller than wide (height first: 256x128 is usual); "
                    "were the two swapped?", given_as)


# JPEGs go to TurboJPEG (simplejpeg), other formats to OpenCV, which decodes and resizes several
# times faster than Pillow on person crops (measured in docs/performance.md); headers are read
# first, so the pixel limit holds before any decoding.
_JPEG_SOI = b"\xff\xd8"
_OPENCV_FORMATS = {"JPEG", "PNG", "WEBP", "BMP"}
_DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # pixels as stored, as Pillow and training read them


def _refuse_truncated_jpeg(data: bytes) -> None:
    """libjpeg fills a truncated JPEG with grey and only warns, so check the end-of-image marker.

    Entropy-coded data never holds FF DA or FF D9 (an FF there is followed by 00 or a restart
    marker), so a complete file has an end-of-image marker after its last start-of-scan.
    """
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise ImageError("cannot decode image: JPEG data is truncated (no end-of-image marker)")


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Encoded JPEG/PNG/WebP/BMP (or another format Pillow reads) -> H x W x 3 uint8 RGB.

    The pixel limit is checked on the header, before decoding. EXIF orientation is ignored, as
    the training data loader ignores it. Every path yields the pixels Pillow gives (for CMYK JPEGs
    within one level: Pillow converts CMYK to RGB itself), but for 16-bit PNGs, which OpenCV scales
    to 8 bits where Pillow's RGB conversion clips every value above 255 to white.
    """
    if data[:2] == _JPEG_SOI:
        pixels = _decode_jpeg(data, max_pixels)
        if pixels is not None:
            return pixels
    return _decode_other(data, max_pixels)


def _decode_jpeg(data: bytes, max_pixels: int | None) -> np.ndarray | None:
    """The common case, person crops as JPEG, through TurboJPEG directly: its header read costs
    about 1 us against Pillow's 30, and it decodes in about two thirds of OpenCV's time
    (docs/performance.md).

    None when TurboJPEG's header reader refuses what libjpeg's general decoder may still read (an
    unusual sampling layout, stray bytes between header segments): ``_decode_other`` then decodes
    it or gives the error. Past the header, both refuse the same data (checked on 20,000 random
    corruptions of a valid JPEG), so a corrupt image is not decoded twice.
    """
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    _check_pixels(width, height, max_pixels)
    _refuse_truncated_jpeg(data)
    try:
        # Not strict: like OpenCV and Pillow, accept what libjpeg only warns about in the image
        # data (for instance stray bytes before the end marker, common from cameras).
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
    except ValueError as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")


def _decode_other(data: bytes, max_pixels: int | None) -> np.ndarray:
    """PNG, WebP, BMP through OpenCV, other formats through Pillow; Pillow reads the header first."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.width, img.height, max_pixels)
            size, fmt = (img.height, img.width), img.format
            if fmt not in _OPENCV_FORMATS:
                return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("cannot decode image: not a JPEG, PNG or other supported image") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None
    if fmt == "JPEG":
        _refuse_truncated_jpeg(data)
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS)
    except cv2.error as exc:
        raise ImageError(f"cannot decode image: {str(exc).strip().splitlines()[-1]}") from None
    if pixels is None or pixels.shape[:2] != size:
        raise ImageError(f"cannot decode image: corrupt {fmt} data")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8 RGB -> height x width x 3 uint8: the one resize of training, evaluation and serving.

    Area averaging when the image shrinks along either axis (antialiased, like Pillow's resize),
    bilinear when it only grows. On CUHK03 with the OSNet model this scores within noise of
    Pillow's bicubic and bilinear resizing (docs/performance.md) at a fifth of the time.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected an H x W x 3 uint8 image, got shape {image.shape} and dtype {image.dtype}")
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ImageError("image has no pixels")
    if (h, w) == (height, width):
        return np.ascontiguousarray(image)
    interpolation = cv2.INTER_AREA if h > height or w > width else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


class Engine(abc.ABC):
    """Load once, then run batches. Subclasses implement ``_run`` and set ``metadata``/``max_batch_size``."""

    metadata: ModelMetadata
    max_batch_size: int = 64
    name: str = "engine"
    # True when ``run`` may be called from several threads at once (several batches in flight).
    thread_safe_run: bool = False
    # Batches to keep in flight to use the hardware well; the server's default instance count.
    instances: int = 1
    # True where the first run at each batch size is slow (GPU runtimes pick kernels per shape):
    # the server then runs every batch size once before it reports SERVING.
    warm_each_batch_size: bool = False
    # Whose embeddings these are: galleries record it, so that images are never searched against
    # a gallery another model filled (a retrained model of the same width ranks at random there).
    model_id: str = ""
    # True when ``metadata``'s preprocessing came from the caller's fallback (the model has none of
    # its own); False when the model file's metadata won and any fallback was left unused.
    uses_fallback: bool = False

    def _identify(self, path: Path) -> None:
        """Set ``model_id``: the training checkpoint's hash where the file carries it (its ONNX, FP16
        ONNX and TensorRT engine then share one id), else the file's own."""
        if self.metadata.checkpoint_sha256:
            self.model_id = self.metadata.checkpoint_sha256[:16]
            return
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.model_id = digest.hexdigest()[:16]

    @property
    def label(self) -> str:
        """The engine as the server's startup line names it: its name and what it chose at load."""
        return self.name

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x H x W float32 -> N x D float32 (N <= max_batch_size)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x H x W float input in 0..1 -> embeddings; applies the metadata's normalization if the graph lacks it."""
        return self._run_chunks(self.metadata.normalize(np.ascontiguousarray(batch, dtype=np.float32)))

    def run_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB, already at the input size -> embeddings. The server's path: images
        wait in the queue as bytes (a quarter of the memory) and are converted once per batch."""
        return self._run_chunks(self.metadata.to_input(pixels))

    def _run_chunks(self, model_input: np.ndarray) -> np.ndarray:
        outs = [self._embeddings(self._run(chunk), len(chunk))
                for chunk in (model_input[i : i + self.max_batch_size] for i in range(0, len(model_input), self.max_batch_size))]
        if not outs:
            return np.zeros((0, self.metadata.embedding_dim), np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)

    def _embeddings(self, out: np.ndarray, n: int) -> np.ndarray:
        """``out`` as n x D, or a ``ModelFileError`` saying what the model returned instead. Trailing
        1 x 1 dimensions (a pooled map left unflattened: N x D x 1 x 1) are dropped. A graph whose
        output size is dynamic gets its ``embedding_dim`` from the first run. Caught here, a model of
        the wrong shape fails the server's warm-up in one line instead of failing every request."""
        out = np.asarray(out)
        if out.ndim > 2 and all(d == 1 for d in out.shape[2:]):
            out = out.reshape(out.shape[0], out.shape[1])
        dim = self.metadata.embedding_dim
        if out.ndim != 2 or out.shape[0] != n or (dim and out.shape[1] != dim):
            raise ModelFileError(f"the model returned an output of shape {list(out.shape)} for {n} images; "
                                 f"expected {n} x {dim or 'D'} embeddings")
        if not dim:
            self.metadata.embedding_dim = int(out.shape[1])
        return out

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded RGB images (any size) -> embeddings, in order."""
        md = self.metadata
        return self.run_pixels(np.stack([resize(img, md.input_height, md.input_width) for img in images]))
