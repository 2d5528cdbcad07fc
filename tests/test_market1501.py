"""Market-1501 naming and split rules."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from training.data.market1501 import load_gallery, load_query, load_train, parse_name, warn_of_training_images
from training.data.transforms import read_image
from training.errors import DataError


def _touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 16)).save(folder / name)


def test_parse_name():
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_name("-1_c3s2_012345_00.jpg") == (-1, 3)
    assert parse_name("1100_c2s1_000009_00.png") == (1100, 2)
    with pytest.raises(DataError, match="Market-1501 pattern"):
        parse_name("person_a.jpg")


def test_junk_dropped_and_distractors_only_in_gallery(tmp_path):
    names = ["0000_c1s1_000001_00.jpg", "-1_c1s1_000002_00.jpg", "0005_c1s1_000003_00.jpg", "0005_c2s1_000004_00.jpg",
             "0009_c2s1_000005_00.jpg"]
    _touch(tmp_path / "split", names)
    (tmp_path / "split" / "notes.txt").write_text("ignored")
    gallery = load_gallery(tmp_path / "split")
    assert sorted(r.pid for r in gallery) == [0, 5, 5, 9]
    assert sorted(r.pid for r in load_query(tmp_path / "split")) == [5, 5, 9]
    train = load_train(tmp_path / "split", num_classes=2)
    assert sorted(r.pid for r in train) == [0, 0, 1]  # pids 5 and 9 relabelled, distractor and junk dropped
    assert [r.camid for r in train] == [1, 2, 2]


def test_num_classes_mismatch_is_explained(tmp_path):
    _touch(tmp_path / "t", ["0001_c1s1_000001_00.jpg", "0002_c1s1_000001_00.jpg"])
    with pytest.raises(DataError, match="dataset.num_classes=751 but .* holds 2 identities; set dataset.num_classes=2"):
        load_train(tmp_path / "t", num_classes=751)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_query(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Market-1501-named images$"):
        load_query(tmp_path / "empty")


def test_dataset_root_in_place_of_a_split_names_the_splits(tmp_path):
    for split in ("bounding_box_train", "query"):
        _touch(tmp_path / "data" / split, ["0001_c1s1_000001_00.jpg"])
    (tmp_path / "data" / "notes").mkdir()  # no images: not named
    with pytest.raises(DataError, match="its subfolders bounding_box_train, query hold images: give one of them"):
        load_train(tmp_path / "data")


def test_a_misnamed_image_names_its_folder(tmp_path):
    _touch(tmp_path / "split", ["0001_c1s1_000001_00.jpg", "person_a.jpg"])
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'split'}/person_a.jpg: file name does not follow")):
        load_gallery(tmp_path / "split")


def test_a_macs_metadata_files_beside_the_images_are_not_read(tmp_path):
    """A dataset copied from a Mac holds ``._NAME.jpg`` beside each image: its metadata, not a JPEG."""
    _touch(tmp_path / "split", ["0001_c1s1_000001_00.jpg", "0002_c2s1_000002_00.jpg"])
    for name in ("._0001_c1s1_000001_00.jpg", "._0002_c2s1_000002_00.jpg"):
        (tmp_path / "split" / name).write_bytes(b"\x00\x05\x16\x07Mac OS X        ")  # AppleDouble's header
    assert [r.pid for r in load_gallery(tmp_path / "split")] == [1, 2]


def test_corrupt_image_names_its_path(tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=str(bad)):
        read_image(str(bad))


def test_read_image_gives_pillows_pixels_and_names_a_missing_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 20, 3), dtype=np.uint8)
    path = tmp_path / "0001_c1s1_000001_00.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB"))
    got = read_image(str(path))
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), expected)
    with pytest.raises(DataError, match="absent.jpg"):
        read_image(str(tmp_path / "absent.jpg"))


def test_make_synthetic_refuses_sets_that_cannot_be_evaluated(tmp_path, capsys):
    """One camera used to write a set on which no query has a match (same-camera matches do not
    count), and a zero size failed halfway with "cannot write empty image"."""
    from training.cli import main

    for args, message in [(["--cameras", "1"], "cameras=1: need at least 2"),
                          (["--height", "0"], "images of 0x64 pixels"),
                          (["--identities", "1"], "identities=1: need at least 2"),
                          (["--cameras", "3", "--images-per-identity", "3"], "at least cameras + 1 = 4")]:
        out = tmp_path / "_".join(args)
        assert main(["make-synthetic", str(out), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("reid make-synthetic: error: ") and message in err, err
        assert not out.exists()
    out = tmp_path / "set"
    assert main(["make-synthetic", str(out), "--identities", "4", "--images-per-identity", "3"]) == 0
    before = sorted(p.name for p in out.rglob("*.jpg"))
    capsys.readouterr()
    assert main(["make-synthetic", str(out), "--identities", "6"]) == 2  # would mix two sets
    assert "bounding_box_train is not empty; give a new folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*.jpg")) == before


def test_query_or_gallery_images_from_the_training_folder_are_warned_about(tmp_path, caplog):
    """A test folder set to bounding_box_train reported what the model memorized as re-identification."""
    names = ["0001_c1s1_000001_00.jpg", "0001_c2s1_000002_00.jpg", "0002_c1s1_000003_00.jpg", "0002_c2s1_000004_00.jpg"]
    _touch(tmp_path / "bounding_box_train", names)
    _touch(tmp_path / "query", names[:2])  # another dataset's files with the same names: not training images
    (tmp_path / "link").symlink_to(tmp_path / "bounding_box_train")  # the training folder by another path
    train = str(tmp_path / "bounding_box_train")
    query, gallery = load_query(tmp_path / "query"), load_gallery(tmp_path / "link")
    warn_of_training_images(train, query, gallery, "the evaluation")
    assert caplog.messages == [f"0 of 2 query and 4 of 4 gallery images are training images (dataset.train_dataset_dir="
                               f"{train}): the evaluation measures what the model memorized, not how it finds people it "
                               "never saw; give the held-out query and test folders"]
    caplog.clear()
    warn_of_training_images(train, query, load_gallery(tmp_path / "query"), "validation")
    warn_of_training_images("", query, gallery, "validation")  # no training folder in the spec
    warn_of_training_images(str(tmp_path / "gone"), query, gallery, "validation")
    assert caplog.messages == []
