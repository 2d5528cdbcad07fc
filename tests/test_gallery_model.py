"""The FAISS gallery against a plain dict, over random sequences of changes, snapshots and restarts.

The other gallery tests each follow one path through the log, the snapshots (automatic ones
after a few changes, compactions after a purge, HNSW snapshots keeping dead rows) and the
replay at a restart; here hypothesis mixes them in any order, so that a path nobody wrote down
(a replacement of an entry whose add is only in the log, a purge right after a restart) is
checked too: after every step the gallery must hold exactly what the dict holds, and find it."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from retrieval.distance import l2_normalize
from retrieval.gallery.base import EntryMetadata, GalleryExists, SearchFilter
from retrieval.gallery.faiss_store import FaissGalleryStore
from tests.conftest import close_milvus_store, open_milvus_store

DIM = 8
PEOPLE = ["p0", "p1", "p2"]
TIMES = [0.0, 10.0, 20.0, 30.0]  # 0: no timestamp, which a time cutoff never removes
ids_ = st.integers(1, 25)  # given ids; Milvus assigns random 63-bit ones


def vector(key: int) -> np.ndarray:
    return np.random.default_rng(key).standard_normal(DIM).astype(np.float32)


class GalleryModel(RuleBasedStateMachine):
    index_type = "flat"
    faiss = True  # snapshots and restarts: Milvus keeps its data on its own (its tests cover reconnecting)

    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="gallery-model-"))
        self.store = self._open()
        self.store.create("g", DIM, self.index_type)
        self.entries: dict[int, tuple[int, EntryMetadata]] = {}  # id -> (vector key, metadata)
        self.next_id = 1  # above every id the gallery has held
        self.held: set[int] = set()
        self.keys = 0

    def _open(self):
        if not self.faiss:
            return open_milvus_store(self.root)
        return FaissGalleryStore(self.root, snapshot_every=5)  # automatic snapshots every few changes

    def teardown(self):
        if self.faiss:
            self.store.close()
        else:
            close_milvus_store(self.store)
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(given=st.lists(ids_, max_size=3, unique=True), assigned=st.integers(0, 3), replace=st.booleans(),
          person=st.sampled_from(PEOPLE), time=st.sampled_from(TIMES))
    def add(self, given, assigned, replace, person, time):
        if not given and not assigned:
            return
        ids = np.array(given + [0] * assigned, np.int64)
        keys = list(range(self.keys, self.keys + len(ids)))
        self.keys += len(ids)
        meta = [EntryMetadata(person_id=person, camera_id=f"c{k % 2}", timestamp=time, labels={"k": str(k)}) for k in keys]
        if not replace and set(given) & set(self.entries):
            with pytest.raises(GalleryExists):
                self.store.add("g", ids, np.stack([vector(k) for k in keys]), meta)
            return
        got = self.store.add("g", ids, np.stack([vector(k) for k in keys]), meta, replace=replace).tolist()
        if self.faiss:  # the next ids above every id held
            start = max([self.next_id] + [i + 1 for i in given])
            expected = given + list(range(start, start + assigned))
        else:  # Milvus: random ones, never one held before
            expected = given + got[len(given):]
            assert len(set(expected)) == len(expected) and not set(got[len(given):]) & self.held
        assert got == expected
        self.held |= set(expected)
        for i, k, m in zip(expected, keys, meta):
            self.entries[i] = (k, m)
        self.next_id = max([self.next_id] + [i + 1 for i in expected])

    @rule(ids=st.lists(ids_, min_size=1, max_size=4, unique=True))
    def remove(self, ids):
        removed, missing = self.store.remove("g", np.array(ids, np.int64))
        assert (removed, missing) == (len([i for i in ids if i in self.entries]), [i for i in ids if i not in self.entries])
        for i in ids:
            self.entries.pop(i, None)

    @rule(people=st.lists(st.sampled_from(PEOPLE), min_size=1, max_size=2, unique=True))
    def remove_people(self, people):
        gone = [i for i, (_, m) in self.entries.items() if m.person_id in people]
        removed, missing = self.store.remove_people("g", people)
        assert (removed, missing) == (len(gone), [p for p in people if all(m.person_id != p for _, m in self.entries.values())])
        for i in gone:
            del self.entries[i]

    @rule(cutoff=st.sampled_from([15.0, 25.0, 35.0]))
    def remove_before(self, cutoff):
        gone = [i for i, (_, m) in self.entries.items() if 0 < m.timestamp < cutoff]
        assert self.store.remove_before("g", cutoff) == len(gone)
        for i in gone:
            del self.entries[i]

    @precondition(lambda self: self.faiss)
    @rule()
    def snapshot(self):
        self.store.snapshot("g")

    @precondition(lambda self: self.faiss)
    @rule(crash=st.booleans())
    def restart(self, crash):
        """A crash leaves the log unsnapshotted, as kill -9 would (the lock is this process's own)."""
        if crash:
            self.store.settle()
        else:
            self.store.close()
        self.store = self._open()

    @rule(camera=st.sampled_from(["", "c0", "c1"]), window=st.sampled_from([(0.0, 0.0), (10.0, 0.0), (0.0, 20.0), (15.0, 35.0)]),
          label=st.one_of(st.none(), st.integers(0, 40)), query=st.integers(0, 100))
    def filtered_search(self, camera, window, label, query):
        flt = SearchFilter(exclude_camera_id=camera, time_from=window[0], time_to=window[1],
                           labels={} if label is None else {"k": str(label)})
        expected = sorted(i for i, (_, m) in self.entries.items()
                          if m.camera_id != camera and (not window[0] or m.timestamp >= window[0])
                          and (not window[1] or m.timestamp <= window[1]) and (label is None or m.labels["k"] == str(label)))
        hits = self.store.search("g", vector(query)[None], 100, [flt])[0]
        assert sorted(h.id for h in hits) == expected
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)

    @rule(people=st.lists(st.sampled_from(PEOPLE), max_size=2, unique=True), size=st.integers(1, 4))
    def list_in_pages(self, people, size):
        listed, after = [], 0
        while True:
            page = self.store.entries("g", after_id=after, limit=size, person_ids=people)
            listed += page.ids.tolist()
            if not page.more:
                break
            after = listed[-1]
        assert listed == sorted(i for i, (_, m) in self.entries.items() if not people or m.person_id in people)

    @rule(ids=st.lists(ids_, min_size=1, max_size=5, unique=True))
    def get(self, ids):
        page = self.store.get("g", np.array(ids, np.int64))
        assert sorted(page.ids.tolist()) == sorted(i for i in ids if i in self.entries)
        for i, m in zip(page.ids.tolist(), page.metadata):
            assert m.to_dict() == self.entries[i][1].to_dict()

    @invariant()
    def holds_what_the_model_holds(self):
        live = sorted(self.entries)
        assert self.store.info("g").size == len(live)
        page = self.store.entries("g", limit=100, with_vectors=True)
        assert page.ids.tolist() == live
        assert [m.to_dict() for m in page.metadata] == [self.entries[i][1].to_dict() for i in live]
        if not live:
            return
        wanted = l2_normalize(np.stack([vector(self.entries[i][0]) for i in live]))
        np.testing.assert_allclose(page.vectors, wanted, atol=1e-6)
        hits = self.store.search("g", wanted, len(live) + 3, [])
        for i, row in zip(live, hits):
            assert row[0].id == i  # each entry is its own nearest
            assert sorted(h.id for h in row) == live  # every live entry is found, no removed one


settings_ = settings(max_examples=40, stateful_step_count=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


class HnswGalleryModel(GalleryModel):
    index_type = "hnsw"


class MilvusGalleryModel(GalleryModel):
    faiss = False


TestFlatGallery = GalleryModel.TestCase
TestFlatGallery.settings = settings_
TestHnswGallery = HnswGalleryModel.TestCase
TestHnswGallery.settings = settings_
TestMilvusGallery = MilvusGalleryModel.TestCase
TestMilvusGallery.settings = settings(settings_, max_examples=8)  # each Milvus Lite start takes a while
