"""Mixed-precision ONNX -> TensorRT engine (GPU machines only; imported lazily).

UNVERIFIED: written against the TensorRT 10.x/11.x Python API and cuda-python, but never run by us
(the development machines have no GPU and the lent GPU machine has no TensorRT). Every TensorRT
name used here appears in TensorRT 11.4's Python bindings (tensorrt_cu13_bindings 11.4.0.106,
inspected without its libraries, which PyPI does not carry).

The network is strongly typed (explicit flag on 10.x, the only mode on 11.x), so precision comes
from the ONNX graph (see ``export.fp16``). One optimization profile covers min/opt/max batch; a
timing cache file is reused across builds; the ONNX metadata goes into a sidecar JSON next to the
engine, which ``serving.engines.tensorrt`` reads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import onnx

from export.errors import ExportError
from export.onnx_file import static_input
from serving.engines.tensorrt import sidecar_path


def gpu_available() -> tuple[bool, str]:
    """(True, "") when TensorRT imports and a CUDA device is visible, else (False, why)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (pip install '.[gpu]' on a machine with an NVIDIA GPU)"
    try:
        from serving.engines.tensorrt import cuda_runtime

        cudart = cuda_runtime()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return False, "no CUDA device is visible"
    except ImportError:
        return False, "cuda-python is not installed (pip install '.[gpu]')"
    return True, ""


def check_profile(min_batch: int, opt_batch: int, max_batch: int, workspace_gb: float) -> None:
    """Refuse a batch profile or workspace TensorRT would refuse, before any stage runs (the
    pipeline checks it first, so a typo does not cost an ONNX export and an FP16 conversion)."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"need 1 <= --min-batch ({min_batch}) <= --opt-batch ({opt_batch}) <= --max-batch ({max_batch})")
    if not workspace_gb > 0:
        raise ExportError(f"--workspace-gb must be above 0, got {workspace_gb}")


def build_engine(onnx_path: str | Path, engine_path: str | Path, min_batch: int = 1, opt_batch: int = 16,
                 max_batch: int = 64, workspace_gb: float = 4.0, timing_cache: str | Path | None = None) -> dict:
    """Build and serialize the engine; writes ``engine_path`` and ``engine_path + '.json'``."""
    check_profile(min_batch, opt_batch, max_batch, workspace_gb)
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    input_name, channels, height, width = static_input(proto, onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:  # 11.x is always strongly typed and deprecates the flag
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"node {e.node()} ({e.node_name()}, {e.node_operator()}): {e.desc()}")
        raise ExportError(f"TensorRT cannot parse {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, channels, height, width), (opt_batch, channels, height, width),
                      (max_batch, channels, height, width))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else engine_path.with_name("timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT engine build failed (see the TensorRT log above)")
    seconds = time.perf_counter() - start
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(cache.serialize()))
    sidecar = {
        "format": "tensorrt", "tensorrt_version": trt.__version__, "source_onnx": str(onnx_path),
        "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch}, "metadata": props,
    }
    sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=2))
    return {"engine": str(engine_path), "build_seconds": seconds, "timing_cache": str(cache_path)}
