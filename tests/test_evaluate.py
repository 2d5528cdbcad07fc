"""`reid evaluate` and `reid inference` end to end on a synthetic set, and their error paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import quick_overrides
from training.cli import main
from training.config.load import build_spec
from training.engine import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("trained")
    overrides = quick_overrides(synthetic_root, out, **{"train.num_epochs": 1})
    ckpt = train(build_spec({}, overrides))
    return ckpt, overrides


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_checkpoint_writes_json_and_plots(trained, tmp_path, capsys):
    ckpt, overrides = trained
    cmc_png, matches_png = tmp_path / "cmc.png", tmp_path / "m.png"
    code, out, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path}", f"evaluate.checkpoint={ckpt}",
                          "re_ranking.re_ranking=True", "re_ranking.k1=6", "re_ranking.k2=3",
                          f"evaluate.output_cmc_curve_plot={cmc_png}", f"evaluate.output_sampled_matches_plot={matches_png}")
    assert code == 0, err
    report = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert set(report["results"]) == {"without re-ranking", "with re-ranking"}
    for r in report["results"].values():
        assert 0.0 < r["mAP"] <= 1.0 and 0.0 <= r["rank1"] <= r["rank5"] <= r["rank10"] <= 1.0
    assert cmc_png.stat().st_size > 1000 and matches_png.stat().st_size > 1000
    assert "with re-ranking" in out and "mAP" in out


def test_evaluating_on_the_training_folder_is_warned_about(trained, synthetic_root, tmp_path, capsys, caplog):
    ckpt, overrides = trained
    code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path}", f"evaluate.checkpoint={ckpt}")
    assert code == 0, err
    assert "are training images" not in caplog.text
    train_dir = synthetic_root / "bounding_box_train"
    code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path}", f"evaluate.checkpoint={ckpt}",
                        f"evaluate.query_dataset={train_dir}", f"evaluate.test_dataset={train_dir}")
    train_images = len(list(train_dir.iterdir()))
    assert code == 0 and (f"{train_images} of {train_images} query and {train_images} of {train_images} gallery images "
                          "are training images") in caplog.text, err


def test_evaluate_stops_before_embedding_when_no_query_can_be_scored(trained, synthetic_root, tmp_path, capsys, caplog):
    """The training folder's people are not the query's: evaluate embedded every image, then said
    "mAP is undefined"."""
    ckpt, overrides = trained
    test_dir = synthetic_root / "bounding_box_train"
    code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path}", f"evaluate.checkpoint={ckpt}",
                        f"evaluate.test_dataset={test_dir}")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"reid evaluate: error: no query in {synthetic_root / 'query'} has an image of the same person from another "
        f"camera in {test_dir}, so the evaluation has no mAP to report; check the folders")
    assert "query:" not in err and "embedding" not in caplog.text  # no progress bar: nothing was embedded


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_inference_file_scores_like_the_checkpoint(trained, tmp_path, capsys, suffix):
    ckpt, overrides = trained
    out_file = tmp_path / f"emb{suffix}"
    code, _, err = _run(capsys, "inference", *overrides, f"results_dir={tmp_path}", f"inference.checkpoint={ckpt}",
                        f"inference.output_file={out_file}")
    assert code == 0, err
    if suffix == ".json":
        items = json.loads(out_file.read_text())
        assert set(items[0]) == {"img_path", "embedding"} and len(items[0]["embedding"]) == 32
    else:
        data = np.load(out_file)
        assert data["embedding"].shape[1] == 32 and set(data["split"]) == {"query", "gallery"}
    direct, stored = tmp_path / "direct", tmp_path / "stored"
    assert main(["evaluate", *overrides, f"results_dir={direct}", f"evaluate.checkpoint={ckpt}"]) == 0
    assert main(["evaluate", *overrides, f"results_dir={stored}", f"evaluate.checkpoint={out_file}"]) == 0
    a = json.loads((direct / "evaluate" / "results.json").read_text())["results"]
    b = json.loads((stored / "evaluate" / "results.json").read_text())["results"]
    assert a["without re-ranking"]["mAP"] == pytest.approx(b["without re-ranking"]["mAP"], abs=1e-6)


def test_embeddings_that_are_not_finite_are_refused_not_scored(trained, tmp_path, capsys, caplog):
    """A model giving NaN (a broken checkpoint, an FP16 export that overflows) used to score mAP 1.0."""
    ckpt, overrides = trained
    stored = tmp_path / "emb.npz"
    assert main(["inference", *overrides, f"results_dir={tmp_path}", f"inference.checkpoint={ckpt}",
                 f"inference.output_file={stored}"]) == 0
    data = dict(np.load(stored))
    data["embedding"][np.flatnonzero(data["split"] == "query")[:2]] = np.nan
    data["embedding"][np.flatnonzero(data["split"] == "gallery")[0], 3] = np.inf
    np.savez(stored, **data)
    capsys.readouterr()
    code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path}", f"evaluate.checkpoint={stored}")
    n_query, n_gallery = int((data["split"] == "query").sum()), int((data["split"] == "gallery").sum())
    assert code != 0 and err.strip().splitlines()[-1].endswith(
        f"2 of {n_query} query and 1 of {n_gallery} gallery embeddings are not finite (NaN or inf): the model gives "
        "invalid outputs (an FP16 export can overflow); nothing was scored")
    assert not (tmp_path / "evaluate" / "results.json").exists()

    # reid inference keeps them, but JSON has no NaN: null, which reads back as NaN and is refused the same way
    as_json = tmp_path / "emb.json"
    assert main(["inference", *overrides, f"results_dir={tmp_path}", f"inference.checkpoint={stored}",
                 f"inference.output_file={as_json}"]) == 0
    assert f"3 of {n_query + n_gallery} embeddings are not finite (NaN or inf)" in caplog.text
    assert "written as null (JSON has no NaN)" in caplog.text
    items = json.loads(as_json.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    nulls = [i for i, item in enumerate(items) if None in item["embedding"]]
    assert len(nulls) == 3 and sum(v is None for v in items[nulls[-1]]["embedding"]) in (1, len(items[0]["embedding"]))
    code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path}", f"evaluate.checkpoint={as_json}")
    assert code != 0 and "2 of " in err and "1 of " in err and "embeddings are not finite" in err


def test_bad_inputs_give_one_line_and_nonzero_exit(trained, tmp_path, capsys, synthetic_root):
    ckpt, overrides = trained
    unknown = tmp_path / "model.bin"
    unknown.write_bytes(b"\x00garbage" * 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_emb = tmp_path / "bad.json"
    bad_emb.write_text(json.dumps([{"img_path": "a.jpg", "embedding": [1, 2]}, {"img_path": "b.jpg", "embedding": [1]}]))
    cases = [
        ([f"evaluate.checkpoint={unknown}"], "is not a training checkpoint, an ONNX model"),
        ([f"evaluate.checkpoint={tmp_path / 'absent.pth'}"], "does not exist"),
        ([f"evaluate.checkpoint={ckpt}", f"evaluate.query_dataset={tmp_path / 'nope'}"], "does not exist"),
        ([f"evaluate.checkpoint={ckpt}", f"evaluate.query_dataset={empty}"], "no Market-1501-named images"),
        ([f"evaluate.checkpoint={bad_emb}"], "mismatched lengths"),
        ([], "evaluate.checkpoint is required"),
        # Neither evaluate.query_dataset nor the spec's folder: say which key, not "folder . holds no images".
        ([f"evaluate.checkpoint={ckpt}", 'dataset.query_dataset_dir=""'], "set evaluate.query_dataset (or dataset.query_dataset_dir"),
        ([f"evaluate.checkpoint={ckpt}", 'dataset.test_dataset_dir=""'], "set evaluate.test_dataset (or dataset.test_dataset_dir"),
        # The model is checked before any folder is read.
        ([f"evaluate.checkpoint={tmp_path / 'absent.onnx'}", 'dataset.query_dataset_dir=""'], "evaluate.checkpoint="),
        # a URL for a gRPC address: was gRPC's "Misformatted domain name" after the images were checked
        (["evaluate.server=http://127.0.0.1:50051"], "evaluate.server: server address 'http://127.0.0.1:50051' is a URL"),
    ]
    for extra, message in cases:
        code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path}", *extra)
        assert code == 2, (extra, err)
        lines = err.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("reid evaluate: error:"), err
        assert "Traceback" not in err
    for extra, message in [([f"inference.checkpoint={tmp_path / 'absent.pth'}"], "inference.checkpoint="),
                           ([f"inference.checkpoint={ckpt}", 'dataset.query_dataset_dir=""'], "set inference.query_dataset")]:
        code, _, err = _run(capsys, "inference", *overrides, f"results_dir={tmp_path}", *extra)
        assert code == 2 and message in err.strip().splitlines()[-1], (extra, err)


def test_a_missing_model_names_the_last_checkpoint_of_the_results_dir(trained, tmp_path, capsys):
    """The spec that trained a model, given to evaluate/inference/export without a model, said only
    that one is required; the checkpoint training wrote last under its results_dir is the usual answer."""
    ckpt, overrides = trained
    for command in ("evaluate", "inference", "export"):
        code, _, err = _run(capsys, command, *overrides)  # the training run's results_dir
        assert code == 2 and err.strip().splitlines()[-1].endswith(
            f"; the last checkpoint training wrote under results_dir={ckpt.parent.parent} is {command}.checkpoint={ckpt}"), err
        code, _, err = _run(capsys, command, *overrides, f"results_dir={tmp_path}")  # no training there
        assert code == 2 and err.strip().splitlines()[-1].startswith(f"reid {command}: error: {command}.checkpoint is required ("), err
        assert "last checkpoint" not in err


def test_unwritable_outputs_stop_before_any_embedding(trained, tmp_path, capsys, monkeypatch):
    """A typo in an output path used to surface only after every image had been embedded."""
    import training.evaluate
    import training.inference

    def never(*args, **kwargs):
        raise AssertionError("embedded before checking where the results go")

    monkeypatch.setattr(training.evaluate, "open_embedder", never)
    monkeypatch.setattr(training.inference, "open_embedder", never)
    ckpt, overrides = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    cases = [
        ("evaluate", f"evaluate.output_cmc_curve_plot={blocker / 'cmc.png'}",
         f"evaluate.output_cmc_curve_plot={blocker / 'cmc.png'}: cannot create folder {blocker}: "),
        ("evaluate", f"evaluate.output_sampled_matches_plot={folder}",
         f"evaluate.output_sampled_matches_plot={folder} is a folder; give a file name"),
        ("inference", f"inference.output_file={blocker / 'sub' / 'e.json'}", "inference.output_file="),
    ]
    for command, override, message in cases:
        code, _, err = _run(capsys, command, *overrides, f"results_dir={tmp_path}", f"{command}.checkpoint={ckpt}", override)
        assert code == 2 and err.strip().splitlines()[-1].startswith(f"reid {command}: error: {message}"), err
    code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={blocker}", f"evaluate.checkpoint={ckpt}")
    assert code == 2 and "results_dir=" in err, err


def test_training_checks_its_folders_before_the_first_epoch(tmp_path, capsys, synthetic_root):
    """A validation folder that is missing would otherwise stop the run at its first validation,
    after the epochs before it; an unset training folder would read the working directory. Too
    few identities for a PK batch, and a validation split in which no query has a match from
    another camera, ended in tracebacks (the second after the first epochs)."""
    one_camera = tmp_path / "one_camera"
    for split in ("query", "bounding_box_test"):
        (one_camera / split).mkdir(parents=True)
        for path in (synthetic_root / split).glob("*_c1s*.jpg"):
            (one_camera / split / path.name).write_bytes(path.read_bytes())
    cases = [
        ({"train.validation_interval": 2, "dataset.query_dataset_dir": tmp_path / "nope"}, "does not exist"),
        ({"train.validation_interval": 2, "dataset.test_dataset_dir": '""'},
         "set dataset.test_dataset_dir (train.validation_interval=2 evaluates on it)"),
        ({"dataset.train_dataset_dir": '""'}, "set dataset.train_dataset_dir"),
        ({"dataset.batch_size": 18, "dataset.num_instances": 2},  # 9 identities a batch; the set has 8
         "dataset.batch_size=18, dataset.num_instances=2, 1 process(es): PK sampling needs at least 9 identities"),
        ({"train.validation_interval": 2, "dataset.query_dataset_dir": one_camera / "query",
          "dataset.test_dataset_dir": one_camera / "bounding_box_test"},
         "has an image of the same person from another camera"),
    ]
    for i, (extra, message) in enumerate(cases):
        results = tmp_path / f"r{i}"
        code, _, err = _run(capsys, "train", *quick_overrides(synthetic_root, results, **extra))
        assert code == 2 and message in err.strip().splitlines()[-1], (extra, err)
        assert not (results / "train" / "metrics.jsonl").exists()  # no epoch ran
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = _run(capsys, "train", *quick_overrides(synthetic_root, blocker / "results"))
    last = err.strip().splitlines()[-1]
    assert code == 2 and last == (f"reid train: error: results_dir={blocker / 'results'}: cannot create "
                                  f"{blocker / 'results' / 'train'}: Not a directory"), err
    assert "Traceback" not in err


def test_corrupt_training_image_is_one_line(tmp_path, capsys, synthetic_root, monkeypatch):
    import shutil

    import training.engine

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "bounding_box_train").iterdir())[3]
    victim.write_bytes(b"broken")
    code, _, err = _run(capsys, "train", *quick_overrides(root, tmp_path / "r"))
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"reid train: error: 1 of 48 images cannot be read, e.g. {victim}: "), err
    # A file that breaks after the up-front check fails in the loader, in a worker process or not.
    monkeypatch.setattr(training.engine, "check_images", lambda *args, **kwargs: None)
    for workers in (0, 1):
        code, _, err = _run(capsys, "train", *quick_overrides(root, tmp_path / "r", **{"dataset.num_workers": workers}))
        assert code == 2
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"reid train: error: cannot read image {victim}: "), err
        assert "Traceback" not in err


def test_mismatched_embedding_dims(synthetic_root):
    from training.data.market1501 import load_gallery, load_query
    from training.errors import ReidError
    from training.evaluate import score

    spec = build_spec({})
    query, gallery = load_query(synthetic_root / "query"), load_gallery(synthetic_root / "bounding_box_test")
    with pytest.raises(ReidError, match="query embeddings are 8-d but gallery embeddings 16-d"):
        score(np.ones((len(query), 8)), np.ones((len(gallery), 16)), query, gallery, spec.re_ranking)


def test_unreadable_images_stop_evaluate_and_inference_before_any_embedding(trained, tmp_path, capsys, caplog,
                                                                         synthetic_root, monkeypatch, tiny_onnx):
    """Embedding stopped at the first corrupt image, after every image before it, and the rerun at
    the next one; every image is now decoded first and every bad one named."""
    import shutil

    import training.evaluate
    from training.embedders import CheckpointEmbedder, EngineEmbedder

    ckpt, overrides = trained
    stored = tmp_path / "emb.npz"
    assert main(["inference", *overrides, f"results_dir={tmp_path}", f"inference.checkpoint={ckpt}",
                 f"inference.output_file={stored}"]) == 0

    def never(*args, **kwargs):
        raise AssertionError("decoded or embedded too early")

    monkeypatch.setattr(CheckpointEmbedder, "embed", never)
    monkeypatch.setattr(EngineEmbedder, "embed", never)
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victims = [sorted((root / split).glob("*.jpg"))[-1] for split in ("query", "bounding_box_test")]
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[:-200])
    total = len(list((root / "query").glob("*.jpg"))) + len(list((root / "bounding_box_test").glob("*.jpg")))
    folders = [f"dataset.query_dataset_dir={root / 'query'}", f"dataset.test_dataset_dir={root / 'bounding_box_test'}"]
    for command, model in [("evaluate", ckpt), ("evaluate", tiny_onnx), ("inference", ckpt)]:
        caplog.clear()
        code, _, err = _run(capsys, command, *overrides, *folders, f"results_dir={tmp_path / 'r'}", f"{command}.checkpoint={model}")
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith(f"reid {command}: error: 2 of {total} images cannot be read, e.g. {victims[0]}"), err
        assert all(str(v) in caplog.text for v in victims)
    # Stored embeddings read no image to score, so nothing is decoded up front for them.
    monkeypatch.setattr(training.evaluate, "check_images", never)
    assert main(["evaluate", *overrides, f"results_dir={tmp_path / 's'}", f"evaluate.checkpoint={stored}"]) == 0


def test_stored_embeddings_work_from_any_folder(trained, tmp_path, capsys, monkeypatch, synthetic_root):
    """An embeddings file written with relative paths could only be scored from the folder it was
    written in; elsewhere every image was "missing", and the advice was to run inference again."""
    ckpt, overrides = trained
    monkeypatch.chdir(synthetic_root)
    relative = ["dataset.query_dataset_dir=query", "dataset.test_dataset_dir=bounding_box_test"]
    out_file = tmp_path / "emb.npz"
    assert main(["inference", *overrides, *relative, f"results_dir={tmp_path}", f"inference.checkpoint={ckpt}",
                 f"inference.output_file={out_file}"]) == 0
    paths = [str(p) for p in np.load(out_file)["img_path"]]
    assert all(p.startswith("/") for p in paths) and (synthetic_root / "query").resolve().as_posix() in paths[0]
    # a file from an older version, with the relative paths, read from another folder: matched by name
    data = dict(np.load(out_file))
    data["img_path"] = np.array([str(Path(p).relative_to(synthetic_root.resolve())) for p in paths])
    old = tmp_path / "old.npz"
    np.savez(old, **data)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", *overrides, f"results_dir={tmp_path / 'a'}", f"evaluate.checkpoint={old}"]) == 0
    assert main(["evaluate", *overrides, f"results_dir={tmp_path / 'b'}", f"evaluate.checkpoint={out_file}"]) == 0
    a, b = (json.loads((tmp_path / r / "evaluate" / "results.json").read_text())["results"] for r in "ab")
    assert a == b
    data["img_path"] = np.array([f"elsewhere/{i}.jpg" for i in range(len(paths))])
    np.savez(old, **data)
    capsys.readouterr()
    code, _, err = _run(capsys, "evaluate", *overrides, f"results_dir={tmp_path / 'c'}", f"evaluate.checkpoint={old}")
    assert code == 2 and f"{old} holds no embedding for 16 of the 16 query images" in err and "run reid inference on" in err


def test_unreadable_images_in_the_matches_figure_do_not_fail_the_evaluation(trained, tmp_path, capsys, synthetic_root):
    """Scoring stored embeddings reads no image, but the figure does: a corrupt one ended the
    command with an error after results.json was written, and the figures were not printed."""
    import shutil

    ckpt, overrides = trained
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    folders = [f"dataset.query_dataset_dir={root / 'query'}", f"dataset.test_dataset_dir={root / 'bounding_box_test'}"]
    stored = tmp_path / "emb.npz"
    assert main(["inference", *overrides, *folders, f"results_dir={tmp_path}", f"inference.checkpoint={ckpt}",
                 f"inference.output_file={stored}"]) == 0
    for image in (root / "query").glob("*.jpg"):
        image.write_bytes(b"gone bad since")
    capsys.readouterr()
    code, out, err = _run(capsys, "evaluate", *overrides, *folders, f"results_dir={tmp_path / 'e'}",
                          f"evaluate.checkpoint={stored}")
    assert code == 0, err
    assert "mAP" in out and (tmp_path / "e" / "evaluate" / "sampled_matches.png").stat().st_size > 1000


def test_an_interrupted_inference_leaves_the_previous_file_whole(trained, tmp_path, monkeypatch):
    ckpt, overrides = trained
    out_file = tmp_path / "emb.npz"
    args = ["inference", *overrides, f"results_dir={tmp_path}", f"inference.checkpoint={ckpt}", f"inference.output_file={out_file}"]
    assert main(args) == 0
    before = out_file.read_bytes()
    real_savez = np.savez

    def interrupted(file, **arrays):
        real_savez(file, **{k: v for k, v in list(arrays.items())[:2]})  # part of the file written...
        raise KeyboardInterrupt  # ...then Ctrl-C

    monkeypatch.setattr(np, "savez", interrupted)
    assert main(args) == 130
    assert out_file.read_bytes() == before and sorted(p.name for p in tmp_path.glob("emb*")) == ["emb.npz"]


def test_a_model_without_metadata_takes_preprocessing_only_from_keys_the_user_set(synthetic_root, tmp_path, capsys, caplog):
    """The schema's defaults (TAO's 0.5/0.5, 384x128) stood in for another tool's model's own
    preprocessing without a word: OSNet scored 39.8 mAP on CUHK03 instead of 52.3."""
    import onnx
    from onnx import TensorProto, helper

    caplog.set_level("INFO", logger="training.embedders")

    graph = helper.make_graph(  # the mean colour of the crop: any size, no reid metadata
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["out"])],
        "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "other_tool.onnx"
    onnx.save(model, str(path))
    base = [f"results_dir={tmp_path / 'r'}", f"evaluate.checkpoint={path}",
            f"dataset.query_dataset_dir={synthetic_root / 'query'}", f"dataset.test_dataset_dir={synthetic_root / 'bounding_box_test'}"]
    pixels = ["dataset.pixel_mean=[0.5,0.5,0.5]", "dataset.pixel_std=[0.5,0.5,0.5]"]  # the defaults, given
    size = ["model.input_height=64", "model.input_width=32"]
    for given, says in [([], "set dataset.pixel_mean and dataset.pixel_std in the spec or as overrides"),
                        (size + pixels[:1], "set dataset.pixel_mean and dataset.pixel_std"),
                        (pixels, "has a dynamic input size and no reid metadata: set model.input_height and model.input_width")]:
        code, _, err = _run(capsys, "evaluate", *base, *given)
        assert code == 2 and err.strip().splitlines()[-1].startswith(f"reid evaluate: error: {path} "), err
        assert says in err, err
    code, out, err = _run(capsys, "evaluate", *base, *size, *pixels)
    assert code == 0 and "(input 64x32)" in out, err
    assert ("other_tool.onnx carries no reid metadata: its images are normalized with the spec's "
            "dataset.pixel_mean=[0.5, 0.5, 0.5] and dataset.pixel_std=[0.5, 0.5, 0.5]") in caplog.text
