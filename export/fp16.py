"""FP32 ONNX -> mixed-precision ONNX (FP16 compute, FP32 inputs/outputs and sensitive ops).

TensorRT 10 deprecated and 11 removed weak typing (``BuilderFlag.FP16``): precision must be in the
graph before the engine build. Two converters are supported:

- ``ort`` (default): ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``). It
  ships inside onnxruntime, so it needs no extra install, and it handles the Identity/initializer
  patterns that onnxconverter-common's converter (its ancestor) rejects on our Swin exports.
- ``autocast``: NVIDIA ModelOpt AutoCast (``modelopt.onnx.autocast``), the tool TensorRT's docs
  name; it also keeps nodes whose activations exceed the FP16 range in FP32. It pulls in torch,
  cupy, its own onnx and onnxruntime-gpu, so it lives in the optional ``fp16-autocast`` extra
  (ideally its own environment).

Either way the ops whose FP16 error grows with width or depth stay FP32: LayerNorm, Softmax,
reductions and the final L2 normalization (Div, Sqrt, Pow, ReduceL2).
"""
from __future__ import annotations

from pathlib import Path

import onnx

from export.errors import ExportError
from export.onnx_file import check_graph

KEEP_FP32_OPS = [
    "LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
    "Pow", "Sqrt", "Div", "Exp", "Log",
]
TOOLS = ("ort", "autocast")


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its producers (the ORT converter appends its input casts last)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("FP16 graph has a cycle or an input no node produces")
        for n in ready:
            available.update(n.output)
        ordered += ready
        pending = [n for n in pending if not any(n is r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(src: str | Path, dst: str | Path, tool: str = "ort") -> Path:
    """Write the mixed-precision model to ``dst`` (metadata_props carried over)."""
    src, dst = Path(src), Path(dst)
    if tool == "ort":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=KEEP_FP32_OPS)
        _toposort(model.graph)
    elif tool == "autocast":
        try:
            from modelopt.onnx.autocast import convert_to_mixed_precision
        except ImportError:
            raise ExportError("--fp16-tool autocast needs nvidia-modelopt[onnx] (pip install '.[fp16-autocast]')") from None
        model = convert_to_mixed_precision(
            onnx_path=str(src), low_precision_type="fp16", op_types_to_exclude=KEEP_FP32_OPS, keep_io_types=True
        )
        source_props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        present = {p.key for p in model.metadata_props}
        for key, value in source_props.items():
            if key not in present:
                model.metadata_props.add(key=key, value=value)
    else:
        raise ExportError(f"unknown FP16 tool {tool!r}; choose one of {', '.join(TOOLS)}")
    check_graph(model, "FP16 graph")
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
