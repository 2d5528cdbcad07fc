"""TensorRT engine runtime with cuda-python device buffers, pinned host memory and one CUDA stream.

UNVERIFIED: written against TensorRT 10.x/11.x (``execute_async_v3``, named I/O tensors) and
cuda-python's runtime bindings, but never run by us: the development machines have no GPU and
the lent GPU machine has no TensorRT. Tests for it are marked GPU-only and skip elsewhere. The
names it uses exist in TensorRT 11.4's bindings and cuda-python 13.4, and the cuda-python calls
were run on a CPU machine, where each returned ``(cudaErrorInsufficientDriver, None)``.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from serving.engines.base import Engine, ModelFileError, ModelMetadata


def cuda_runtime():
    """cuda-python's runtime module (``cuda.bindings.runtime`` on 12.6+, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def _check(result):
    """cuda-python returns ``(error, value...)``; the value, or RuntimeError naming the error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise RuntimeError(f"CUDA error {int(err)} ({name})")
    return rest[0] if len(rest) == 1 else rest


def sidecar_path(engine: str | Path) -> Path:
    """The JSON that reid-export writes beside an engine: its profile and the model's reid metadata."""
    return Path(str(engine) + ".json")


class TensorRTEngine(Engine):
    name = "tensorrt"
    warm_each_batch_size = True  # a new input shape makes TensorRT re-plan the context

    def __init__(self, path: str | Path):
        path = Path(path)
        sidecar = sidecar_path(path)
        if not sidecar.is_file():
            raise ModelFileError(f"{path} has no sidecar {sidecar.name}; rebuild it with reid-export")
        try:
            info = json.loads(sidecar.read_text())
            props = info.get("metadata", {}) if isinstance(info, dict) else None
        except ValueError as exc:
            raise ModelFileError(f"{sidecar} is not JSON ({exc}); rebuild the engine with reid-export") from None
        self.metadata = ModelMetadata.from_props(props or {})
        if self.metadata is None:
            raise ModelFileError(f"{sidecar} lacks reid metadata; rebuild from an ONNX file with metadata or give preprocessing")
        self._identify(path)
        try:
            import tensorrt as trt

            self.cudart = cuda_runtime()
        except ImportError as exc:
            raise ModelFileError(f"{path} is a TensorRT engine, but {exc.name or 'tensorrt'} is not installed here "
                                 "(TensorRT and cuda-python need an NVIDIA GPU); serve the ONNX file instead") from None
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:  # TensorRT's own reason went to its logger, above
            source = info.get("source_onnx") or "MODEL.onnx"
            raise ModelFileError(
                f"{path} does not load with TensorRT {trt.__version__} on this GPU (it was built with TensorRT "
                f"{info.get('tensorrt_version', '(unknown)')}): an engine runs only with the TensorRT version and GPU "
                f"model it was built for; rebuild it on this machine: reid-export --onnx {source} --engine {path}")
        self.context = self.engine.create_execution_context()
        self.input_name = self.metadata.input_name
        self.output_name = self.metadata.output_name
        self.max_batch_size = int(info["profile"]["max"])
        self.stream = _check(self.cudart.cudaStreamCreate())
        md = self.metadata
        in_bytes = self.max_batch_size * 3 * md.input_height * md.input_width * 4
        out_bytes = self.max_batch_size * md.embedding_dim * 4
        self.d_in = _check(self.cudart.cudaMalloc(in_bytes))
        self.d_out = _check(self.cudart.cudaMalloc(out_bytes))
        self.h_in_ptr = _check(self.cudart.cudaMallocHost(in_bytes))
        self.h_out_ptr = _check(self.cudart.cudaMallocHost(out_bytes))
        self.h_in = np.ctypeslib.as_array((ctypes.c_float * (in_bytes // 4)).from_address(self.h_in_ptr))
        self.h_out = np.ctypeslib.as_array((ctypes.c_float * (out_bytes // 4)).from_address(self.h_out_ptr))
        self.context.set_tensor_address(self.input_name, int(self.d_in))
        self.context.set_tensor_address(self.output_name, int(self.d_out))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        md = self.metadata
        cu = self.cudart
        self.h_in[: batch.size] = batch.ravel()
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        _check(cu.cudaMemcpyAsync(self.d_in, self.h_in_ptr, batch.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):  # TensorRT takes the stream as an integer handle
            raise RuntimeError("TensorRT execution failed")
        out_bytes = n * md.embedding_dim * 4
        _check(cu.cudaMemcpyAsync(self.h_out_ptr, self.d_out, out_bytes, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(cu.cudaStreamSynchronize(self.stream))
        return self.h_out[: n * md.embedding_dim].reshape(n, md.embedding_dim).copy()

    def close(self) -> None:
        cu = self.cudart
        for ptr in (self.d_in, self.d_out):
            cu.cudaFree(ptr)
        for ptr in (self.h_in_ptr, self.h_out_ptr):
            cu.cudaFreeHost(ptr)
        cu.cudaStreamDestroy(self.stream)
