"""Property-based checks that malformed input becomes a per-item error or a clear message, never a crash."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from retrieval.distance import NORM_EPS
from retrieval.gallery import EntryMetadata, FaissGalleryStore, InvalidEntry, SearchFilter
from serving.engines.base import ImageError, decode_image
from serving.preprocessing import prepare
from serving.proto import reid_pb2
from training.config.load import build_spec
from training.errors import ConfigError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        out = decode_image(data, max_pixels=1 << 20)
        assert out.ndim == 3 and out.shape[2] == 3
    except ImageError:
        pass


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@FAST
@given(boxes=st.lists(st.tuples(floats, floats, floats, floats), max_size=6),
       raw_len=st.integers(0, 200), raw_h=st.integers(0, 10), raw_w=st.integers(0, 10), truncate=st.integers(0, 60),
       raw_format=st.integers(0, 4))
def test_requests_yield_one_outcome_per_image(boxes, raw_len, raw_h, raw_w, truncate, raw_format):
    png = _png(30, 40)
    request = reid_pb2.EmbedRequest(images=[
        reid_pb2.Image(encoded=png[: len(png) - truncate]),
        reid_pb2.Image(raw=reid_pb2.RawImage(pixels=b"\x07" * raw_len, height=raw_h, width=raw_w, format=raw_format)),
        reid_pb2.Image(),
    ])
    request.frame.image.encoded = png
    for x1, y1, x2, y2 in boxes:
        request.frame.boxes.add(x1=x1, y1=y1, x2=x2, y2=y2)
    out = prepare(request, 16, 8, max_pixels=10_000)
    assert len(out) == 3 + len(boxes)
    for item in out:
        assert isinstance(item, ImageError) or (item.shape == (16, 8, 3) and item.dtype == np.uint8)
    assert isinstance(out[2], ImageError)  # an image with neither bytes nor pixels
    # formats 3 and 4 are none this server knows (a newer client's): refused, not read as RGB
    assert isinstance(out[1], ImageError) == (raw_h * raw_w == 0 or raw_len != raw_h * raw_w * 3 or raw_format > 2)
    for (x1, y1, x2, y2), item in zip(boxes, out[3:]):
        finite = all(math.isfinite(v) for v in (x1, y1, x2, y2))
        inside = finite and min(x2, 30) > max(x1, 0) and min(y2, 40) > max(y1, 0)
        if not inside:
            assert isinstance(item, ImageError)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png(5000, 5000)  # 25 Mpx of one colour: a few kB compressed
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(bomb, max_pixels=4096 * 4096)


@FAST
@given(vec=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=12),
       top_k=st.integers(-5, 10**7))
def test_gallery_rejects_bad_vectors_and_sizes(tmp_path_factory, vec, top_k):
    store = FaissGalleryStore(tmp_path_factory.mktemp("g"))
    store.create("g", 8)
    store.add("g", np.array([1]), np.ones((1, 8)), [EntryMetadata()])
    arr = np.asarray([vec], dtype=np.float32)
    # usable: the gallery's length, finite, and a direction to compare (not all zeros)
    usable = arr.shape[1] == 8 and np.isfinite(arr).all() and np.linalg.norm(arr.astype(np.float64)) >= NORM_EPS
    try:
        try:
            store.add("g", np.array([0]), arr, [EntryMetadata()])
            assert usable
        except InvalidEntry:
            assert not usable
        try:
            hits = store.search("g", arr, top_k, [SearchFilter()])
            assert top_k >= 1 and usable and len(hits[0]) <= min(top_k, 2)
        except InvalidEntry:
            assert top_k < 1 or not usable
    finally:
        store.close()


spec_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                        st.lists(st.integers(-3, 3), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
spec_keys = st.sampled_from(["model.backbone", "model.feat_dim", "dataset.batch_size", "dataset.num_instances", "dataset.sampler",
                             "dataset.pixel_std", "train.optim.lr_steps", "train.gpu_ids", "model.stride_size", "re_ranking.k1",
                             "model", "train", "bogus", "train.optim.warmup_method", "model.backbone_overrides"])


@FAST
@given(st.dictionaries(spec_keys, spec_values, max_size=4))
def test_malformed_specs_fail_with_config_error_only(entries):
    tree: dict = {}
    for key, value in entries.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    try:
        build_spec(tree)
    except ConfigError:
        pass


@FAST
@given(st.text(max_size=40))
def test_malformed_overrides_fail_with_config_error_only(text):
    try:
        build_spec({}, [text])
    except ConfigError:
        pass


def test_raw_pixels_in_a_format_the_server_does_not_know_are_refused():
    """A newer client's pixel format (say 4 bytes a pixel) was read as RGB without a word."""
    pixels = bytes(range(12))  # 2 x 2 pixels of 3 bytes
    request = reid_pb2.EmbedRequest(images=[reid_pb2.Image(raw=reid_pb2.RawImage(pixels=pixels, height=2, width=2, format=f))
                                            for f in (reid_pb2.RGB8, reid_pb2.BGR8, 3)])
    rgb, bgr, unknown = prepare(request, 2, 2, max_pixels=100)
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])
    assert isinstance(unknown, ImageError) and "raw image format 3 is not one this server knows" in str(unknown)


_OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 6)),
    st.tuples(st.just("replace"), st.integers(0, 10_000)),
    st.tuples(st.just("remove"), st.integers(0, 10_000)),
    st.tuples(st.just("re-add a removed id"), st.integers(0, 10_000)),
    st.tuples(st.just("snapshot"), st.just(0)),
    st.tuples(st.just("close and restart"), st.just(0)),
    st.tuples(st.just("crash and restart"), st.just(0)),
), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, index_type=st.sampled_from(["flat", "hnsw"]), seed=st.integers(0, 2**16))
# a dead row saved with an HNSW snapshot (at close; automatic, at the 7th change) stays removed after a restart
@example(ops=[("add", 5), ("remove", 0), ("close and restart", 0), ("re-add a removed id", 0)], index_type="hnsw", seed=0)
@example(ops=[("add", 6), ("remove", 0), ("crash and restart", 0), ("remove", 0)], index_type="hnsw", seed=0)
def test_any_sequence_of_changes_snapshots_and_restarts_keeps_a_gallery_exact(tmp_path_factory, ops, index_type, seed):
    """Adds, replacements, removals, snapshots and restarts (clean or not) in any order: the
    gallery always holds exactly the entries a plain dict says, and every hit's score is its own
    vector's. Guards the snapshot format that keeps an HNSW gallery's dead rows beside its graph."""
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(seed)
    expected: dict[int, np.ndarray] = {}
    removed: set[int] = set()
    store = FaissGalleryStore(root, snapshot_every=7)  # automatic snapshots in between, too
    store.create("g", 8, index_type)
    next_id = 1
    for op, arg in ops:
        if op == "add":
            vectors = rng.normal(size=(arg, 8)).astype(np.float32)
            ids = np.arange(next_id, next_id + arg)
            next_id += arg
            store.add("g", ids, vectors, [EntryMetadata(person_id=str(i)) for i in ids])
            expected.update(zip(ids.tolist(), vectors))
        elif op == "replace" and expected:
            key = sorted(expected)[arg % len(expected)]
            vector = rng.normal(size=(1, 8)).astype(np.float32)
            store.add("g", np.array([key]), vector, [EntryMetadata(person_id=str(key))], replace=True)
            expected[key] = vector[0]
        elif op == "remove" and expected:
            key = sorted(expected)[arg % len(expected)]
            gone = sorted(removed)[:1]  # removed before: reported missing
            assert store.remove("g", np.array([key, *gone])) == (1, gone)
            del expected[key]
            removed.add(key)
        elif op == "re-add a removed id" and removed:
            key = sorted(removed)[arg % len(removed)]
            vector = rng.normal(size=(1, 8)).astype(np.float32)
            store.add("g", np.array([key]), vector, [EntryMetadata(person_id=str(key))])  # no clash: it is gone
            expected[key] = vector[0]
            removed.discard(key)
        elif op == "snapshot":
            store.snapshot("g")
        elif op == "close and restart":
            store.close()
            store = FaissGalleryStore(root, snapshot_every=7)
        elif op == "crash and restart":
            store.settle()  # a kill -9 would end its snapshot thread too (mid-snapshot crashes: test_gallery.py)
            store = FaissGalleryStore(root, snapshot_every=7)  # the old one is abandoned, as by kill -9
        assert store.info("g").size == len(expected)
    if not expected:
        return
    keys = np.array(sorted(expected))
    ref = np.stack([expected[k] for k in keys])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for flt in (SearchFilter(), SearchFilter(time_from=-1.0)):  # the graph (or flat index), then an exact scan
        for q, row in zip(queries, store.search("g", queries, len(keys), [flt])):
            ids = [h.id for h in row]
            assert len(set(ids)) == len(ids) and set(ids) <= set(keys.tolist())
            for h in row:
                assert h.score == pytest.approx(float(ref[np.searchsorted(keys, h.id)] @ q), abs=1e-5)
                assert h.metadata.person_id == str(h.id)
            if not flt.is_empty() or index_type == "flat":  # exact paths: every entry, in score order
                assert ids == keys[np.argsort(-(ref @ q), kind="stable")].tolist()
    store.close()
