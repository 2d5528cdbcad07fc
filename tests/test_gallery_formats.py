"""Gallery folders written by earlier versions of reid open in this one, whole.

Every other gallery test writes its folder with the code it then reads it with, so a change to the
snapshot or log layout that forgets the galleries already on disk (a renamed key, a new record
field read as required) passes them all, and the upgraded server refuses, or worse misreads,
every gallery users have. tests/fixtures/gallery-format<N>/ holds each format's folders as the
version that introduced it wrote them (tests/fixtures/make_gallery_fixture.py, run once per
format): a snapshot and a log to replay, flat and HNSW."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.distance import l2_normalize
from retrieval.gallery.faiss_snapshot import FORMAT
from retrieval.gallery.faiss_store import FaissGalleryStore

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import make_gallery_fixture as fx  # noqa: E402
from formats import fixture_dir, fixture_dirs  # noqa: E402

FOLDERS = fixture_dirs("gallery")


def expected_entries() -> dict[int, tuple[int, dict]]:
    """What ``fx.CHANGES`` leave, replayed on a plain dict: id -> (vector key, metadata)."""
    entries: dict[int, tuple[int, dict]] = {}
    next_id = 1
    for op, args in fx.CHANGES:
        if op in ("add", "replace"):
            for given, key, i in zip(args["ids"], args["keys"], args["meta"]):
                new = given or next_id
                entries[new] = (key, fx.meta(i, args.get("person")))
                next_id = max(next_id, new + 1)
        elif op == "remove":
            for i in args["ids"]:
                entries.pop(i, None)
        elif op == "remove_people":
            entries = {i: e for i, e in entries.items() if e[1]["person_id"] not in args["people"]}
        elif op == "remove_before":
            entries = {i: e for i, e in entries.items() if not 0 < e[1]["timestamp"] < args["timestamp"]}
    return entries


def test_the_current_format_has_a_fixture():
    """A new FORMAT comes with its fixture, written by the version that introduces it."""
    assert fixture_dir("gallery", FORMAT).is_dir(), "run tests/fixtures/make_gallery_fixture.py"


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_a_gallery_folder_of_an_earlier_format_opens_whole(tmp_path, folder):
    expected = expected_entries()
    assert sorted(expected) == [4, 8, 10, 11, 12, 101, 102]  # the model above, spelled out
    root = tmp_path / "galleries"
    shutil.copytree(folder, root)  # the fixture itself stays as that version wrote it
    store = FaissGalleryStore(root)
    try:
        assert sorted(store.galleries) == sorted(fx.GALLERIES)
        for name, index_type in fx.GALLERIES.items():
            info = store.info(name)
            assert (info.dim, info.index_type, info.size, info.model) == (fx.DIM, index_type, len(expected), fx.MODEL)
            page = store.entries(name, limit=100, with_vectors=True)
            assert page.ids.tolist() == sorted(expected) and not page.more
            assert [m.to_dict() for m in page.metadata] == [expected[i][1] for i in sorted(expected)]
            wanted = l2_normalize(np.stack([fx.vector(expected[i][0]) for i in sorted(expected)]))
            np.testing.assert_allclose(page.vectors, wanted, atol=1e-6)
            # the index (an HNSW graph read from its file, with a dead node) finds each entry first
            for hits, i in zip(store.search(name, wanted, 1, []), sorted(expected)):
                assert hits[0].id == i and hits[0].score == pytest.approx(1.0, abs=1e-5)
            # ids are never reused, removed ones included
            assert store.add(name, np.zeros(1, np.int64), fx.vector(7)[None], [page.metadata[0]]).tolist() == [103]
    finally:
        store.close()
    reopened = FaissGalleryStore(root)  # written back in this version's format
    try:
        for name in fx.GALLERIES:
            assert reopened.entries(name, limit=100).ids.tolist() == sorted(expected) + [103]
    finally:
        reopened.close()
