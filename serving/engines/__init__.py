"""Engines behind one interface: ONNX Runtime (CPU or CUDA) and TensorRT (GPU)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

# ONNX Runtime's PyPI builds (1.32 here) send usage telemetry to Microsoft's 1DS collector from
# Linux too, and keep a device id and an event cache under ~/.cache/Microsoft: network calls from
# a server, an evaluation or an export that users run offline, files written wherever HOME points,
# and in a read-only container a warning line on stderr (past ``--log-format json``) at every
# start. ``ORT_DISABLE_TELEMETRY=1`` turns all of it off, but only when set before onnxruntime is
# first imported; every import of it in this project follows this package's. A user's own setting
# (0, to opt in) wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from serving.engines.base import (Engine, ImageError, ModelFileError, ModelMetadata, NoPreprocessingMetadata, check_pixel_flags,
                                  decode_image, resize, warn_if_wide)
from serving.engines.tensorrt import sidecar_path

__all__ = ["Engine", "ImageError", "ModelFileError", "ModelMetadata", "NoPreprocessingMetadata", "check_pixel_flags",
           "decode_image", "model_kind", "open_engine", "resize", "warn_if_wide"]


def model_kind(path: str | Path) -> str:
    """``onnx`` or ``tensorrt`` by content (a TensorRT plan has a sidecar JSON from ``reid-export``)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder; give the model file in it (.onnx, or .engine with its .json)")
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if sidecar_path(path).is_file() and path.suffix != ".onnx":
        return "tensorrt"
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
        return "onnx"
    except Exception:
        if _is_torch_checkpoint(path):  # the likeliest mix-up: a training checkpoint given as the model
            raise ModelFileError(f"{path} is a PyTorch checkpoint; serving takes an exported model: "
                                 f"reid-export --checkpoint {path} --onnx {path.with_suffix('.onnx')}") from None
        raise ModelFileError(
            f"{path} is neither an ONNX model nor a TensorRT engine with its sidecar JSON ({path.name}.json)"
        ) from None


def _is_torch_checkpoint(path: Path) -> bool:
    """A ``torch.save`` archive (a zip holding ``NAME/data.pkl``), told without importing torch."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def open_engine(path: str | Path, device: str = "auto", fallback: ModelMetadata | None = None,
                intra_op_threads: int = 0, max_batch_size: int = 64, instances: int = 1,
                graph_optimization: str = "auto") -> Engine:
    """Load the right engine for ``path``; ``fallback`` supplies preprocessing for models without metadata.

    ``instances``: batches the caller keeps in flight at once (the server may run several; 0 = the
    engine picks what suits its hardware, which it reports as ``Engine.instances``).
    """
    kind = model_kind(path)
    if kind == "tensorrt":
        if instances > 1:
            raise ValueError(f"{instances} instances asked for, but a TensorRT engine here runs one batch at a time "
                             "(one execution context): use 1")
        from serving.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(path)
    from serving.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path, device, intra_op_threads, fallback, max_batch_size, instances, graph_optimization)
