"""Checkpoint -> ONNX with a dynamic batch axis, embedded metadata and a parity check against PyTorch.

The graph takes ``images`` (N x 3 x H x W float32 RGB in 0..1; normalization is inside the model)
and returns ``embeddings`` (N x D), optionally L2-normalized. ``metadata_props`` carry everything a
runtime needs (input size, embedding size, normalization, backbone, spec and checkpoint hashes).
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from export.onnx_file import check_graph, run_onnx
from export.verify import CHECK_BATCHES, check_inputs, check_parity
from serving.engines.base import ModelMetadata
from training.checkpoint import file_sha256
from training.embed import model_from_checkpoint
from training.outputs import replaced_on_success

OPSET = 17
ONNX_PARITY = 0.9999


class EmbeddingGraph(nn.Module):
    """The eval-mode embedding, optionally L2-normalized, as the exported function."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.model, self.normalize = model.eval(), normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.model(images)
        return nn.functional.normalize(emb, dim=1) if self.normalize else emb


def export_onnx(checkpoint: str | Path, onnx_path: str | Path, normalize_output: bool = False,
                batch_sizes: tuple[int, ...] = CHECK_BATCHES) -> dict:
    """Export, check and verify; returns a report. A file that fails a check replaces nothing and is deleted."""
    checkpoint, onnx_path = Path(checkpoint), Path(onnx_path)
    start = time.perf_counter()
    model, ckpt = model_from_checkpoint(str(checkpoint))
    args = model.args
    graph = EmbeddingGraph(model, normalize_output).eval()
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, args.input_height, args.input_width)
    meta = ModelMetadata(
        input_height=args.input_height, input_width=args.input_width, embedding_dim=args.feat_dim,
        output_normalized=normalize_output, backbone=args.backbone,
        spec_sha256=hashlib.sha256(json.dumps(ckpt.get("spec", {}), sort_keys=True).encode()).hexdigest(),
        checkpoint_sha256=file_sha256(checkpoint),
    )
    parity = {}
    with replaced_on_success(onnx_path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python values
            torch.onnx.export(
                graph, (example,), str(tmp), input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=OPSET, dynamo=False,
            )
        graph.eval()  # the exporter restores the mode it found on the wrapper's children; keep all in eval
        proto = onnx.load(str(tmp))
        for key, value in meta.to_props().items():
            proto.metadata_props.add(key=key, value=value)
        check_graph(proto, "exported graph")
        onnx.save(proto, str(tmp))
        export_seconds = time.perf_counter() - start
        for n, batch in check_inputs(batch_sizes, args.input_height, args.input_width).items():
            with torch.no_grad():
                expected = graph(torch.from_numpy(batch)).numpy()
            parity[n] = check_parity(expected, run_onnx(tmp, batch), ONNX_PARITY, f"ONNX Runtime vs PyTorch at batch {n}")
    return {"onnx": str(onnx_path), "export_seconds": export_seconds, "parity_min_cosine": parity,
            "size_bytes": onnx_path.stat().st_size, "metadata": meta}
