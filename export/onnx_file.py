"""ONNX files as files: read, check, inspect and run them. Torch-free, so that building an FP16
copy or a TensorRT engine from an ONNX file works where PyTorch is not installed (the serving
image, on the GPU that will run the engine); only ``export.onnx`` exports from a checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from export.errors import ExportError
from serving.engines.base import first_line


def check_graph(proto: onnx.ModelProto, what: str) -> None:
    """``onnx.checker`` with shape inference; a failure names the problem instead of passing a bad file on."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{what} fails onnx.checker: {first_line(exc)}") from None


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file's graph (without external weights). A file that is not one is an ExportError
    naming it: protobuf's parser raised a traceback, and an empty file parsed as an empty model."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and whatever else a stray format trips
        raise ExportError(f"{path} is not an ONNX model ({first_line(exc)})") from None
    if not proto.graph.input or not proto.graph.output:
        raise ExportError(f"{path} is not an ONNX model (it has no graph inputs and outputs: empty, or another format)")
    return proto


def static_input(proto: onnx.ModelProto, path) -> tuple[str, int, int, int]:
    """(name, channels, height, width) of the graph's input, which must be N x C x H x W with static H, W."""
    graph_input = proto.graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[2] or not dims[3]:
        raise ExportError(f"{path}: input {graph_input.name!r} must be N x 3 x H x W with static H and W, got {dims}")
    return graph_input.name, dims[1], dims[2], dims[3]


def run_onnx(path: str | Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]
