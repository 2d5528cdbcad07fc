"""Export: ONNX per backbone, dynamic batch, metadata, FP16 parity, failure paths, TensorRT (GPU only)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.cli import main as export_main
from export.errors import ExportError
from export.onnx import export_onnx
from export.onnx_file import check_graph, run_onnx
from export.pipeline import compare_onnx, run_pipeline
from export.tensorrt import gpu_available
from serving.engines.onnxruntime import OnnxRuntimeEngine
from tests.conftest import quick_overrides
from training.checkpoint import file_sha256
from training.cli import main as training_main
from training.config.load import build_spec
from training.data.market1501 import load_query
from training.data.transforms import build_eval_transform, read_image
from training.embed import model_from_checkpoint
from training.engine import Trainer

BACKBONES = ["resnet_50", "swin_base_patch4_window7_224", "swin_small_patch4_window7_224", "swin_tiny_patch4_window7_224"]


def _checkpoint(root, out, backbone="swin_tiny_patch4_window7_224", **extra):
    overrides = {"model.backbone": backbone, "train.num_epochs": 1}
    if backbone == "resnet_50":
        overrides["model.backbone_overrides"] = "{}"
    overrides.update(extra)
    spec = build_spec({}, quick_overrides(root, out, **overrides))
    return Trainer(spec, torch.device("cpu")).fit()


@pytest.fixture(scope="module")
def swin_ckpt(tmp_path_factory, synthetic_root):
    return _checkpoint(synthetic_root, tmp_path_factory.mktemp("swin"))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_exports_with_parity(backbone, synthetic_root, tmp_path):
    ckpt = _checkpoint(synthetic_root, tmp_path, backbone)
    report = export_onnx(ckpt, tmp_path / "m.onnx")
    assert set(report["parity_min_cosine"]) == {1, 7}
    assert min(report["parity_min_cosine"].values()) >= 0.9999
    onnx.checker.check_model(str(tmp_path / "m.onnx"))


def test_dynamic_batch_metadata_and_values(swin_ckpt, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(swin_ckpt, path, normalize_output=True)
    model, ckpt = model_from_checkpoint(str(swin_ckpt))
    for n in (1, 3, 64):
        batch = np.random.default_rng(n).random((n, 3, 64, 32), dtype=np.float32)
        out = run_onnx(path, batch)
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model(torch.from_numpy(batch)), dim=1).numpy()
        assert out.shape == (n, 32)
        np.testing.assert_allclose(out, ref, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    md = OnnxRuntimeEngine(path).metadata  # as the server reads it
    assert (md.input_height, md.input_width, md.embedding_dim) == (64, 32, 32)
    assert md.output_normalized and md.backbone == "swin_tiny_patch4_window7_224" and md.pixel_mean == []
    assert md.checkpoint_sha256 == file_sha256(swin_ckpt) and len(md.spec_sha256) == 64
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["embeddings"]
    assert proto.opset_import[0].version >= 17


def test_normalization_happens_exactly_once(swin_ckpt, synthetic_root, tmp_path):
    """An image through training transforms + PyTorch equals the same file through serving preprocessing + ONNX."""
    path = tmp_path / "m.onnx"
    export_onnx(swin_ckpt, path)
    model, _ = model_from_checkpoint(str(swin_ckpt))
    records = load_query(synthetic_root / "query")[:4]
    transform = build_eval_transform(64, 32)
    with torch.no_grad():
        expected = model(torch.stack([transform(read_image(r.path)) for r in records])).numpy()
    engine = OnnxRuntimeEngine(path)
    from serving.engines import decode_image

    got = engine.embed_images([decode_image(Path(r.path).read_bytes()) for r in records])
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.9999
    # normalizing a second time outside the graph would visibly change the embedding
    engine.metadata.pixel_mean, engine.metadata.pixel_std = [0.5] * 3, [0.5] * 3
    twice = engine.embed_images([decode_image(Path(r.path).read_bytes()) for r in records])
    assert np.abs(twice - expected).max() > 1e-2


def test_fp16_onnx_parity(swin_ckpt, tmp_path):
    stages = run_pipeline(swin_ckpt, tmp_path / "m.onnx", fp16=True, log=lambda *_: None)
    assert [s.name for s in stages] == ["onnx", "fp16_onnx"]
    fp16 = onnx.load(str(tmp_path / "m.fp16.onnx"))
    assert any(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # FP32 I/O
    assert min(stages[1].parity.values()) >= 0.999
    assert OnnxRuntimeEngine(tmp_path / "m.fp16.onnx").metadata == OnnxRuntimeEngine(tmp_path / "m.onnx").metadata


def test_parity_failure_leaves_no_file(swin_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("export.onnx.ONNX_PARITY", 1.5)  # unreachable: every row fails
    with pytest.raises(ExportError, match="parity check failed"):
        export_onnx(swin_ckpt, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_fp16_parity_failure_leaves_no_fp16_file(swin_ckpt, tmp_path, monkeypatch):
    """The FP16 model stayed on disk after failing its check, ready to be deployed by mistake; and
    one from an earlier export was deleted with it."""
    monkeypatch.setattr("export.pipeline.FP16_PARITY", 1.5)  # unreachable: every row fails
    with pytest.raises(ExportError, match="parity check failed"):
        run_pipeline(swin_ckpt, tmp_path / "m.onnx", fp16=True, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # the FP32 model passed its own check
    (tmp_path / "m.fp16.onnx").write_bytes(b"an earlier export's FP16 model")
    with pytest.raises(ExportError, match="parity check failed"):
        run_pipeline(swin_ckpt, tmp_path / "m.onnx", fp16=True, log=lambda *_: None)
    assert (tmp_path / "m.fp16.onnx").read_bytes() == b"an earlier export's FP16 model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.onnx", "m.onnx"]


@pytest.mark.parametrize("parity_passes", [True, False])
def test_an_engine_replaces_the_one_there_only_with_its_sidecar_and_once_checked(swin_ckpt, tmp_path, monkeypatch,
                                                                                  parity_passes):
    """The engine stage's file handling, with TensorRT's build and run replaced (no GPU here): a
    rebuild that failed its parity check deleted the engine already deployed and left the new
    sidecar beside nothing."""
    import export.pipeline
    import export.tensorrt

    def build(onnx_path, engine_path, *batches, **options):
        engine_path.write_bytes(b"new engine")
        Path(str(engine_path) + ".json").write_text('{"format": "tensorrt", "built": "new"}')
        return {"build_seconds": 0.1}

    def parity(engine_path, reference):
        assert engine_path.read_bytes() == b"new engine" and Path(str(engine_path) + ".json").is_file()
        if not parity_passes:
            raise ExportError("parity check failed: TensorRT vs ONNX Runtime FP32 at batch 1")
        return {1: 0.9999}

    monkeypatch.setattr(export.tensorrt, "gpu_available", lambda: (True, ""))
    monkeypatch.setattr(export.tensorrt, "build_engine", build)
    monkeypatch.setattr(export.pipeline, "engine_parity", parity)
    engine, sidecar = tmp_path / "m.engine", tmp_path / "m.engine.json"
    engine.write_bytes(b"old engine")
    sidecar.write_text('{"built": "old"}')
    run = lambda: run_pipeline(swin_ckpt, tmp_path / "m.onnx", engine, log=lambda *_: None)  # noqa: E731
    if parity_passes:
        assert run()[-1].name == "tensorrt"
        assert engine.read_bytes() == b"new engine"
        info = json.loads(sidecar.read_text())
        assert info["built"] == "new" and info["metadata"]["reid.input_height"] == "64"
    else:
        with pytest.raises(ExportError, match="parity check failed"):
            run()
        assert engine.read_bytes() == b"old engine" and json.loads(sidecar.read_text()) == {"built": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json", "m.onnx"]


@pytest.mark.parametrize("flags, says", [
    (["--onnx", "m.pth"], "--onnx {d}/m.pth is the same file as --checkpoint {d}/m.pth"),
    (["--onnx", "m.onnx", "--engine", "m.pth"], "--engine {d}/m.pth is the same file as --checkpoint {d}/m.pth"),
    (["--onnx", "m.onnx", "--engine", "m.onnx"], "--engine {d}/m.onnx is the same file as --onnx {d}/m.onnx"),
    (["--onnx", "m.onnx", "--fp16", "--engine", "m.fp16.onnx"],
     "--engine {d}/m.fp16.onnx is the same file as the --fp16 copy {d}/m.fp16.onnx"),
])
def test_an_output_named_as_another_file_of_the_export_is_refused(swin_ckpt, tmp_path, capsys, flags, says):
    """`reid-export --checkpoint m.pth --onnx m.pth` replaced the checkpoint with the ONNX file."""
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(swin_ckpt.read_bytes())
    argv = ["--checkpoint", str(ckpt)] + [str(tmp_path / f) if f.startswith("m.") else f for f in flags]
    assert export_main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"reid-export: error: {says.format(d=tmp_path)}: give each output its own "
                                               "name (writing it would replace the other)")
    assert ckpt.read_bytes() == swin_ckpt.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


def test_checker_rejects_a_broken_graph():
    node = helper.make_node("Relu", ["missing"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ExportError, match="fails onnx.checker"):
        check_graph(helper.make_model(graph), "broken graph")


def test_fp16_comparison_catches_a_wrong_model(swin_ckpt, synthetic_root, tmp_path):
    export_onnx(swin_ckpt, tmp_path / "a.onnx")
    other = _checkpoint(synthetic_root, tmp_path / "other", **{"train.seed": 99})
    export_onnx(other, tmp_path / "b.onnx")
    with pytest.raises(ExportError, match="parity check failed"):
        compare_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", 0.999, "different models")


@pytest.mark.skipif(gpu_available()[0], reason="checks the no-GPU message")
def test_engine_without_gpu_is_one_line_and_keeps_onnx(swin_ckpt, tmp_path, capsys):
    code = export_main(["--checkpoint", str(swin_ckpt), "--onnx", str(tmp_path / "m.onnx"), "--engine", str(tmp_path / "m.engine")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot build a TensorRT engine here" in err[0]
    assert err[0].endswith(f"; {tmp_path / 'm.onnx'} is written: on a GPU machine, reid-export --onnx {tmp_path / 'm.onnx'} "
                           f"--engine {tmp_path / 'm.engine'} builds it from there"), err
    assert (tmp_path / "m.onnx").is_file() and not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("flags, message", [
    (["--min-batch", "8", "--opt-batch", "4"], "need 1 <= --min-batch (8) <= --opt-batch (4) <= --max-batch (64)"),
    (["--max-batch", "0", "--min-batch", "0", "--opt-batch", "0"], "need 1 <= --min-batch (0)"),
    (["--workspace-gb", "0"], "--workspace-gb must be above 0, got 0.0"),
])
def test_a_bad_engine_profile_is_refused_before_any_stage(swin_ckpt, tmp_path, capsys, flags, message):
    """Found only by the TensorRT stage before, after the ONNX export and FP16 conversion had run."""
    code = export_main(["--checkpoint", str(swin_ckpt), "--onnx", str(tmp_path / "m.onnx"), "--fp16",
                        "--engine", str(tmp_path / "m.engine"), *flags])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().startswith(f"reid-export: error: {message}") and len(err.strip().splitlines()) == 1
    assert out == "" and list(tmp_path.iterdir()) == []  # no stage ran


def test_unwritable_output_is_one_line(swin_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = export_main(["--checkpoint", str(swin_ckpt), "--onnx", str(blocker / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"reid-export: error: {blocker}"), err
    folder = tmp_path / "m.onnx"
    folder.mkdir()
    assert export_main(["--checkpoint", str(swin_ckpt), "--onnx", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == f"reid-export: error: {folder} is a folder; give a file name to write"
    (tmp_path / "ok.fp16.onnx").mkdir()  # also each later stage's output, before the first stage runs
    assert export_main(["--checkpoint", str(swin_ckpt), "--onnx", str(tmp_path / "ok.onnx"), "--fp16"]) == 2
    assert "ok.fp16.onnx is a folder" in capsys.readouterr().err and not (tmp_path / "ok.onnx").exists()
    assert training_main(["export", f"results_dir={tmp_path}", f"export.checkpoint={swin_ckpt}",  # the TAO form
                          f"export.onnx_file={folder}"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{folder} is a folder; give a file name to write")


def test_tao_form_writes_onnx_next_to_checkpoint(swin_ckpt, synthetic_root, tmp_path, capsys, caplog):
    from training.cli import main

    code = main(["export", *quick_overrides(synthetic_root, tmp_path), f"export.checkpoint={swin_ckpt}"])
    assert code == 0
    assert swin_ckpt.with_suffix(".onnx").is_file()
    assert "export.gpu_id" not in caplog.text
    code = main(["export", *quick_overrides(synthetic_root, tmp_path), f"export.checkpoint={swin_ckpt}", "export.gpu_id=1"])
    assert code == 0 and "export.gpu_id=1 is not used: the ONNX export runs on the CPU" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available()[0], reason=f"needs TensorRT and an NVIDIA GPU: {gpu_available()[1]}")
def test_tensorrt_engine_matches_onnx(swin_ckpt, tmp_path):
    stages = run_pipeline(swin_ckpt, tmp_path / "m.onnx", tmp_path / "m.engine", fp16=True, batches=(1, 8, 16),
                          log=lambda *_: None)
    assert stages[-1].name == "tensorrt" and min(stages[-1].parity.values()) >= 0.999
    assert (tmp_path / "m.engine.json").is_file()


def _foreign_onnx(path: Path) -> Path:
    """An ONNX file from another tool: static 64x32 input, N x 3 output, no reid metadata."""
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["p"]), helper.make_node("Flatten", ["p"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 64, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_another_tools_onnx_gets_its_preprocessing_from_the_flags(tmp_path):
    from export.pipeline import ensure_metadata
    from serving.engines.base import ModelMetadata

    meta = ModelMetadata.from_props(ensure_metadata(_foreign_onnx(tmp_path / "f.onnx"), [0.5] * 3, [0.25] * 3))
    assert (meta.input_height, meta.input_width, meta.embedding_dim) == (64, 32, 3)
    assert (meta.pixel_mean, meta.pixel_std, meta.input_name, meta.output_name) == ([0.5] * 3, [0.25] * 3, "images", "out")


@pytest.mark.parametrize("flags, message", [
    ([], "f.onnx carries no reid metadata: give --pixel-mean and --pixel-std"),
    (["--pixel-mean", "0.5", "0.5", "0.5"], "give --pixel-mean and --pixel-std together"),
    (["--pixel-mean", "0.5", "0.5", "0.5", "--pixel-std", "0", "1", "1"], "--pixel-std 0.0 1.0 1.0: every value must be above 0"),
    (["--pixel-mean", "123.675", "116.28", "103.53", "--pixel-std", "58.395", "57.12", "57.375"], "look like 0..255 values"),
])
def test_preprocessing_flags_are_checked_before_any_stage(tmp_path, capsys, flags, message):
    """A missing --pixel-mean for another tool's ONNX used to be found after the FP16 conversion."""
    foreign = _foreign_onnx(tmp_path / "f.onnx")
    code = export_main(["--onnx", str(foreign), "--fp16", "--engine", str(tmp_path / "f.engine"), *flags])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("reid-export: error: ") and message in lines[0]
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx"]  # no stage ran


def test_preprocessing_flags_that_would_change_nothing_are_reported(swin_ckpt, tmp_path, capsys):
    flags = ["--pixel-mean", "0.5", "0.5", "0.5", "--pixel-std", "0.25", "0.25", "0.25"]
    assert export_main(["--checkpoint", str(swin_ckpt), "--onnx", str(tmp_path / "m.onnx"), *flags]) == 0
    out, err = capsys.readouterr()  # warnings on stderr, as the stage options' are; the stage log on stdout
    assert "reid-export: --pixel-mean/--pixel-std ignored: the ONNX export of a checkpoint carries its own" in err
    assert "ignored" not in out and "[1] ONNX export" in out
    assert export_main(["--onnx", str(_foreign_onnx(tmp_path / "f.onnx")), "--fp16", *flags]) == 0
    out, err = capsys.readouterr()
    assert "reid-export: --pixel-mean/--pixel-std ignored: they go into a TensorRT engine's metadata" in err
    assert "ignored" not in out


def test_verify_only_rechecks_existing_files_and_writes_nothing(swin_ckpt, synthetic_root, tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    assert export_main(["--checkpoint", str(swin_ckpt), "--onnx", str(onnx_path), "--fp16"]) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert export_main(["--verify-only", "--checkpoint", str(swin_ckpt), "--onnx", str(onnx_path), "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "onnx: " in out and "fp16_onnx: " in out and "summary:" in out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before

    other = _checkpoint(synthetic_root, tmp_path / "other", **{"train.seed": 99})
    capsys.readouterr()
    for argv, says in (
        (["--checkpoint", str(other), "--onnx", str(onnx_path)], "parity check failed"),  # not the model it was exported from
        (["--checkpoint", str(swin_ckpt), "--onnx", str(tmp_path / "none.onnx")], "none.onnx does not exist"),
        (["--onnx", str(onnx_path)], "--verify-only compares --onnx with something"),  # checked nothing, exited 0
    ):
        assert export_main(["--verify-only", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("reid-export: error: ") and says in err[0], err


def test_stage_options_without_their_stage_are_reported(swin_ckpt, tmp_path, capsys):
    """--max-batch without --engine built no engine and said nothing; the same for --fp16-tool without --fp16."""
    argv = ["--checkpoint", str(swin_ckpt), "--onnx", str(tmp_path / "m.onnx"), "--max-batch", "32", "--fp16-tool", "ort"]
    assert export_main(argv) == 0
    err = capsys.readouterr().err
    assert "reid-export: --max-batch ignored: it applies to the --engine stage, which was not asked for" in err
    assert "reid-export: --fp16-tool ignored: it applies to the --fp16 stage" in err
    assert export_main([*argv, "--fp16"]) == 0
    err = capsys.readouterr().err
    assert "--fp16-tool ignored" not in err and "--max-batch ignored" in err


@pytest.mark.parametrize("content, says", [(b"\x08\x07garbage" * 10, "is not an ONNX model (Error parsing message"),
                                           (b"", "is not an ONNX model (it has no graph inputs and outputs")])
@pytest.mark.parametrize("flags", [["--fp16"], ["--verify-only", "--fp16"],
                                   ["--engine", "m.engine", "--pixel-mean", "0.5", "0.5", "0.5", "--pixel-std", "1", "1", "1"]])
def test_an_onnx_file_that_is_not_one_is_one_line_before_any_stage(tmp_path, capsys, monkeypatch, content, says, flags):
    """A corrupt ONNX file given to start from failed inside the FP16 converter with protobuf's
    traceback; an empty one parsed as an empty model and failed later still."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(content)
    (tmp_path / "m.fp16.onnx").write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export_main(["--onnx", "m.onnx", *flags]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"reid-export: error: m.onnx {says}"), err
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == before
