"""The export stages in order, each checked against the one before it:
checkpoint -> ONNX (vs PyTorch) -> FP16 ONNX (vs FP32 ONNX) -> TensorRT engine (vs FP32 ONNX)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from export.errors import ExportError, warn
from export.fp16 import convert_fp16
from export.onnx_file import read_onnx, run_onnx, static_input
from export.verify import CHECK_BATCHES, check_inputs, check_parity
from serving.engines.base import ModelMetadata, check_pixel_flags
from serving.engines.tensorrt import sidecar_path
from training.outputs import replaced_on_success

FP16_PARITY = 0.999
ENGINE_PARITY = 0.999


@dataclass
class Stage:
    name: str
    output: str
    seconds: float
    parity: dict = field(default_factory=dict)


def fp16_path_for(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".fp16.onnx")


def onnx_input_size(path: Path) -> tuple[int, int]:
    _, _, h, w = static_input(read_onnx(path), path)
    return h, w


def compare_onnx(reference: Path, candidate: Path, threshold: float, what: str) -> dict:
    h, w = onnx_input_size(reference)
    return {n: check_parity(run_onnx(reference, b), run_onnx(candidate, b), threshold, f"{what} at batch {n}")
            for n, b in check_inputs(CHECK_BATCHES, h, w).items()}


def ensure_metadata(onnx_path: Path, pixel_mean: list | None, pixel_std: list | None) -> dict:
    """The reid metadata of an ONNX file; for files from other tools, built from the graph and the
    preprocessing given on the command line (without it the engine could not be served)."""
    proto = read_onnx(onnx_path)
    props = {p.key: p.value for p in proto.metadata_props}
    if ModelMetadata.from_props(props) is not None:
        if pixel_mean is not None:
            warn(f"--pixel-mean/--pixel-std ignored: {onnx_path} carries its own reid metadata")
        return props
    if not pixel_mean or not pixel_std:
        raise ExportError(f"{onnx_path} carries no reid metadata: give --pixel-mean and --pixel-std "
                          "(e.g. 0.485 0.456 0.406 / 0.229 0.224 0.225 for ImageNet-normalized models)")
    h, w = onnx_input_size(onnx_path)
    out_dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    return ModelMetadata(input_height=h, input_width=w, embedding_dim=out_dims[-1], pixel_mean=list(pixel_mean),
                         pixel_std=list(pixel_std), input_name=proto.graph.input[0].name,
                         output_name=proto.graph.output[0].name).to_props()


def engine_parity(engine_path: Path, reference_onnx: Path) -> dict:
    from serving.engines.tensorrt import TensorRTEngine

    engine = TensorRTEngine(engine_path)
    h, w = onnx_input_size(reference_onnx)
    results = {}
    for n, batch in check_inputs(CHECK_BATCHES + (engine.max_batch_size,), h, w).items():
        if n > engine.max_batch_size:
            continue
        expected = run_onnx(reference_onnx, engine.metadata.normalize(batch))
        results[n] = check_parity(expected, engine.run(batch), ENGINE_PARITY, f"TensorRT vs ONNX Runtime FP32 at batch {n}")
    return results


def write_sidecar_metadata(engine_path: Path, props: dict) -> None:
    sidecar = sidecar_path(engine_path)
    info = json.loads(sidecar.read_text())
    info["metadata"] = props
    sidecar.write_text(json.dumps(info, indent=2))


def _engine_stage(built_from: Path, onnx_path: Path, engine_path: Path, props: dict, batches: tuple[int, int, int],
                  workspace_gb: float, timing_cache: Path | None) -> tuple[dict, dict]:
    """Build the engine and its sidecar under temporary names and check it against the FP32 ONNX:
    only a pair that passes replaces the engine (and sidecar) already there, so a failed rebuild
    leaves the deployed engine whole, and no sidecar is left without its engine."""
    from export.tensorrt import build_engine

    with replaced_on_success(engine_path) as tmp:
        try:
            info = build_engine(built_from, tmp, *batches, workspace_gb=workspace_gb, timing_cache=timing_cache)
            write_sidecar_metadata(tmp, props)
            parity = engine_parity(tmp, onnx_path)
            sidecar_path(tmp).replace(sidecar_path(engine_path))
        finally:
            sidecar_path(tmp).unlink(missing_ok=True)
    return info, parity


def _check_distinct(checkpoint: Path | None, onnx_path: Path, fp16_onnx: Path | None, engine_path: Path | None) -> None:
    """Every file the pipeline reads or writes is a different one: ``--onnx`` given the checkpoint's
    name replaced the checkpoint with the ONNX file, and the trained weights were gone."""
    named = [("--checkpoint", checkpoint), ("--onnx", onnx_path), ("the --fp16 copy", fp16_onnx), ("--engine", engine_path)]
    seen: dict[Path, str] = {}
    for flag, path in named:
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise ExportError(f"{flag} {path} is the same file as {seen[key]}: give each output its own name "
                              "(writing it would replace the other)")
        seen[key] = f"{flag} {path}"


def run_pipeline(checkpoint: Path | None, onnx_path: Path, engine_path: Path | None = None, fp16: bool = False,
                 fp16_tool: str = "ort", normalize: bool = False, batches: tuple[int, int, int] = (1, 16, 64),
                 workspace_gb: float = 4.0, timing_cache: Path | None = None, pixel_mean=None, pixel_std=None,
                 log=print) -> list[Stage]:
    stages: list[Stage] = []
    outputs = ([onnx_path] if checkpoint is not None else []) + ([fp16_path_for(onnx_path)] if fp16 else []) + \
        ([engine_path] if engine_path is not None else [])
    for path in outputs:  # found otherwise only after the stage, as "NAME.tmp: Is a directory"
        if path.is_dir():
            raise ExportError(f"{path} is a folder; give a file name to write")
    _check_distinct(checkpoint, onnx_path, fp16_path_for(onnx_path) if fp16 else None, engine_path)
    try:
        check_pixel_flags(pixel_mean, pixel_std)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if checkpoint is None:
        if not onnx_path.is_file():
            raise ExportError(f"{onnx_path} does not exist (give --checkpoint to export it)")
        read_onnx(onnx_path)  # before any stage: a corrupt file failed inside the FP16 converter
    if pixel_mean is not None and checkpoint is not None:
        warn("--pixel-mean/--pixel-std ignored: the ONNX export of a checkpoint carries its own reid metadata")
    elif pixel_mean is not None and engine_path is None:
        warn("--pixel-mean/--pixel-std ignored: they go into a TensorRT engine's metadata (--engine); "
             "to serve this ONNX file, give them to reid-serve")
    props = None
    if engine_path is not None:
        from export.tensorrt import check_profile

        check_profile(*batches, workspace_gb)
        if checkpoint is None:  # another tool's ONNX: a missing --pixel-mean is found before any stage runs
            props = ensure_metadata(onnx_path, pixel_mean, pixel_std)
    if checkpoint is not None:
        from export.onnx import export_onnx  # PyTorch: the only stage that needs it

        log(f"[1] ONNX export of {checkpoint} ...")
        report = export_onnx(checkpoint, onnx_path, normalize_output=normalize)
        stages.append(Stage("onnx", str(onnx_path), report["export_seconds"], report["parity_min_cosine"]))
        log(f"    wrote {onnx_path} ({report['size_bytes'] / 2**20:.1f} MiB) in {report['export_seconds']:.1f} s; "
            f"ONNX Runtime vs PyTorch worst row cosine {min(report['parity_min_cosine'].values()):.6f}")
    built_from = onnx_path
    if fp16:
        start = time.perf_counter()
        dst = fp16_path_for(onnx_path)
        log(f"[2] FP16 mixed-precision ONNX with {fp16_tool} ...")
        with replaced_on_success(dst) as tmp:  # a file that fails its check replaces nothing
            convert_fp16(onnx_path, tmp, fp16_tool)
            parity = compare_onnx(onnx_path, tmp, FP16_PARITY, "FP16 ONNX vs FP32 ONNX (ONNX Runtime CPU)")
        stages.append(Stage("fp16_onnx", str(dst), time.perf_counter() - start, parity))
        log(f"    wrote {dst}; worst row cosine vs FP32 {min(parity.values()):.6f}")
        built_from = dst
    if engine_path is not None:
        from export.tensorrt import gpu_available

        ok, why = gpu_available()
        if not ok:
            kept = f"; {built_from} is written: on a GPU machine, reid-export --onnx {onnx_path}" + (
                " --fp16" if fp16 else "") + f" --engine {engine_path} builds it from there" if stages else ""
            raise ExportError(f"cannot build a TensorRT engine here: {why}{kept}")
        props = props or ensure_metadata(onnx_path, None, None)  # the checkpoint's ONNX, just written
        log(f"[3] TensorRT engine from {built_from} (batch {batches[0]}/{batches[1]}/{batches[2]}) ...")
        info, parity = _engine_stage(built_from, onnx_path, engine_path, props, batches, workspace_gb, timing_cache)
        stages.append(Stage("tensorrt", str(engine_path), info["build_seconds"], parity))
        log(f"    wrote {engine_path} in {info['build_seconds']:.1f} s; worst row cosine vs ONNX FP32 {min(parity.values()):.6f}")
    return stages


def verify_only(checkpoint: Path | None, onnx_path: Path, engine_path: Path | None, fp16: bool, log=print) -> list[Stage]:
    """Re-run every applicable parity check on existing files; writes nothing."""
    if checkpoint is None and not fp16 and engine_path is None:  # it checked nothing and exited 0
        raise ExportError("--verify-only compares --onnx with something: give --checkpoint (ONNX vs PyTorch), "
                          "--fp16 (its FP16 copy) or --engine (the TensorRT engine)")
    for path in [checkpoint, onnx_path, fp16_path_for(onnx_path) if fp16 else None, engine_path]:
        if path is not None and not Path(path).is_file():
            raise ExportError(f"--verify-only: {path} does not exist")
    for path in [onnx_path, fp16_path_for(onnx_path) if fp16 else None]:
        if path is not None:
            read_onnx(path)
    stages = []
    if checkpoint is not None:
        import torch

        from training.embed import model_from_checkpoint

        model, _ = model_from_checkpoint(str(checkpoint))
        md = ModelMetadata.from_props({p.key: p.value for p in read_onnx(onnx_path).metadata_props})
        parity = {}
        for n, batch in check_inputs(CHECK_BATCHES, model.args.input_height, model.args.input_width).items():
            with torch.no_grad():
                expected = model(torch.from_numpy(batch))
                if md is not None and md.output_normalized:
                    expected = torch.nn.functional.normalize(expected, dim=1)
            parity[n] = check_parity(expected.numpy(), run_onnx(onnx_path, batch), 0.9999, f"ONNX vs PyTorch at batch {n}")
        stages.append(Stage("onnx", str(onnx_path), 0.0, parity))
    if fp16:
        stages.append(Stage("fp16_onnx", str(fp16_path_for(onnx_path)), 0.0,
                            compare_onnx(onnx_path, fp16_path_for(onnx_path), FP16_PARITY, "FP16 vs FP32 ONNX")))
    if engine_path is not None:
        stages.append(Stage("tensorrt", str(engine_path), 0.0, engine_parity(engine_path, onnx_path)))
    for s in stages:
        log(f"    {s.name}: {s.output} worst row cosine {min(s.parity.values()):.6f}")
    return stages
