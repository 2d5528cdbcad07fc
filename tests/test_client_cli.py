"""``reid-client`` against a real server with a FAISS gallery: every subcommand, its output and
its exit status."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from retrieval.gallery import FaissGalleryStore
from serving.client import GalleryClient, ReidClient
from serving.client_cli import client_main
from serving.engines.onnxruntime import OnnxRuntimeEngine
from serving.server import ServerConfig
from serving.service import Limits
from tests.serving_support import ServerThread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tiny_onnx, tmp_path):
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, limits=Limits(max_images_per_request=3)))
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    with thread as s:
        yield s


@pytest.fixture
def crops(synthetic_root):
    """Three crops of two people: person A on cameras 1 and 2, person B on camera 1."""
    files = sorted((synthetic_root / "bounding_box_test").iterdir())
    a = [f for f in files if f.name.startswith(files[0].name[:4])]
    b = next(f for f in files if not f.name.startswith(files[0].name[:4]))
    a1 = next(f for f in a if "_c1" in f.name)
    a2 = next(f for f in a if "_c2" in f.name)
    return a1, a2, b


def _run(capsys, server, *args: str) -> tuple[int, str, str]:
    code = client_main([*args, "--server", server.target])
    out, err = capsys.readouterr()
    return code, out, err


def test_gallery_round_trip(server, crops, capsys):
    a1, a2, b = crops
    code, out, _ = _run(capsys, server, "create", "lobby")
    assert code == 0 and out.strip() == f"lobby: 0 entries, 32-d, flat index, faiss on cpu, model {server.server.engine.model_id}"

    code, out, _ = _run(capsys, server, "enroll", "lobby", str(a1), "--person-id", "A", "--camera-id", "c1",
                        "--label", "site=door", "--timestamp", "12.5")
    assert code == 0
    id_a1 = int(re.fullmatch(rf"{re.escape(str(a1))}: id (\d+)", out.strip()).group(1))
    code, out, _ = _run(capsys, server, "enroll", "lobby", str(a2), str(b), "--camera-id", "c2")
    assert code == 0 and len(out.splitlines()) == 2
    id_a2, id_b = (int(line.rsplit(" ", 1)[1]) for line in out.splitlines())

    code, out, _ = _run(capsys, server, "galleries")
    assert code == 0 and out.startswith("lobby: 3 entries, 32-d")
    code, out, _ = _run(capsys, server, "galleries", "--json")
    assert code == 0 and json.loads(out) == {"name": "lobby", "entries": 3, "dimension": 32, "index": "flat", "backend": "faiss",
                                             "device": "cpu", "model": server.server.engine.model_id}

    code, out, _ = _run(capsys, server, "search", "lobby", str(a1), "--top-k", "2", "--json")
    assert code == 0
    answer = json.loads(out)
    assert answer["image"] == str(a1) and len(answer["hits"]) == 2
    first = answer["hits"][0]
    assert (first["id"], first["person_id"], first["camera_id"], first["timestamp"], first["labels"]) == (
        id_a1, "A", "c1", 12.5, {"site": "door"})
    assert first["score"] == pytest.approx(1.0, abs=1e-4)

    code, out, _ = _run(capsys, server, "search", "lobby", str(a1), "--top-k", "3", "--exclude-camera", "c1")
    assert code == 0
    ids = [int(m) for m in re.findall(r"^  \d\. id (\d+) ", out, re.M)]
    assert sorted(ids) == sorted([id_a2, id_b])  # the c1 entry is left out
    assert "camera c1" not in out

    code, out, _ = _run(capsys, server, "search", "lobby", str(a2), "--rerank", "--top-k", "3")
    assert code == 0 and len(re.findall(r"^  \d\. id \d+  score [\d.]+  re-ranked distance [\d.]+  ", out, re.M)) == 3

    code, out, _ = _run(capsys, server, "remove", "lobby", str(id_b), "999999")
    assert code == 1 and out.strip() == "removed 1; not found: 999999"
    code, out, _ = _run(capsys, server, "search", "lobby", str(b), "--exclude-camera", "c2")
    assert code == 0 and re.findall(r"^  \d\. id (\d+) ", out, re.M) == [str(id_a1)]  # a2 is on c2, b was removed
    assert _run(capsys, server, "remove", "lobby", str(id_a1))[0] == 0
    code, out, _ = _run(capsys, server, "search", "lobby", str(b), "--exclude-camera", "c2")
    assert code == 0 and out.strip() == f"{b}: no hits"  # only c2 entries are left
    code, out, _ = _run(capsys, server, "drop", "lobby")
    assert code == 0 and out.strip() == "dropped lobby"
    code, out, _ = _run(capsys, server, "galleries")
    assert code == 0 and out == ""


def test_one_bad_image_fails_only_its_own_search(server, crops, tmp_path, capsys):
    a1, _, _ = crops
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1))[0] == 0
    code, out, err = _run(capsys, server, "search", "g", str(junk), str(a1), "--top-k", "1")
    assert code == 1
    assert err.startswith(f"{junk}: error 3 (INVALID_ARGUMENT): ")  # for that image alone
    assert out.startswith(f"{a1}:\n  1. id ")


def test_search_prints_each_calls_answers_before_a_later_call_fails(server, crops, capsys):
    """Answers were printed only once every call had answered: a failure in the last call of a
    long search lost all the answers before it."""
    a1, a2, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1))[0] == 0
    store, searches = server.server.store, []
    real_search = store.search

    def search(*args, **kwargs):
        searches.append(1)
        if len(searches) == 2:
            store.drop("g")  # another operator dropped the gallery meanwhile
        return real_search(*args, **kwargs)

    store.search = search
    code, out, err = _run(capsys, server, "search", "g", str(a1), str(a2), str(b), "--top-k", "1", "--batch", "1")
    assert code != 0 and "NOT_FOUND" in err
    assert out.startswith(f"{a1}:\n  1. id ")  # the first call's answer


def test_a_stopped_enroll_says_which_skip_goes_on_without_adding_images_twice(server, synthetic_root, tmp_path, capsys):
    """The server gives every added embedding a new id, so running a stopped enroll again added its
    first images twice; nothing said how far it got."""
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    good = [str(f) for f in sorted((synthetic_root / "bounding_box_test").iterdir())[:7]]
    files = [good[0], str(junk), *good[1:]]  # calls of 2: [0, junk] [1, 2] [3, 4] [5, 6]
    original, calls = GalleryClient.add, []

    def third_call_fails(self, gallery, **kwargs):  # a real NOT_FOUND from the server
        calls.append(1)
        return original(self, "nobody" if len(calls) == 3 else gallery, **kwargs)

    assert _run(capsys, server, "create", "g")[0] == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GalleryClient, "add", third_call_fails)
        code, out, err = _run(capsys, server, "enroll", "g", *files, "--batch", "2")
    assert code == 1 and [line.split(": id ")[0] for line in out.splitlines()] == good[:3]
    assert err.splitlines()[1:] == [
        "enrolled 3 of 8 images into g before the failure below; to go on, run the same command with --skip 4",
        "reid-client: error: NOT_FOUND: no gallery named 'nobody' (reid-client galleries lists the galleries; "
        "reid-client create nobody makes this one)"]
    code, out, _ = _run(capsys, server, "enroll", "g", *files, "--batch", "2", "--skip", "4")
    assert code == 0 and [line.split(": id ")[0] for line in out.splitlines()] == good[3:]
    assert _run(capsys, server, "galleries")[1].startswith("g: 7 entries")  # each image once

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the second call to add is under way
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GalleryClient, "add", interrupted)
        code, out, err = _run(capsys, server, "enroll", "g", *files, "--batch", "2", "--skip", "1")
    assert code == 130 and err.splitlines()[1:] == [  # calls of [junk, 1] [2, 3] ...: the second one under way
        "enrolled 1 of 8 images into g before the interruption; the call adding the next 2 images may have added "
        "them: --skip 5 goes on if 'reid-client entries g' lists them, else --skip 3", "reid-client: interrupted"]
    code, _, err = _run(capsys, server, "enroll", "g", *files, "--skip", "8")
    assert code == 2 and err.strip() == "reid-client: error: --skip 8 leaves none of the 8 images"


def test_one_bad_image_fails_only_its_own_enrollment(server, crops, tmp_path, capsys):
    """AddToGallery with images adds all of a call's or none: the command used to stop at a call
    holding a corrupt file, leaving out its neighbours and every later image."""
    a1, a2, b = crops
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    assert _run(capsys, server, "create", "g")[0] == 0
    code, out, err = _run(capsys, server, "enroll", "g", str(a1), str(junk), str(a2), str(b), "--batch", "3",
                          "--person-id", "P")
    assert code == 1 and err.startswith(f"{junk}: error 3 (INVALID_ARGUMENT): cannot decode image")
    assert [line.split(": id ")[0] for line in out.splitlines()] == [str(a1), str(a2), str(b)]
    ids = [int(line.split(": id ")[1]) for line in out.splitlines()]
    code, out, _ = _run(capsys, server, "galleries")
    assert out.startswith("g: 3 entries")
    code, out, _ = _run(capsys, server, "search", "g", str(a2), "--top-k", "1", "--json")
    hit = json.loads(out)["hits"][0]  # the entry is the server's own embedding of the image
    assert hit["id"] == ids[1] and hit["score"] > 0.9999 and hit["person_id"] == "P"
    code, out, err = _run(capsys, server, "enroll", "nobody", str(a1))
    assert code == 1 and out == "" and err.startswith("reid-client: error: NOT_FOUND: ")


def test_errors(server, crops, tmp_path, capsys):
    a1, _, _ = crops
    code, _, err = _run(capsys, server, "search", "nobody", str(a1))
    assert code == 1 and err.startswith("reid-client: error: NOT_FOUND: ")
    code, _, err = _run(capsys, server, "enroll", "g", str(tmp_path / "missing.jpg"))
    assert code == 2 and err.strip() == f"reid-client: error: no such file or folder: {tmp_path / 'missing.jpg'}"
    code, _, err = _run(capsys, server, "enroll", "g", str(a1), "--label", "novalue")
    assert code == 2 and err.strip() == "reid-client: error: --label 'novalue' is not KEY=VALUE"
    code, _, err = _run(capsys, server, "galleries", "--tls-ca", str(tmp_path / "nope.pem"))
    assert code == 2 and err.strip() == f"reid-client: error: cannot read --tls-ca {tmp_path / 'nope.pem'}: No such file or directory"


def test_folders_stand_for_their_images_in_name_order(server, crops, tmp_path, capsys):
    """A folder used to be refused as "no such file"; now it is its image files, sorted, so a
    gallery of thousands of crops needs no glob that can outgrow the command line."""
    a1, a2, b = crops
    folder = tmp_path / "crops"
    folder.mkdir()
    for name, source in [("c.png", a1), ("a.JPG", a2), ("b.jpeg", b)]:
        (folder / name).write_bytes(source.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.jpg").mkdir()  # a folder, even one named like an image, is not picked up
    code, out, _ = _run(capsys, server, "embed", str(folder), str(a1), "--batch", "3")  # the server takes 3 a call
    assert code == 0
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(folder / n) for n in ("a.JPG", "b.jpeg", "c.png")] + [str(a1)]
    rows = [np.array(line.split(": ")[1].split(), dtype=np.float32) for line in out.splitlines()]
    np.testing.assert_allclose(rows[2], rows[3], atol=1e-5)  # c.png is a1's bytes: same embedding
    assert _run(capsys, server, "create", "g")[0] == 0
    code, out, _ = _run(capsys, server, "enroll", "g", str(folder), "--batch", "2")
    assert code == 0 and [line.split(": id ")[0] for line in out.splitlines()] == [str(folder / n) for n in ("a.JPG", "b.jpeg", "c.png")]
    code, out, _ = _run(capsys, server, "search", "g", str(folder), "--top-k", "1", "--json")
    assert code == 0 and [json.loads(line)["image"] for line in out.splitlines()] == [str(folder / n) for n in ("a.JPG", "b.jpeg", "c.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run(capsys, server, "embed", str(a1), str(empty))
    assert code == 2 and out == "" and err.strip().startswith("reid-client: error: no images (.jpg, ") and err.strip().endswith(f"in folder {empty}")


def test_name_pattern_reads_each_images_ids_from_its_name(server, crops, tmp_path, capsys):
    a1, a2, b = crops  # Market-1501 names: PPPP_cC...
    pattern = r"^(?P<person>\d+)_(?P<camera>c\d+)"
    assert _run(capsys, server, "create", "g")[0] == 0
    code, out, _ = _run(capsys, server, "enroll", "g", str(a1), str(a2), str(b), "--name-pattern", pattern, "--batch", "2")
    assert code == 0
    code, out, _ = _run(capsys, server, "search", "g", str(a1), str(a2), str(b), "--top-k", "1", "--json")
    got = [(h["person_id"], h["camera_id"]) for h in (json.loads(line)["hits"][0] for line in out.splitlines())]
    assert got == [(p.name.split("_")[0], p.name.split("_")[1][:2]) for p in (a1, a2, b)]
    assert got[0][0] == got[1][0] != got[2][0] and got[0][1] != got[1][1]  # the crops' people and cameras

    # only the camera from the name; the person from --person-id
    code, _, _ = _run(capsys, server, "enroll", "g", str(b), "--name-pattern", r"_(?P<camera>c\d)", "--person-id", "X")
    assert code == 0
    code, out, _ = _run(capsys, server, "search", "g", str(b), "--top-k", "2", "--json")
    assert {(h["person_id"], h["camera_id"]) for h in json.loads(out)["hits"]} == {
        (b.name.split("_")[0], b.name.split("_")[1][:2]), ("X", b.name.split("_")[1][:2])}

    stray = tmp_path / "frame.jpg"
    stray.write_bytes(a1.read_bytes())
    code, out, err = _run(capsys, server, "enroll", "g", str(a1), str(stray), "--name-pattern", pattern)
    assert code == 2 and out == ""  # checked before any call: a1 was not enrolled either
    assert err.strip() == f"reid-client: error: {stray}: file name does not match --name-pattern '{pattern}'"
    code, _, err = _run(capsys, server, "enroll", "g", str(a1), "--name-pattern", pattern, "--person-id", "7")
    assert code == 2 and "--person-id and --name-pattern's 'person' group both set the person id" in err
    assert _run(capsys, server, "galleries")[1].startswith("g: 4 entries")


def test_enroll_refuses_a_gallery_another_model_filled(server, crops, capsys):
    """enroll adds the server's embeddings, which the server does not check against the gallery's
    model (only calls with images are): the client compares the ids itself."""
    from serving.client import ReidClient

    a1, _, _ = crops
    ours = server.server.engine.model_id
    with ReidClient(server.target) as client:
        assert client.embed_response([str(a1)]).model_id == ours
    server.server.store.create("old", 32, model="0123456789abcdef")
    code, out, err = _run(capsys, server, "enroll", "old", str(a1))
    assert code == 1 and out == "" and err.strip() == (
        f"reid-client: error: gallery 'old' holds embeddings of model 0123456789abcdef, and the server embeds with "
        f"model {ours}: enroll into a new gallery")
    assert server.server.store.info("old").size == 0
    server.server.store.create("unrecorded", 32)  # made before models were recorded: not checked
    assert _run(capsys, server, "enroll", "unrecorded", str(a1))[0] == 0


def test_remove_every_entry_of_a_person(server, crops, capsys):
    a1, a2, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1), str(a2), "--person-id", "A")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(b), "--person-id", "B")[0] == 0
    code, out, _ = _run(capsys, server, "remove", "g", "--person", "A", "--person", "Z")
    assert code == 1 and out.strip() == "removed 2; not found: Z"
    code, out, _ = _run(capsys, server, "search", "g", str(a1), "--top-k", "5", "--json")
    assert [h["person_id"] for h in json.loads(out)["hits"]] == ["B"]
    assert _run(capsys, server, "remove", "g", "--person", "B")[1].strip() == "removed 1"
    for argv, message in [(["remove", "g"], "give entry ids, --person PERSON_ID or --before TIMESTAMP"),
                          (["remove", "g", "3", "--person", "B"], "give one of: entry ids, --person, --before"),
                          (["remove", "g", "--person", "B", "--before", "5"], "give one of: entry ids, --person, --before"),
                          (["remove", "g", "--person", ""], "--person must not be empty")]:
        code, _, err = _run(capsys, server, *argv)
        assert code == 2 and err.strip() == f"reid-client: error: {message}"


def test_entries_lists_what_the_gallery_holds(server, crops, capsys, tmp_path):
    a1, a2, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1), str(a2), "--person-id", "A", "--camera-id", "c1",
                "--timestamp", "12.5", "--label", "site=door")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(b))[0] == 0
    code, out, _ = _run(capsys, server, "entries", "g")
    assert code == 0 and out.splitlines() == ["id 1  person A  camera c1  timestamp 12.500  site=door",
                                              "id 2  person A  camera c1  timestamp 12.500  site=door",
                                              "id 3  person -  camera -  timestamp -"]  # none recorded
    code, out, err = _run(capsys, server, "entries", "g", "--person", "A", "--person", "Z", "--json", "--embeddings")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and err.strip() == "reid-client: no entries of: Z"
    assert [(r["id"], r["person_id"], r["labels"]) for r in rows] == [(1, "A", {"site": "door"}), (2, "A", {"site": "door"})]
    embedded = _run(capsys, server, "embed", str(a1), str(a2), "--output", str(tmp_path / "a.npy"))
    assert embedded[0] == 0
    embeddings = np.load(tmp_path / "a.npy")  # the gallery holds them L2-normalized
    np.testing.assert_allclose([r["embedding"] for r in rows], embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True),
                               atol=1e-5)
    code, out, _ = _run(capsys, server, "entries", "g", "--label", "site=door")
    assert code == 0 and re.findall(r"^id (\d+)", out, re.M) == ["1", "2"]
    for argv, message in [(["entries", "g", "--embeddings"], "--embeddings needs --json"),
                          (["entries", "g", "--label", "site"], "--label 'site' is not KEY=VALUE"),
                          (["entries", "g", "--person", ""], "--person must not be empty")]:
        code, _, err = _run(capsys, server, *argv)
        assert code == 2 and err.strip() == f"reid-client: error: {message}"
    code, _, err = _run(capsys, server, "entries", "nobody")
    assert code == 1 and err.strip() == ("reid-client: error: NOT_FOUND: no gallery named 'nobody' (reid-client galleries "
                                         "lists the galleries; reid-client create nobody makes this one)")


def test_import_copies_a_listing_into_another_gallery(server, crops, capsys, tmp_path):
    a1, a2, b = crops
    assert _run(capsys, server, "create", "old")[0] == 0
    assert _run(capsys, server, "enroll", "old", str(a1), str(a2), "--person-id", "A", "--label", "site=door")[0] == 0
    assert _run(capsys, server, "enroll", "old", str(b), "--camera-id", "c2", "--timestamp", "7")[0] == 0
    code, listing, _ = _run(capsys, server, "entries", "old", "--json", "--embeddings")
    (tmp_path / "old.jsonl").write_text(listing)
    assert _run(capsys, server, "create", "new")[0] == 0
    code, out, _ = _run(capsys, server, "import", "new", str(tmp_path / "old.jsonl"), "--batch", "2")
    assert code == 0 and out.strip() == "imported 3 entries into new"
    assert _run(capsys, server, "entries", "new", "--json", "--embeddings")[1] == listing
    code, _, err = _run(capsys, server, "import", "new", str(tmp_path / "old.jsonl"))  # the ids are there now
    assert code == 1 and err.splitlines()[0] == "imported 0 of 3 entries into new before the failure below"
    assert err.splitlines()[1].startswith("reid-client: error: ALREADY_EXISTS")
    assert _run(capsys, server, "import", "new", str(tmp_path / "old.jsonl"), "--replace")[0] == 0
    calls = []

    def interrupted(self, *args, **kwargs):  # Ctrl-C during the second call
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = GalleryClient.add
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GalleryClient, "add", interrupted)
        assert _run(capsys, server, "create", "half")[0] == 0
        code, _, err = _run(capsys, server, "import", "half", str(tmp_path / "old.jsonl"), "--batch", "2")
    assert code == 130 and err.splitlines() == [
        "imported 2 of 3 entries into half before the interruption (run again with --replace to go on)",
        "reid-client: interrupted"]
    good = json.loads(listing.splitlines()[0])
    assert good["model"] == server.server.engine.model_id  # each embedding names its model
    server.server.store.create("foreign", 32, model="another-model")
    code, _, err = _run(capsys, server, "import", "foreign", str(tmp_path / "old.jsonl"))
    assert code == 1 and f"holds embeddings of model {good['model']}, and gallery 'foreign' is for model another-model" in err
    (tmp_path / "unnamed.jsonl").write_text(json.dumps({k: v for k, v in good.items() if k != "model"}))
    assert _run(capsys, server, "import", "foreign", str(tmp_path / "unnamed.jsonl"))[0] == 0  # nothing to check it by
    assert server.server.store.info("foreign").size == 1
    for name, lines, message in [
        ("empty", [""], "holds no entries"),
        ("no_embedding", [{"id": 9}], ":1: no 'embedding'"),
        ("bad_id", [{**good, "id": 0}], ":1: id must be a whole number within 1..2^63-1, got 0"),
        ("nan", [{**good, "embedding": [float("nan")] * 32}], ":1: embedding must be a non-empty list of finite numbers"),
        ("widths", [good, {**good, "id": 99, "embedding": [1.0] * 8}], ":2: embedding has 8 values, the lines before 32"),
        ("not_json", ["{id: 1}"], ":1: Expecting property name enclosed in double quotes"),
        ("two_models", [good, {**good, "id": 99, "model": "another-model"}], "mixes embeddings of models"),
    ]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
        code, _, err = _run(capsys, server, "import", "new", str(path))
        assert code == 2 and err.startswith("reid-client: error: ") and message in err, err
    assert server.server.store.info("new").size == 3
    saved_again = tmp_path / "edited.jsonl"  # by a Windows editor: a byte-order mark, UTF-8 text
    saved_again.write_bytes(b"\xef\xbb\xbf" + json.dumps({**good, "id": 500, "person_id": "Zoë"}, ensure_ascii=False).encode())
    assert _run(capsys, server, "import", "new", str(saved_again))[0] == 0
    assert list(server.server.store.entries("new", person_ids=["Zoë"]).ids) == [500]


def test_relabel_merges_tracks_into_one_person(server, crops, capsys):
    a1, a2, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1), "--person-id", "track-1", "--camera-id", "c1", "--timestamp", "5",
                "--label", "site=door")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a2), "--person-id", "track-2", "--camera-id", "c2")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(b), "--person-id", "track-3")[0] == 0
    before = {e["id"]: e for e in map(json.loads, _run(capsys, server, "entries", "g", "--json", "--embeddings")[1].splitlines())}
    code, out, _ = _run(capsys, server, "relabel", "g", "--person", "track-1", "--person", "track-2", "--person", "track-9",
                        "--to", "Alice")
    assert code == 1 and out.strip() == "relabelled 2 entries to Alice; no entries of: track-9"
    after = {e["id"]: e for e in map(json.loads, _run(capsys, server, "entries", "g", "--json", "--embeddings")[1].splitlines())}
    assert [after[i]["person_id"] for i in (1, 2, 3)] == ["Alice", "Alice", "track-3"]
    for i in (1, 2):  # all else kept: camera, time, labels, embedding
        assert {k: v for k, v in after[i].items() if k not in ("person_id", "embedding")} == \
               {k: v for k, v in before[i].items() if k not in ("person_id", "embedding")}
        np.testing.assert_allclose(after[i]["embedding"], before[i]["embedding"], atol=1e-6)
    code, out, _ = _run(capsys, server, "search", "g", str(a1), "--by-person", "--top-k", "3", "--json")
    assert [h["person_id"] for h in json.loads(out)["hits"]] == ["Alice", "track-3"]
    for argv, message in [(["relabel", "g", "--person", "Alice", "--to", "Alice"], "--to Alice is one of the people to relabel"),
                          (["relabel", "g", "--person", "", "--to", "x"], "person ids must not be empty")]:
        code, _, err = _run(capsys, server, *argv)
        assert code == 2 and err.strip() == f"reid-client: error: {message}"


def test_remove_entries_older_than_a_retention_period(server, crops, capsys):
    a1, a2, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    for image, when in [(a1, "100"), (a2, "200"), (b, "300")]:
        assert _run(capsys, server, "enroll", "g", str(image), "--timestamp", when)[0] == 0
    assert _run(capsys, server, "enroll", "g", str(b))[0] == 0  # no timestamp: never removed by time
    assert _run(capsys, server, "enroll", "g", str(b), "--timestamp", "250")[0] == 0  # not before 250
    code, out, _ = _run(capsys, server, "entries", "g", "--before", "250", "--json")  # what remove --before would do
    assert code == 0 and [json.loads(line)["timestamp"] for line in out.splitlines()] == [100.0, 200.0]
    code, out, _ = _run(capsys, server, "entries", "g", "--since", "150", "--before", "300")
    assert code == 0 and re.findall(r"timestamp (\S+)", out) == ["200.000", "250.000"]
    code, _, err = _run(capsys, server, "entries", "g", "--since", "300", "--before", "300")
    assert code == 2 and err.strip() == "reid-client: error: --since 300 is not before --before 300"
    code, out, _ = _run(capsys, server, "remove", "g", "--before", "250")
    assert code == 0 and out.strip() == "removed 2"
    code, out, _ = _run(capsys, server, "search", "g", str(a1), "--top-k", "5", "--json")
    assert sorted(h["timestamp"] for h in json.loads(out)["hits"]) == [0.0, 250.0, 300.0]
    with pytest.raises(SystemExit):
        client_main(["remove", "g", "--before", "0", "--server", server.target])
    assert "argument --before: must be above 0" in capsys.readouterr().err


def test_search_by_person_answers_with_distinct_people(server, crops, capsys):
    a1, _, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1), str(a1), "--person-id", "A")[0] == 0  # two entries of A
    assert _run(capsys, server, "enroll", "g", str(b), "--person-id", "B")[0] == 0
    code, out, _ = _run(capsys, server, "search", "g", str(a1), "--top-k", "2", "--json")
    assert code == 0 and [h["person_id"] for h in json.loads(out)["hits"]] == ["A", "A"]
    code, out, _ = _run(capsys, server, "search", "g", str(a1), "--top-k", "2", "--json", "--by-person")
    assert code == 0 and [h["person_id"] for h in json.loads(out)["hits"]] == ["A", "B"]
    code, out, _ = _run(capsys, server, "search", "g", str(a1), "--top-k", "2", "--by-person", "--rerank")
    assert code == 0 and [m for m in re.findall(r"person (\S+)", out)] == ["A", "B"]


def test_search_with_entries_of_the_gallery(server, crops, capsys):
    a1, a2, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1), "--person-id", "A", "--camera-id", "c1")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a2), "--person-id", "A", "--camera-id", "c2")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(b), "--person-id", "B", "--camera-id", "c1")[0] == 0
    code, out, err = _run(capsys, server, "search", "g", "--entry", "1", "--entry", "9", "--top-k", "3", "--json")
    assert code == 1 and err.strip().startswith("entry 9: error 5 (NOT_FOUND): no entry 9 in gallery 'g'")
    (found,) = [json.loads(line) for line in out.splitlines()]
    assert found["entry"] == 1 and [h["id"] for h in found["hits"]][0] == 1 and len(found["hits"]) == 3
    code, out, _ = _run(capsys, server, "search", "g", "--entry", "1", "--exclude-camera", "c1", "--top-k", "3")
    assert code == 0 and out.splitlines()[0] == "entry 1:" and re.findall(r"camera (\S+)", out) == ["c2"]
    for argv in (["search", "g"], ["search", "g", str(a1), "--entry", "1"]):
        code, _, err = _run(capsys, server, *argv)
        assert code == 2 and err.strip() == "reid-client: error: give images to search with, or --entry ID (one of the two)"


def test_search_with_a_track_searches_once_with_the_mean_of_its_crops(server, crops, tmp_path, capsys):
    """A tracker's crops of one person, averaged, find the person more often than one crop does
    (OSNet-x0.25 on CUHK03: rank-1 53.4 for single crops, 58.2 for tracks of 2, 61.0 for all of a
    person's crops on a camera)."""
    from retrieval.distance import l2_normalize
    from serving.client import ReidClient

    a1, a2, b = crops
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1), str(a2), str(b), "--name-pattern", r"^(?P<person>\d+)_")[0] == 0
    with ReidClient(server.target) as client, GalleryClient(server.target) as g:
        mean = l2_normalize(np.stack([o.embedding for o in client.embed([a1, b])])).mean(axis=0, keepdims=True)
        expected = [(h.id, round(h.score, 4)) for h in g.search("g", embeddings=mean, top_k=3)[0].hits]
    code, out, err = _run(capsys, server, "search", "g", str(a1), str(junk), str(b), "--track", "--top-k", "3")
    assert code == 1 and err.startswith(f"{junk}: error 3 (INVALID_ARGUMENT): ")  # that crop left out, the others searched
    assert out.splitlines()[0] == "track of 2 images:"
    assert [(int(i), float(sc)) for i, sc in re.findall(r"id (\d+)  score (\S+)", out)] == expected
    code, out, _ = _run(capsys, server, "search", "g", str(a1), str(b), "--track", "--top-k", "3", "--json")
    (found,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and found["track"] == [str(a1), str(b)] and [h["id"] for h in found["hits"]] == [i for i, _ in expected]
    code, _, err = _run(capsys, server, "search", "g", str(junk), "--track")
    assert code == 1 and err.strip().endswith("reid-client: error: no image of the track could be embedded")
    code, _, err = _run(capsys, server, "search", "g", "--entry", "1", "--track")
    assert code == 2 and "--track averages the embeddings of images" in err


def test_search_rerank_options_reach_the_server(server, crops, capsys):
    """k1=6 k2=3 suits galleries of a few images per person better than the defaults (README);
    the command could only ask for the server's defaults."""
    a1, a2, b = crops
    assert _run(capsys, server, "create", "g")[0] == 0
    assert _run(capsys, server, "enroll", "g", str(a1), str(a2), str(b))[0] == 0
    options = {"k1": 2, "k2": 1, "lambda_value": 0.0, "pool": 3}
    with GalleryClient(server.target) as g:
        expected = {h.id: round(h.distance, 6) for h in g.search("g", images=[b], top_k=3, rerank=options)[0].hits}
        defaults = {h.id: round(h.distance, 6) for h in g.search("g", images=[b], top_k=3, rerank={})[0].hits}
    assert expected != defaults  # the options matter here
    code, out, _ = _run(capsys, server, "search", "g", str(b), "--top-k", "3", "--json", "--rerank-k1", "2",
                        "--rerank-k2", "1", "--rerank-lambda", "0", "--rerank-pool", "3")  # no --rerank: implied
    assert code == 0 and {h["id"]: h["distance"] for h in json.loads(out)["hits"]} == expected


@pytest.mark.parametrize("pattern, message", [
    (r"^(\d+)_", "has no (?P<person>...) or (?P<camera>...) group"),
    (r"(?P<person>\d+", "is not a regular expression: missing ), unterminated subpattern"),
])
def test_a_bad_name_pattern_is_a_usage_error(pattern, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        client_main(["enroll", "g", "a.jpg", "--name-pattern", pattern])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith(f"reid-client enroll: error: argument --name-pattern: '{pattern}' {message}")


def test_embed_writes_npy_with_nan_rows_for_failed_images(server, crops, tmp_path, capsys):
    a1, a2, _ = crops
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    out_file = tmp_path / "emb.npy"
    code, out, err = _run(capsys, server, "embed", str(a1), str(junk), str(a2), "--output", str(out_file))
    assert code == 1 and err.startswith(f"{junk}: error 3 (INVALID_ARGUMENT): ")
    rows = np.load(out_file)
    assert rows.shape == (3, 32) and np.isnan(rows[1]).all() and np.isfinite(rows[[0, 2]]).all()
    assert out.strip() == f"wrote {out_file} (3 x 32)"
    code, out, _ = _run(capsys, server, "embed", str(a2))  # no --output: the values, one line per image
    path, values = out.strip().split(": ")
    assert code == 0 and path == str(a2)
    np.testing.assert_allclose(np.array(values.split(), dtype=np.float32), rows[2], atol=1e-5)


def test_embed_prints_each_calls_embeddings_before_a_later_call_fails(server, crops, capsys):
    import grpc

    from serving.service import RequestError

    a1, a2, b = crops
    service, calls = server.server.service, []
    real_outcomes = service.embed_outcomes

    async def outcomes(request, deadline):
        calls.append(1)
        if len(calls) == 2:
            raise RequestError(grpc.StatusCode.INTERNAL, "the engine failed")
        return await real_outcomes(request, deadline)

    service.embed_outcomes = outcomes
    code, out, err = _run(capsys, server, "embed", str(a1), str(a2), str(b), "--batch", "1")
    assert code != 0 and "the engine failed" in err
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(a1)]


def test_embed_output_that_cannot_be_written_fails_in_one_line(server, crops, tmp_path, capsys):
    a1, _, _ = crops
    missing = tmp_path / "nowhere" / "emb.npy"
    code, out, err = _run(capsys, server, "embed", str(a1), "--output", str(missing))
    assert code == 2 and out == ""  # refused before any embedding was computed
    assert err.strip() == f"reid-client: error: --output {missing}: folder {missing.parent} does not exist"
    folder = tmp_path / "taken.npy"
    folder.mkdir()  # passes the folder check, fails to open: reported, not a traceback
    code, _, err = _run(capsys, server, "embed", str(a1), "--output", str(folder))
    assert code == 2 and err.startswith(f"reid-client: error: cannot write {folder}: ")
    code, out, _ = _run(capsys, server, "embed", str(a1), "--output", str(tmp_path / "emb"))  # np.save's suffix
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'emb.npy'} (1 x 32)" and np.load(tmp_path / "emb.npy").shape == (1, 32)


def test_many_images_go_in_calls_of_batch(server, synthetic_root, tmp_path, capsys):
    files = [str(f) for f in sorted((synthetic_root / "bounding_box_test").iterdir())[:7]]
    assert _run(capsys, server, "create", "g")[0] == 0
    code, _, err = _run(capsys, server, "enroll", "g", *files)  # one call of 7: over the server's limit of 3
    assert code == 1 and err.strip() == ("reid-client: error: INVALID_ARGUMENT: request has 7 images; the limit is 3 "
                                         "(give --batch 3 or less)")
    code, out, _ = _run(capsys, server, "enroll", "g", *files, "--batch", "3")
    assert code == 0 and [line.split(": id ")[0] for line in out.splitlines()] == files
    assert len({line.split(": id ")[1] for line in out.splitlines()}) == 7
    code, out, _ = _run(capsys, server, "search", "g", *files, "--batch", "2", "--top-k", "1", "--json")
    assert code == 0 and [json.loads(line)["image"] for line in out.splitlines()] == files
    emb = tmp_path / "emb.npy"
    assert _run(capsys, server, "embed", *files, "--batch", "3", "--output", str(emb))[0] == 0
    assert np.load(emb).shape == (7, 32)
    code, _, err = _run(capsys, server, "embed", *files, "--batch", "0")
    assert code == 2 and err.strip() == "reid-client: error: --batch must be at least 1, got 0"


def test_connection_options_go_before_or_after_the_command(server, monkeypatch, capsys):
    assert client_main(["--server", server.target, "create", "front"]) == 0
    assert client_main(["--server", "127.0.0.1:1", "galleries", "--server", server.target]) == 0  # the later one wins
    monkeypatch.setenv("REID_SERVER", server.target)
    assert client_main(["galleries", "--timeout", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [f"front: 0 entries, 32-d, flat index, faiss on cpu, model {server.server.engine.model_id}"] * 2


def test_a_server_address_where_nothing_listens_says_how_to_give_another(capsys):
    with socket.socket() as sock:  # bound, never listening: connections to it are refused
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
        assert client_main(["galleries", "--server", target, "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("reid-client: error: UNAVAILABLE: ") and "Connection refused" in err, err
    assert err.endswith(f"(nothing listens at {target}: start reid-serve there, or give --server HOST:PORT or REID_SERVER)")


def test_a_url_or_a_bare_host_as_the_server_address_says_what_to_give(capsys):
    """A URL failed at the first call with gRPC's "Misformatted domain name"; a host without a port
    was called at 443 (gRPC's default), with only "nothing listens" said."""
    import argparse

    from serving.client_cli import _fix_for

    assert client_main(["galleries", "--server", "http://127.0.0.1:50051"]) == 2
    assert capsys.readouterr().err.strip() == ("reid-client: error: --server: server address 'http://127.0.0.1:50051' is "
                                               "a URL; give host:port, e.g. 127.0.0.1:50051")
    with pytest.raises(ValueError, match=r"is a URL; give host:port, e.g. reid.example.com \(and --tls-ca"):
        ReidClient("https://reid.example.com/")

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:443: Connection refused"

    def hint(server: str) -> str:
        return _fix_for(Refused(), argparse.Namespace(server=server, token=None, tls_ca=None, tls_cert=None, batch=1))

    assert hint("10.0.0.7") == (" (--server 10.0.0.7 gives no port, so gRPC called port 443; reid-serve listens on 50051 "
                                "unless told otherwise: give --server 10.0.0.7:PORT)")
    for server in ("10.0.0.7:50051", "[::1]:50051", "dns:///reid:50051", "ipv4:10.0.0.7:1,10.0.0.8:1"):
        assert hint(server).startswith(f" (nothing listens at {server}: "), server


def test_a_reader_that_leaves_early_ends_the_output_quietly(server, crops):
    """``reid-client search ... | head -1`` used to end in a BrokenPipeError traceback."""
    code = "import sys; from serving.client_cli import client_main; raise SystemExit(client_main())"
    assert client_main(["create", "g", "--server", server.target]) == 0
    assert client_main(["enroll", "g", *map(str, crops), "--server", server.target]) == 0
    proc = subprocess.Popen([sys.executable, "-c", code, "search", "g", *map(str, crops * 400), "--batch", "3",
                             "--top-k", "3", "--server", server.target], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its lines
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"Traceback" not in err, err.decode()


@pytest.mark.parametrize("argv, message", [
    (["search", "g", "a.jpg", "--top-k", "-3"], "reid-client search: error: argument --top-k: must be at least 1, got -3"),
    (["remove", "g", "-5"], "reid-client remove: error: argument ids: must be at least 1, got -5"),
    (["remove", "g", "x"], "reid-client remove: error: argument ids: 'x' is not a whole number"),
    (["--timeout", "0", "galleries"], "reid-client: error: argument --timeout: must be above 0, got 0"),
    (["create", "g", "--dimension", "-1"], "reid-client create: error: argument --dimension: must be at least 0, got -1"),
    (["enroll", "g", "a.jpg", "--timestamp", "nan"], "reid-client enroll: error: argument --timestamp: must be at least 0, got nan"),
])
def test_numbers_out_of_range_are_usage_errors(argv, message, capsys):
    """A negative --top-k or id reached protobuf, which refused it with a ValueError traceback."""
    with pytest.raises(SystemExit) as exit_:
        client_main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == message


def test_an_interrupted_embed_output_leaves_the_previous_file_whole(server, crops, tmp_path, capsys, monkeypatch):
    a1, a2, _ = crops
    out_file = tmp_path / "emb.npy"
    assert _run(capsys, server, "embed", str(a1), "--output", str(out_file))[0] == 0
    before = out_file.read_bytes()
    real_save = np.save

    def interrupted(file, array):
        real_save(file, array[:, :3])  # part of the file written...
        raise KeyboardInterrupt  # ...then Ctrl-C

    monkeypatch.setattr(np, "save", interrupted)
    code, _, err = _run(capsys, server, "embed", str(a1), str(a2), "--output", str(out_file))
    assert code == 130 and err.strip() == "reid-client: interrupted"
    assert out_file.read_bytes() == before and sorted(p.name for p in tmp_path.glob("emb*")) == ["emb.npy"]


def test_a_folder_gives_its_images_in_name_order_without_hidden_files(crops, tmp_path):
    """A folder copied from a Mac holds ``._NAME.jpg`` beside each image (metadata, not a JPEG):
    each was sent, and each failed with an error line of its own."""
    from serving.client_cli import _image_files

    for name in ("b.jpg", "a.png", "notes.txt", "._a.png", ".hidden.jpg"):
        (tmp_path / name).write_bytes(crops[0].read_bytes())
    assert [p.name for p in _image_files([tmp_path])] == ["a.png", "b.jpg"]
    assert _image_files([tmp_path / "._a.png"]) == [tmp_path / "._a.png"]  # a file named on purpose is sent


def test_text_in_another_encoding_than_utf8_is_one_line_before_any_call(crops, tmp_path, capsys):
    """File names and arguments in another encoding reach Python with surrogates, which protobuf
    refused with a traceback (an enroll of a Latin-1 folder with --name-pattern)."""
    folder = tmp_path / "latin1"
    folder.mkdir()
    (folder / "ok_1.jpg").write_bytes(crops[0].read_bytes())
    (folder / "J\udce9r\udcf4me_2.jpg").write_bytes(crops[0].read_bytes())  # "Jérôme" in Latin-1
    nobody = "127.0.0.1:9"  # no call is made: the names are checked first
    code = client_main(["enroll", "g", str(folder), "--name-pattern", r"^(?P<person>[^_]+)_", "--server", nobody])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the person id --name-pattern reads from this file name, 'J\\udce9r\\udcf4me', is not UTF-8 text" in err
    code = client_main(["create", "caf\udce9", "--server", nobody])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "reid-client: error: 'caf\\udce9' is not UTF-8 text, which requests carry; give it in UTF-8"


def test_an_answer_the_terminal_cannot_show_says_how_to_see_it(server, crops, tmp_path):
    """A person id outside the terminal's encoding (a Latin-1 locale) ended in a traceback."""
    assert client_main(["create", "g", "--server", server.target]) == 0
    assert client_main(["enroll", "g", str(crops[0]), "--person-id", "Zoë 😀", "--server", server.target]) == 0
    result = subprocess.run([sys.executable, "-c", "import sys; from serving.client_cli import client_main; "
                             f"sys.exit(client_main(['entries', 'g', '--server', {server.target!r}]))"],
                            cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONIOENCODING": "latin-1"}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().strip() == ("reid-client: error: cannot print '\\U0001f600' in this terminal's encoding (latin-1); "
                                              "use a UTF-8 locale, or set PYTHONIOENCODING=utf-8")
