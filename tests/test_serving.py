"""The gRPC server, started for real on a free port: inputs, errors, batching, backpressure, health."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.client import GalleryClient, ReidClient, build_request
from serving.engines import ModelFileError, decode_image
from serving.engines.onnxruntime import OnnxRuntimeEngine
from serving.proto import reid_pb2, reid_pb2_grpc
from serving.server import ReidServer, ServerConfig
from serving.service import Limits
from tests.serving_support import ServerThread, SlowEngine

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size=(40, 90)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _cos(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def engine(tiny_onnx):
    return OnnxRuntimeEngine(tiny_onnx)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, ServerConfig(port=0, max_queue_delay_ms=20)) as s:
        yield s


@pytest.mark.parametrize("seconds, chosen", [({"all": 0.010, "extended": 0.006}, "extended"),
                                             ({"all": 0.010, "extended": 0.0095}, "all"),  # within the margin
                                             ({"all": 0.006, "extended": 0.010}, "all")])
def test_a_cpu_session_keeps_the_faster_graph_optimization(tiny_onnx, monkeypatch, caplog, seconds, chosen):
    """ONNX Runtime's default level ran OSNet-x0.25 at 94 img/s on one VM and 152 without its
    NCHWc layout (EXTENDED), while ResNet-50 was faster with it: the engine times both at load."""
    timed = []

    def fake_timed(sessions, feed):
        timed.append((sorted(sessions), [list(v.shape) for v in feed.values()]))
        return seconds

    monkeypatch.setattr(OnnxRuntimeEngine, "_timed", staticmethod(fake_timed))
    with caplog.at_level(logging.DEBUG):
        engine = OnnxRuntimeEngine(tiny_onnx, device="cpu", instances=2)
    assert timed == [(["all", "extended"], [[1, 3, 64, 32]])]  # one image at the model's input size
    assert engine.graph_optimization == chosen and f"graph optimization {chosen}" in caplog.text
    assert engine.label == f"onnxruntime on CPU, graph optimization {chosen}"  # in reid-serve's startup line
    assert engine.session.get_session_options().intra_op_num_threads == 1  # still sized for 2 instances
    pixels = np.random.default_rng(1).random((3, 3, 64, 32), dtype=np.float32)
    np.testing.assert_allclose(engine.run(pixels), OnnxRuntimeEngine(tiny_onnx, device="cpu").run(pixels),
                               rtol=1e-4, atol=1e-5)


def test_a_graph_optimization_level_that_is_set_is_used_without_timing(tiny_onnx, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(OnnxRuntimeEngine, "_timed", staticmethod(lambda *args: pytest.fail("timed a level that was set")))
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    for level, enum in levels.items():
        engine = OnnxRuntimeEngine(tiny_onnx, device="cpu", graph_optimization=level)
        assert engine.graph_optimization == level and engine.label == f"onnxruntime on CPU, graph optimization {level}"
        assert engine.session.get_session_options().graph_optimization_level == enum
    with pytest.raises(ValueError, match="graph optimization 'basic' is not one of auto, all, extended"):
        OnnxRuntimeEngine(tiny_onnx, graph_optimization="basic")
    # reid-serve --graph-optimization reaches the engine
    import serving.cli
    from serving.engines import ModelFileError

    asked = []

    def stop_at_the_engine(*args):
        asked.append(args[-1])
        raise ModelFileError("stopped here")

    monkeypatch.setattr(serving.cli, "open_engine", stop_at_the_engine)
    assert serving.cli.serve_main(["--model", str(tiny_onnx), "--graph-optimization", "extended", "--no-gallery"]) == 2
    assert asked == ["extended"]
    with pytest.raises(SystemExit):
        serving.cli.parse_serve_args(["--model", str(tiny_onnx), "--graph-optimization", "basic"])


def test_model_id_can_be_given_for_a_model_saved_again(tiny_onnx, monkeypatch, capsys):
    """The id comes from the checkpoint's hash, else the file's: a third-party model saved again
    (another doc string, an optimized copy) would be refused by its own galleries without --model-id."""
    import serving.cli

    served = []

    async def record(engine, config, store):
        served.append(engine.model_id)

    monkeypatch.setattr(serving.cli, "serve_forever", record)
    assert serving.cli.serve_main(["--model", str(tiny_onnx), "--no-gallery", "--model-id", " osnet-msmt17 "]) == 0
    assert serving.cli.serve_main(["--model", str(tiny_onnx), "--no-gallery"]) == 0
    assert served == ["osnet-msmt17", OnnxRuntimeEngine(tiny_onnx).model_id]
    assert serving.cli.serve_main(["--model", str(tiny_onnx), "--no-gallery", "--model-id", " "]) == 2
    assert capsys.readouterr().err.strip().endswith("reid-serve: error: --model-id must not be empty")


def test_preprocessing_flags_are_checked_and_never_ignored_silently(tiny_onnx, tmp_path, monkeypatch, capsys, caplog):
    """--pixel-mean without --pixel-std used to serve with std 1, and flags given for a model that
    carries its own metadata were dropped without a word."""
    import serving.cli

    served = []

    async def record(engine, config, store):
        served.append(engine.metadata)

    monkeypatch.setattr(serving.cli, "serve_forever", record)
    base = ["--no-gallery", "--model"]
    mean, std = ["--pixel-mean", "0.5", "0.5", "0.5"], ["--pixel-std", "0.25", "0.25", "0.25"]
    for flags, says in ((mean, "give --pixel-mean and --pixel-std together"),
                        (std, "give --pixel-mean and --pixel-std together"),
                        (mean + ["--pixel-std", "0.25", "0", "0.25"], "--pixel-std 0.25 0.0 0.25: every value must be above 0")):
        assert serving.cli.serve_main(base + [str(tiny_onnx)] + flags) == 2
        assert says in capsys.readouterr().err
    assert not served

    assert serving.cli.serve_main(base + [str(tiny_onnx)] + mean + std + ["--input-size", "64", "32"]) == 0
    assert "--pixel-mean, --pixel-std, --input-size ignored" in caplog.text and "own preprocessing metadata" in caplog.text
    assert served[-1].pixel_mean == []  # ours normalizes inside the graph: nothing applied twice
    caplog.clear()

    from onnx import TensorProto, helper

    plain = _graph_model(tmp_path / "plain.onnx", [helper.make_node("GlobalAveragePool", ["images"], ["out"])],
                         [("images", TensorProto.FLOAT, ["n", 3, "h", "w"])], ["n", 3, 1, 1])
    assert serving.cli.serve_main(base + [str(plain)] + mean + std + ["--input-size", "64", "32"]) == 0
    assert "ignored" not in caplog.text
    got = served[-1]
    assert (got.pixel_mean, got.pixel_std, got.input_height, got.input_width) == ([0.5] * 3, [0.25] * 3, 64, 32)
    assert serving.cli.serve_main(base + [str(plain)]) == 2
    assert "carries no reid preprocessing metadata; give its pixel mean/std" in capsys.readouterr().err
    assert serving.cli.serve_main(base + [str(plain)] + mean + std) == 2  # its size used to be guessed as 256 x 128
    assert capsys.readouterr().err.strip().endswith(
        "the model's input size is dynamic (h x w) and it carries no reid metadata; give the size it was trained at "
        "(e.g. --input-size 256 128)")


def test_encoded_raw_and_frame_inputs_match_the_engine(server, engine):
    images = [_jpeg(i) for i in range(3)]
    decoded = [decode_image(b) for b in images]
    expected = engine.embed_images(decoded)
    frame = np.zeros((200, 300, 3), dtype=np.uint8)
    frame[10:100, 20:60] = decoded[0]
    frame[50:140, 200:240] = decoded[1]
    with ReidClient(server.target) as client:
        encoded = client.embed(images)
        raw = client.embed([decoded[2]])
        bgr = client.embed([decoded[2][:, :, ::-1]], bgr=True)
        boxes = client.embed(frame=frame, boxes=[(20, 10, 60, 100), (200, 50, 240, 140)])
    for got, want in zip(encoded, expected):
        assert got.ok and _cos(got.embedding, want) >= 0.9999
    assert _cos(raw[0].embedding, expected[2]) >= 0.9999 and _cos(bgr[0].embedding, expected[2]) >= 0.9999
    assert _cos(boxes[0].embedding, expected[0]) >= 0.9999 and _cos(boxes[1].embedding, expected[1]) >= 0.9999


def test_one_bad_image_fails_alone(server):
    request = build_request([_jpeg(1), b"not an image", _jpeg(2)], frame=np.zeros((50, 50, 3), np.uint8),
                            boxes=[(10, 10, 30, 40), (60, 60, 90, 90), (-5, -5, 20, 20)])
    request.images.add(raw=reid_pb2.RawImage(pixels=b"\x00" * 10, height=4, width=4))
    stub = reid_pb2_grpc.ReIdentificationStub(grpc.insecure_channel(server.target))
    response = stub.Embed(request, timeout=30)
    kinds = [r.WhichOneof("result") for r in response.results]
    # images: ok, bad, ok, bad raw; boxes: ok, outside the frame, clipped
    assert kinds == ["embedding", "error", "embedding", "error", "embedding", "error", "embedding"]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "cannot decode image" in response.results[1].error.message
    assert "needs 48 bytes, got 10" in response.results[3].error.message
    assert "no pixels inside" in response.results[5].error.message
    assert response.dimension == 32 and len(response.results[0].embedding.values) == 32


def test_gallery_calls_without_galleries_are_unimplemented_not_retryable(server):
    with GalleryClient(server.target) as g, pytest.raises(grpc.RpcError) as err:
        g.create("lobby")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--no-gallery" in err.value.details()


def test_client_refuses_arrays_it_would_have_to_cast():
    """np.asarray(img, dtype=uint8) turned a 0..1 float crop into zeros, embedded without complaint."""
    with pytest.raises(ValueError, match=r"got dtype float32 \(from 0\.\.1 floats: \(img \* 255\)"):
        build_request([np.full((128, 64, 3), 0.5, np.float32)])
    with pytest.raises(ValueError, match="got dtype int64"):
        build_request([np.zeros((128, 64, 3), np.int64)])
    with pytest.raises(ValueError, match=r"got shape \(128, 64\)"):
        build_request([np.zeros((128, 64), np.uint8)])
    with pytest.raises(TypeError, match="got int"):
        build_request([5])
    raw = build_request([np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)[:, ::-1]]).images[0].raw  # a strided view
    assert (raw.height, raw.width, raw.pixels) == (2, 3, np.arange(18, dtype=np.uint8).reshape(2, 3, 3)[:, ::-1].tobytes())


def test_concurrent_callers_are_batched_and_answers_stay_in_order(server, engine):
    images = [_jpeg(100 + i) for i in range(24)]
    expected = engine.embed_images([decode_image(b) for b in images])
    before_batches = server.metrics.value("reid_batch_size_count")
    before_images = server.metrics.value("reid_batch_size_sum")
    client = ReidClient(server.target)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: client.embed([images[i], images[(i + 1) % 24]]), range(24)))
    for i, (a, b) in enumerate(results):
        assert _cos(a.embedding, expected[i]) >= 0.9999 and _cos(b.embedding, expected[(i + 1) % 24]) >= 0.9999
    batches = server.metrics.value("reid_batch_size_count") - before_batches
    imgs = server.metrics.value("reid_batch_size_sum") - before_images
    assert imgs == 48 and imgs / batches > 2.0, (imgs, batches)


def _batch_sizes(engine, steps, slow: SlowEngine | None = None, **options) -> list[int]:
    """Run ``steps(batcher, pixels)`` (a coroutine) against a batcher (by default 1 instance, max
    batch 8, a 1-second queue delay); returns the batch sizes the engine saw."""
    from serving.batcher import DynamicBatcher

    slow = slow or SlowEngine(engine, delay=0.0)
    md = engine.metadata
    pixels = [np.zeros((md.input_height, md.input_width, 3), np.uint8)]

    async def main():
        batcher = DynamicBatcher(slow, **{"max_batch_size": 8, "max_queue_delay": 1.0, "instances": 1, **options})
        batcher.start()
        try:
            await steps(batcher, pixels)
        finally:
            await batcher.stop()

    asyncio.run(main())
    return slow.calls


def test_the_batcher_fails_images_whose_deadline_passed_in_the_queue_without_running_them(engine):
    """The server's own guard, for a call whose deadline passes before gRPC cancels it: its images
    are dropped when a batch is formed, the other call's images run."""
    from serving.batcher import DeadlineExpired

    async def steps(batcher, pixels):
        running = batcher.submit(pixels * 2, None)
        await asyncio.sleep(0.05)  # that batch is in the engine (0.3 s)
        late = batcher.submit(pixels * 3, time.monotonic() + 0.1)
        on_time = batcher.submit(pixels, time.monotonic() + 30)
        with pytest.raises(DeadlineExpired, match="deadline passed while queued; not run"):
            await late
        assert len(await on_time) == 1 and len(await running) == 2

    assert _batch_sizes(engine, steps, SlowEngine(engine, delay=0.3), max_queue_delay=0.0) == [2, 1]


def test_a_lone_caller_is_not_held_for_the_queue_delay(engine):
    async def steps(batcher, pixels):
        start = time.monotonic()
        await batcher.submit(pixels, None)
        assert time.monotonic() - start < 0.5  # nothing else was on its way: no reason to wait 1 s

    assert _batch_sizes(engine, steps) == [1]


def test_the_batcher_waits_for_images_still_being_decoded(engine):
    async def steps(batcher, pixels):
        batcher.reserve(1)  # another call's image is being decoded
        first = batcher.submit(pixels, None)
        await asyncio.sleep(0.1)
        assert not first.done()  # held for the image on its way
        batcher.release(1)
        second = batcher.submit(pixels, None)
        await asyncio.gather(first, second)

    assert _batch_sizes(engine, steps) == [2]


def test_a_refused_image_ends_the_wait_for_it(engine):
    async def steps(batcher, pixels):
        batcher.reserve(1)
        first = batcher.submit(pixels, None)
        await asyncio.sleep(0.1)
        start = time.monotonic()
        batcher.release(1)  # that image failed to decode: it will never be submitted
        await first
        assert time.monotonic() - start < 0.5

    assert _batch_sizes(engine, steps) == [1]


def _shared_batches(engine, split_seconds: float, steps) -> list[int]:
    """Batch sizes of 2 instances at 10+ ms per image once ``steps(batcher, pixels)`` ran, after a
    first 2-image call from which the batcher learns the engine's time per image."""
    async def learn_then_steps(batcher, pixels):
        await batcher.submit(pixels * 2, None)
        await steps(batcher, pixels)

    slow = SlowEngine(engine, delay=0.0, per_image=0.01, thread_safe=True)
    sizes = _batch_sizes(engine, learn_then_steps, slow, max_batch_size=32, max_queue_delay=0.0, instances=2,
                         split_seconds=split_seconds)
    return sizes[1:]


async def _sixteen_at_once(batcher, pixels):
    await asyncio.gather(*[batcher.submit(pixels, None) for _ in range(16)])


@pytest.mark.parametrize("split_seconds,expected", [(0.05, [8, 8]), (10.0, [16])])
def test_a_long_batch_is_shared_with_a_free_instance(engine, split_seconds, expected):
    """16 single-image calls at once: the 160+ ms batch is split 8 + 8, so no caller waits for
    all 16; under the split threshold it stays whole, for batching's sake."""
    assert sorted(_shared_batches(engine, split_seconds, _sixteen_at_once)) == expected


def test_long_batches_take_a_fair_share_of_the_images_in_flight(engine):
    """One instance runs 4 images when 12 more arrive: the other takes 8 (half of the 16 in
    flight, not all 12), so both instances' callers wait for batches of about equal length."""
    async def steps(batcher, pixels):
        first = batcher.submit(pixels * 4, None)
        while not batcher.engine.running:  # until the 4 are in the engine
            await asyncio.sleep(0.001)
        await asyncio.gather(first, *[batcher.submit(pixels, None) for _ in range(12)])

    # 4 images (about 40 ms) stay under the 100 ms threshold even on a loaded machine; 12 (120+ ms) do not
    assert _shared_batches(engine, 0.1, steps) == [4, 8, 4]


def test_stream_answers_each_request_in_order(server, engine):
    images = [_jpeg(200 + i) for i in range(6)]
    expected = engine.embed_images([decode_image(b) for b in images])
    stub = reid_pb2_grpc.ReIdentificationStub(grpc.insecure_channel(server.target))
    requests = [build_request([img], request_id=f"r{i}") for i, img in enumerate(images)]
    requests.insert(3, build_request([b"junk"], request_id="bad"))
    responses = list(stub.EmbedStream(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    good = [r for r in responses if r.request_id != "bad"]
    for r, want in zip(good, expected):
        assert _cos(np.array(r.results[0].embedding.values), want) >= 0.9999
    assert responses[3].results[0].WhichOneof("result") == "error"


def test_a_stream_message_refused_whole_gets_its_code_on_every_result_and_the_stream_goes_on(server):
    """On a stream a call-level refusal cannot be the call's status (that would end the stream and
    every later message with it): it becomes the same error on each result of that message."""
    too_many = Limits().max_images_per_request + 1
    requests = [build_request([_jpeg(1)], request_id="before"), reid_pb2.EmbedRequest(request_id="empty"),
                build_request([_jpeg(2)] * too_many, request_id="too many"), build_request([_jpeg(3)], request_id="after")]
    refused = server.metrics.value("reid_requests_total", method="EmbedStream", code="INVALID_ARGUMENT")
    stub = reid_pb2_grpc.ReIdentificationStub(grpc.insecure_channel(server.target))
    responses = {r.request_id: r for r in stub.EmbedStream(iter(requests), timeout=30)}
    assert list(responses) == ["before", "empty", "too many", "after"]
    assert responses["before"].results[0].HasField("embedding") and responses["after"].results[0].HasField("embedding")
    for rid, count, message in [("empty", 1, "request has no images"), ("too many", too_many, f"request has {too_many} images")]:
        results = responses[rid].results
        assert len(results) == count  # one result per image, as for any answer
        assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and r.error.message.startswith(message)
                   for r in results), results[0]
    assert server.metrics.value("reid_requests_total", method="EmbedStream", code="INVALID_ARGUMENT") == refused + 2


def test_request_latency_is_recorded_per_call_and_per_stream_message(server):
    """reid_request_seconds{method}: every call, failed ones too (the "total" stage covers
    successful Embed calls only), and each message of a stream."""
    def count(method: str) -> float:
        return server.metrics.value("reid_request_seconds_count", method=method)

    before = {m: count(m) for m in ("Embed", "EmbedStream")}
    stub = reid_pb2_grpc.ReIdentificationStub(grpc.insecure_channel(server.target))
    stub.Embed(build_request([_jpeg(1)]), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(reid_pb2.EmbedRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(list(stub.EmbedStream(iter([build_request([_jpeg(i)]) for i in range(3)]), timeout=30))) == 3
    deadline = time.monotonic() + 5  # a failed call's status reaches the caller before the server's handler has unwound
    while count("Embed") - before["Embed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (count("Embed") - before["Embed"], count("EmbedStream") - before["EmbedStream"]) == (2, 3)
    assert server.metrics.value("reid_request_seconds_sum", method="Embed") > 0


def _stream_survives_idle_pings(engine, min_client_ping_seconds: float) -> bool:
    """Whether an EmbedStream whose client pings every second outlives 6 s of silence on a server
    that accepts pings ``min_client_ping_seconds`` apart (with gRPC's default policy the third
    early ping ends the connection, 4-5 s into the silence here)."""
    def crops_with_a_pause():
        yield [_jpeg(1)]
        time.sleep(6)
        yield [_jpeg(2)]

    with ServerThread(engine, ServerConfig(port=0, min_client_ping_seconds=min_client_ping_seconds)) as s:
        with ReidClient(s.target, keepalive_seconds=1) as client:
            try:
                return all(o[0].ok for o in client.embed_stream(crops_with_a_pause(), timeout=30))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False


def test_client_keepalive_pings_do_not_end_an_idle_stream(engine):
    """Pipelines keep a stream open through quiet spells and ping to keep proxies from dropping it.
    With gRPC's server default (pings 5 minutes apart at least) the third ping ends the connection
    (GOAWAY too_many_pings) and the open stream fails; the server's own limit lets them through."""
    assert _stream_survives_idle_pings(engine, min_client_ping_seconds=0.5)
    assert not _stream_survives_idle_pings(engine, min_client_ping_seconds=300)


def test_client_streams_sync_and_async(server, engine):
    import asyncio

    from serving.client import AsyncReidClient

    images = [_jpeg(400 + i) for i in range(5)]
    expected = engine.embed_images([decode_image(b) for b in images])
    batches = [images[:2], [b"junk", images[2]], images[3:]]
    with ReidClient(server.target) as client:
        answers = list(client.embed_stream(iter(batches)))
    assert [len(a) for a in answers] == [2, 2, 2]
    assert not answers[1][0].ok and answers[1][0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    got = [o.embedding for a in answers for o in a if o.ok]
    assert all(_cos(g, e) >= 0.9999 for g, e in zip(got, expected))

    async def frames():
        for batch in batches:
            await asyncio.sleep(0.01)
            yield batch

    async def run():
        async with AsyncReidClient(server.target) as client:
            return [a async for a in client.embed_stream(frames())]

    again = asyncio.run(run())
    assert [[o.ok for o in a] for a in again] == [[o.ok for o in a] for a in answers]
    assert all(_cos(x.embedding, y.embedding) >= 0.9999 for a, b in zip(answers, again) for x, y in zip(a, b) if x.ok)


def test_client_library_misuse_gets_a_clear_error():
    """A bad index type raised a bare KeyError; a plain ``with`` on the asyncio client "closed" it
    with a coroutine nobody awaited, leaving the channel open."""
    import asyncio

    from serving.client import AsyncGalleryClient, AsyncReidClient

    with GalleryClient("127.0.0.1:1") as g, pytest.raises(ValueError, match="index_type must be 'flat' or 'hnsw', not 'ivf'"):
        g.create("lobby", index_type="ivf")

    async def plain_with(kind):
        client = kind("127.0.0.1:1")
        try:
            with pytest.raises(TypeError, match=f"use 'async with {kind.__name__}"):
                with client:
                    pass
        finally:
            await client.close()

    asyncio.run(plain_with(AsyncReidClient))
    asyncio.run(plain_with(AsyncGalleryClient))


def test_request_limits(engine):
    config = ServerConfig(port=0, max_message_bytes=200_000, limits=Limits(max_images_per_request=4, max_image_pixels=100 * 100))
    with ServerThread(engine, config) as s, ReidClient(s.target, max_message_bytes=10 * 2**20, retries=0) as client:
        with pytest.raises(grpc.RpcError) as too_many:
            client.embed([_jpeg(i) for i in range(5)])
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 4" in too_many.value.details()
        with pytest.raises(grpc.RpcError) as empty:
            client.embed([])
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as huge:
            client.embed([np.zeros((400, 400, 3), np.uint8)])  # 480 kB message
        assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        big = client.embed([_jpeg(1, size=(200, 200)), _jpeg(2)])  # decoded size checked before decoding
        assert not big[0].ok and "exceeds the limit" in big[0].error and big[1].ok


def test_full_queue_fails_fast_with_resource_exhausted(engine):
    slow = SlowEngine(engine, delay=0.6)
    config = ServerConfig(port=0, queue_capacity=4, max_batch_size=4, max_queue_delay_ms=0,
                          limits=Limits(max_images_per_request=4))
    with ServerThread(slow, config) as s:
        client = ReidClient(s.target, retries=0)  # the server's answer, not what a client makes of it
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.embed, [_jpeg(i) for i in range(3)])
            time.sleep(0.2)  # first batch is now running; the queue is empty
            second = pool.submit(client.embed, [_jpeg(i) for i in range(3)])
            time.sleep(0.1)  # 3 of 4 slots taken
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.embed([_jpeg(i) for i in range(3)])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - start < 0.4  # refused at once, not after the queue drains
            assert all(o.ok for o in first.result()) and all(o.ok for o in second.result())


def test_expired_deadline_is_not_inferred(engine):
    slow = SlowEngine(engine, delay=0.8)
    with ServerThread(slow, ServerConfig(port=0, max_batch_size=2, max_queue_delay_ms=0)) as s:
        client = ReidClient(s.target)
        late = ReidClient(s.target, timeout=0.3)
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(client.embed, [_jpeg(1), _jpeg(2)])
            time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as err:
                late.embed([_jpeg(3)])
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert busy.result()[0].ok
        time.sleep(0.3)
        assert slow.calls[1:] == [2]  # warm-up, then only the busy batch: the late image never ran
        assert s.metrics.value("reid_images_inferred_total") == 2


def test_instances_run_batches_at_once_and_keep_answers_apart(engine):
    slow = SlowEngine(engine, delay=0.4, thread_safe=True)
    images = [_jpeg(300 + i) for i in range(4)]
    expected = engine.embed_images([decode_image(b) for b in images])
    config = ServerConfig(port=0, instances=2, max_batch_size=2, max_queue_delay_ms=0, split_batch_ms=300)
    with ServerThread(slow, config) as s, ReidClient(s.target) as client:
        assert s.server.batcher.instances == 2 and s.server.batcher.split_seconds == 0.3
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda i: client.embed(images[2 * i: 2 * i + 2]), range(2)))
    assert slow.most_running == 2  # two batches were inside the engine at the same time
    got = [o.embedding for pair in results for o in pair]
    assert all(_cos(g, e) >= 0.9999 for g, e in zip(got, expected))


def test_batcher_options_come_from_the_config_file_and_the_command_line(tmp_path):
    from serving.cli import build_config, parse_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text("split-batch-ms: 100\nmax_queue_delay_ms: 5\ngrace_seconds: 3\n")
    c = build_config(parse_serve_args(["--model", "m.onnx", "--config", str(config), "--split-batch-ms", "400"]))
    assert (c.split_batch_ms, c.max_queue_delay_ms, c.grace_seconds) == (400, 5, 3)  # the command line wins
    assert build_config(parse_serve_args(["--model", "m.onnx"])).split_batch_ms == 250
    assert build_config(parse_serve_args(["--model", "m.onnx", "--min-client-ping-seconds", "30"])).min_client_ping_seconds == 30
    with pytest.raises(ValueError, match=r"min_client_ping_seconds \(--min-client-ping-seconds\) must be at least 0"):
        build_config(parse_serve_args(["--model", "m.onnx", "--min-client-ping-seconds", "-1"]))


def test_an_input_size_wider_than_high_is_warned_about(caplog):
    from serving.cli import parse_serve_args, preprocessing_fallback

    mean = ["--pixel-mean", "0.5", "0.5", "0.5", "--pixel-std", "0.5", "0.5", "0.5"]
    fallback = preprocessing_fallback(parse_serve_args(["--model", "m.onnx", *mean, "--input-size", "128", "256"]))
    assert (fallback.input_height, fallback.input_width) == (128, 256)  # as given: a warning, not a guess
    assert "--input-size 128 256: wider than high" in caplog.text
    caplog.clear()
    preprocessing_fallback(parse_serve_args(["--model", "m.onnx", *mean, "--input-size", "256", "128"]))
    preprocessing_fallback(parse_serve_args(["--model", "m.onnx", *mean]))  # the graph's size
    assert caplog.text == ""


def test_paths_a_config_file_gives_beside_itself_are_named_when_they_miss(tiny_onnx, tmp_path, monkeypatch, capsys, caplog):
    """Relative paths in --config are read from the working directory: a config kept beside its
    model failed with "model file m.onnx does not exist", and a gallery_dir beside it started an
    empty gallery folder here, its galleries seemingly gone."""
    import shutil

    from serving.cli import serve_main

    conf = tmp_path / "conf"
    (conf / "galleries").mkdir(parents=True)
    shutil.copy(tiny_onnx, conf / "m.onnx")
    (conf / "serve.yaml").write_text("model: m.onnx\nno_gallery: true\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert serve_main(["--config", str(conf / "serve.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"reid-serve: error: model file m.onnx does not exist (relative paths in --config are taken from the working "
        f"directory {elsewhere}, not from {conf}, which holds model: m.onnx: give absolute paths, or start from {conf})")
    (conf / "serve.yaml").write_text(f"model: {conf / 'm.onnx'}\ngallery_dir: galleries\n")
    monkeypatch.setattr("serving.cli.serve_forever", lambda *a: asyncio.sleep(0))  # up to the start, no further
    assert serve_main(["--config", str(conf / "serve.yaml")]) == 0
    assert f"not from {conf}, which holds gallery_dir: galleries" in caplog.text
    caplog.clear()
    monkeypatch.chdir(conf)  # started beside it: nothing to say
    assert serve_main(["--config", "serve.yaml"]) == 0
    assert "relative paths in --config" not in caplog.text


def test_every_flag_named_after_a_setting_reaches_the_server_config(tmp_path):
    """build_config kept a hand-written list of flags: one added to the parser and not to the list
    was parsed, then ignored."""
    import dataclasses

    from serving.cli import build_config, parse_serve_args, serve_parser
    from serving.server import ServerConfig
    from serving.service import Limits

    defaults = {**{f.name: f for f in dataclasses.fields(ServerConfig)}, **{f.name: f for f in dataclasses.fields(Limits)}}
    argv, expected = ["--model", "m.onnx"], {}
    tokens = tmp_path / "tokens"  # read as the flags are: it must hold tokens
    tokens.write_text("t" * 16 + " read\n")
    actions = [a for a in serve_parser()._actions if a.dest in defaults]
    for action in actions:
        default = defaults[action.dest].default
        if action.nargs == 0:
            argv.append(action.option_strings[0])
            expected[action.dest] = not default
        else:
            value = (default + 1 if isinstance(default, (int, float)) else
                     str(tokens) if action.dest == "tokens_file" else f"x-{action.dest}")
            argv += [action.option_strings[0], str(value)]
            expected[action.dest] = value
    config = build_config(parse_serve_args(argv))
    got = {name: getattr(config.limits if hasattr(config.limits, name) else config, name) for name in expected}
    assert got == expected
    assert {"host", "insecure", "tls_client_ca", "gallery_queue_capacity", "max_image_pixels"} <= set(expected)
    # a flag with another name must be wired by hand: it is one of these, or build_config ignores it
    others = {"help", "version", "config", "model", "device", "intra_op_threads", "graph_optimization", "event_loop",
              "pixel_mean", "pixel_std", "input_size", "model_id", "gallery_dir", "no_gallery", "gallery_backend",
              "milvus_uri", "milvus_token", "milvus_ca", "milvus_consistency", "no_batching", "tokens_env",
              "log_format"}
    assert {a.dest for a in serve_parser()._actions} - set(defaults) == others


@pytest.mark.parametrize("argv, message", [
    (["--max-batch-size", "0"], r"max_batch_size \(--max-batch-size\) must be at least 1, got 0"),
    (["--workers", "0"], "workers .* must be at least 1"),  # was a ThreadPoolExecutor traceback
    (["--queue-capacity", "0"], "queue_capacity .* must be at least 1"),  # started, refusing every call
    (["--max-message-bytes", "10"], "max_message_bytes .* must be at least 4096"),
    (["--max-images-per-request", "0"], "max_images_per_request .* must be at least 1"),
    (["--max-queue-delay-ms", "-1"], "max_queue_delay_ms .* must be at least 0"),
    (["--port", "70000"], r"port \(--port\) must be between 0 and 65535, got 70000"),
    (["--metrics-port", "-1"], "metrics_port .* must be between 0 and 65535"),
    (["--instances", "-1"], r"instances \(--instances\) must be 0 \(automatic\) or more"),
    # a request that could never be queued would get RESOURCE_EXHAUSTED, which clients retry, forever
    (["--queue-capacity", "100"], r"max_images_per_request \(256\) exceeds queue_capacity \(100\)"),
    # was "cannot serve metrics on 127.0.0.1:9100: Address already in use", after the gRPC port took it
    (["--port", "9100", "--metrics-port", "9100"], "--metrics-port 9100 is also --port: give the metrics their own port"),
])
def test_numeric_options_out_of_range_are_refused_naming_the_option(argv, message):
    from serving.cli import build_config, parse_serve_args

    with pytest.raises(ValueError, match=message):
        build_config(parse_serve_args(["--model", "m.onnx", *argv]))


@pytest.mark.parametrize("line, message", [
    ("max_batch_size: 8.5", "max_batch_size in {} must be a whole number, not 8.5"),
    ("insecure: 'false'", "insecure in {} must be true or false, not 'false'"),  # a string: it used to mean true
    ("no-gallery: 1", "no_gallery in {} must be true or false, not 1"),
    ("pixel_mean: 0.5", "pixel_mean in {} must be a list of 3 values, not 0.5"),  # was a traceback at startup
    ("input_size: [256, wide]", "input_size in {} must be a whole number, not 'wide'"),
    ("intra_op_threads: 2.5", "intra_op_threads in {} must be a whole number, not 2.5"),
    ("host: yes", "host in {} must be a single value, not True"),  # YAML 1.1 reads yes as true
    ("port: [50051]", "port in {} must be a whole number, not [50051]"),
    ("device: gpu", "device in {} must be one of auto, cpu, cuda, not 'gpu'"),
])
def test_config_file_values_are_checked_as_the_command_line_checks_them(tmp_path, capsys, line, message):
    from serving.cli import parse_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text(f"model: m.onnx\n{line}\n")
    with pytest.raises(SystemExit) as exit_:
        parse_serve_args(["--config", str(config)])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"reid-serve: error: {message.format(config)}"


def test_config_file_values_are_converted_as_on_the_command_line(tmp_path):
    from serving.cli import build_config, parse_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text("model: 7\nport: '50052'\ninput-size: [256, '128']\ninsecure: false\nno_batching: true\n"
                      "max_queue_delay_ms: 2\n")
    args = parse_serve_args(["--config", str(config)])
    assert (args.model, args.port, args.input_size, args.insecure, args.no_batching) == ("7", 50052, [256, 128], False, True)
    c = build_config(args)
    assert (c.port, c.insecure, c.batching, c.max_queue_delay_ms) == (50052, False, False, 2.0)
    assert isinstance(c.max_queue_delay_ms, float)


def test_config_file_values_that_are_no_option_are_checked_by_the_server_config(tmp_path):
    from serving.cli import build_config, parse_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text("grace_seconds: soon\n")
    with pytest.raises(ValueError, match="grace_seconds .* must be a number, got 'soon'"):
        build_config(parse_serve_args(["--model", "m.onnx", "--config", str(config)]))


def test_a_config_file_is_read_as_utf8_whatever_the_locale(tmp_path, capsys):
    """Under LC_ALL=POSIX Python reads files as ASCII: a config naming /models/Zoë.onnx (or with a
    non-ASCII comment) ended in a UnicodeDecodeError traceback; one saved in Latin-1 too."""
    from serving.cli import parse_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text("# Zoë's model\nmodel: /models/Zoë.onnx\n", encoding="utf-8")
    code = f"from serving.cli import parse_serve_args; print(ascii(parse_serve_args(['--config', {str(config)!r}]).model))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "LC_ALL": "POSIX", "PYTHONUTF8": "0"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.strip() == ascii("/models/Zoë.onnx")
    config.write_text("model: /models/Zoë.onnx\n", encoding="latin-1")
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(config)])
    assert f"--config {config} is not UTF-8 text (byte 17); save it as UTF-8" in capsys.readouterr().err


def test_config_file_takes_every_option_not_only_the_batchers(tmp_path, capsys):
    """--config is documented as holding any option: the model, the device, preprocessing, the
    gallery backend and the log format too, each still overridden by the command line."""
    from serving.cli import build_config, parse_serve_args

    config = tmp_path / "serve.yaml"
    config.write_text("model: osnet.onnx\ndevice: cpu\npixel-mean: [0.485, 0.456, 0.406]\ngallery_backend: milvus\n"
                      "milvus-uri: m.db\nmilvus_consistency: bounded\nlog_format: json\ninsecure: true\n"
                      "gallery_dir: /srv/galleries\nmax_images_per_request: 8\nmax_top_k: 50\nmax_rerank_items: 5000\n")
    args = parse_serve_args(["--config", str(config), "--milvus-consistency", "session"])
    assert (args.model, args.device, args.pixel_mean, args.gallery_backend, args.milvus_uri) == (
        "osnet.onnx", "cpu", [0.485, 0.456, 0.406], "milvus", "m.db")
    assert args.milvus_consistency == "session" and args.log_format == "json"  # the command line wins
    assert args.gallery_dir == Path("/srv/galleries")  # converted as on the command line
    c = build_config(args)
    assert c.insecure and (c.limits.max_images_per_request, c.limits.max_top_k, c.limits.max_rerank_items) == (8, 50, 5000)
    config.write_text("model: m.onnx\nmax_rerank_items: 0\n")
    with pytest.raises(ValueError, match="max_rerank_items"):
        build_config(parse_serve_args(["--config", str(config)]))
    config.write_text("device: cpu\n")
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(config)])
    assert "--model is required" in capsys.readouterr().err
    config.write_text("model: [m.onnx\n")
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(config)])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"reid-serve: error: --config {config} is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'")
    config.write_text("model: m.onnx\nport: 7000\nport: 7001\n")
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(config)])
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"reid-serve: error: --config {config} is not valid YAML: line 3, column 1: key 'port' appears twice")
    config.write_text("model: m.onnx\nbatch_size: 4\nmax_queu_delay_ms: 2\nzzz: 1\n")
    with pytest.raises(ValueError) as info:
        build_config(parse_serve_args(["--config", str(config)]))
    assert str(info.value) == (f"unknown option(s) in {config}: batch_size (did you mean max_batch_size?), "
                               "max_queu_delay_ms (did you mean max_queue_delay_ms?), zzz")


def _os_thread_names() -> set[str]:
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            names.add(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are read from Linux /proc")
def test_stage_threads_carry_their_names_to_the_os(server):
    """top -H / ps -L / benchmarks/serve.py tell decoding from inference by these names."""
    with ReidClient(server.target) as client:
        assert client.embed([_jpeg(1)])[0].ok
    names = _os_thread_names()
    assert {"preprocess_0", "inference_0"} <= names
    assert Path("/proc/self/comm").read_text().strip() not in {"preprocess_0", "inference_0"}  # process name kept


def test_startup_objects_are_kept_out_of_full_collections(engine):
    """Frozen once the server is warm: a full collection under load then skips the modules' and the
    model's objects instead of walking them all while the event loop waits."""
    gc.unfreeze()  # whatever an earlier test's server froze
    assert gc.get_freeze_count() == 0
    with ServerThread(engine, ServerConfig(port=0)):
        assert gc.get_freeze_count() > 10_000


def test_instances_need_an_engine_that_allows_concurrent_runs(engine, tmp_path, capsys):
    from serving.batcher import DynamicBatcher
    from serving.cli import serve_main

    with pytest.raises(ValueError, match="one batch at a time"):
        DynamicBatcher(SlowEngine(engine), instances=2)
    plan = tmp_path / "model.engine"  # looks like a TensorRT plan: refused before TensorRT is imported
    plan.write_bytes(b"plan")
    Path(str(plan) + ".json").write_text("{}")
    assert serve_main(["--model", str(plan), "--instances", "2", "--no-gallery"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one batch at a time" in err[0]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")  # the fallback faked here
def test_cuda_that_cannot_start_is_refused_not_run_on_the_cpu(tiny_onnx, monkeypatch, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider; the test needs one that lacks it")
    with pytest.raises(ModelFileError, match="no CUDA provider"):
        OnnxRuntimeEngine(tiny_onnx, device="cuda")
    # Listed but unable to start (onnxruntime-gpu without its CUDA libraries): the session falls back to the CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelFileError, match="CUDA provider did not start"):
        OnnxRuntimeEngine(tiny_onnx, device="cuda")
    with caplog.at_level(logging.WARNING, logger="serving.engines.onnxruntime"):
        engine = OnnxRuntimeEngine(tiny_onnx, device="auto")
    assert engine.providers == ["CPUExecutionProvider"] and "CUDA provider did not start" in caplog.text
    assert not engine.warm_each_batch_size  # on the CPU one warm-up run at the largest batch is enough


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")  # the fallback faked here
def test_cuda_libraries_from_pip_are_preloaded_and_their_failures_reported(tiny_onnx, monkeypatch, caplog):
    """onnxruntime-gpu's CUDA and cuDNN pip packages are off the loader's path: the engine loads them
    (onnxruntime.preload_dlls) before a CUDA session, and what failed to load reaches the user."""
    import onnxruntime as ort

    from serving.engines.onnxruntime import preload_cuda_libraries

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider; the test fakes one that cannot start")
    calls = []

    def fake_preload():
        calls.append(1)
        print("Failed to load libcublasLt.so.13: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", fake_preload, raising=False)  # onnxruntime 1.20 (allowed) has none
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    preload_cuda_libraries.cache_clear()
    try:
        OnnxRuntimeEngine(tiny_onnx, device="cpu")
        assert calls == []  # a CPU session loads no CUDA library
        with pytest.raises(ModelFileError, match="libcublasLt.so.13: cannot open"):
            OnnxRuntimeEngine(tiny_onnx, device="cuda")
        with caplog.at_level(logging.WARNING, logger="serving.engines.onnxruntime"):
            OnnxRuntimeEngine(tiny_onnx, device="auto")
        assert "libcublasLt.so.13" in caplog.text
        assert calls == [1]  # loaded once per process
    finally:
        preload_cuda_libraries.cache_clear()


def test_onnxruntime_on_cpu_picks_two_instances_sharing_the_cores(tiny_onnx, tmp_path, monkeypatch):
    import retrieval.cpu_quota

    monkeypatch.setattr(retrieval.cpu_quota, "CGROUP_ROOT", tmp_path)  # no CPU quota
    cores = len(os.sched_getaffinity(0))
    auto = OnnxRuntimeEngine(tiny_onnx, device="cpu", instances=0)
    assert auto.instances == min(2, cores)
    threads = auto.session.get_session_options().intra_op_num_threads
    assert threads == (max(1, cores // 2) if cores >= 2 else 0)
    single = OnnxRuntimeEngine(tiny_onnx, device="cpu")  # a lone caller (offline evaluation) keeps every core
    assert single.instances == 1 and single.session.get_session_options().intra_op_num_threads == 0


def test_a_cgroup_cpu_quota_sizes_onnxruntimes_threads(tiny_onnx, tmp_path, monkeypatch, caplog):
    """A container limited to N CPUs sees every core of its host; ONNX Runtime sized its threads by
    those, and a quota spent by many threads is throttled for the rest of each period."""
    import retrieval.cpu_quota
    from retrieval.cpu_quota import cpu_quota_cores, usable_cores

    monkeypatch.setattr(retrieval.cpu_quota, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cpu_quota_cores() is None and usable_cores() == (64, False)
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota_cores() is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")  # 1.5 CPUs: two threads may run
    assert cpu_quota_cores() == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")  # cgroup v2 wins where present
    assert cpu_quota_cores() is None
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert usable_cores() == (4, True)
    with caplog.at_level(logging.INFO, logger="serving.engines.onnxruntime"):
        auto = OnnxRuntimeEngine(tiny_onnx, device="cpu", instances=0)
        single = OnnxRuntimeEngine(tiny_onnx, device="cpu")
    assert auto.instances == 2 and auto.session.get_session_options().intra_op_num_threads == 2
    assert single.session.get_session_options().intra_op_num_threads == 4  # not 0: ONNX Runtime would count 64
    assert "a CPU quota allows 4 core(s): ONNX Runtime runs 2 thread(s) per instance, 2 instance(s)" in caplog.text
    explicit = OnnxRuntimeEngine(tiny_onnx, device="cpu", intra_op_threads=3)
    assert explicit.session.get_session_options().intra_op_num_threads == 3


def test_cores_are_counted_where_the_os_has_no_affinity(tmp_path, monkeypatch):
    """macOS has no os.sched_getaffinity: ONNX Runtime's engine, the galleries and training's data
    workers all count cores through usable_cores, and each raised AttributeError there."""
    import retrieval.cpu_quota
    from retrieval.cpu_quota import usable_cores

    monkeypatch.setattr(retrieval.cpu_quota, "CGROUP_ROOT", tmp_path)  # no quota
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores() == (6, False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "cannot be determined"
    assert usable_cores() == (1, False)


def test_engine_failure_fails_that_batch_only(engine):
    failing = SlowEngine(engine, delay=0.0, fail_on_call=2)  # call 1 is the warm-up
    with ServerThread(failing, ServerConfig(port=0, max_queue_delay_ms=0)) as s, ReidClient(s.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.embed([_jpeg(1)])
        assert err.value.code() == grpc.StatusCode.INTERNAL and "injected engine failure" in err.value.details()
        assert client.embed([_jpeg(2)])[0].ok


def test_health_serving_then_not_serving_during_shutdown(engine):
    slow = SlowEngine(engine, delay=0.8)
    s = ServerThread(slow, ServerConfig(port=0, max_queue_delay_ms=0)).__enter__()
    channel = grpc.insecure_channel(s.target)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="reid.v1.ReIdentification")).status == health_pb2.HealthCheckResponse.SERVING
    client = ReidClient(s.target)
    with ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(client.embed, [_jpeg(5)])
        time.sleep(0.2)
        stopper = threading.Thread(target=s.stop, kwargs={"grace": 5.0})
        stopper.start()
        time.sleep(0.1)
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert inflight.result()[0].ok  # in-flight work finished during the drain
        stopper.join()
    s.loop.call_soon_threadsafe(s.loop.stop)


def test_shutdown_ends_streams_once_what_they_read_is_answered(engine):
    """A stream never ends by itself, so a shutdown used to hold it for the whole grace period and
    then cancel it mid-request. Now every request read before the stop is answered, then the stream
    ends with UNAVAILABLE (resend the rest elsewhere) and the server stops without waiting."""
    requests: queue.Queue = queue.Queue()
    with ServerThread(engine, ServerConfig(port=0, grace_seconds=30, shutdown_delay_seconds=0.5)) as s:
        answers = ReidClient(s.target).embed_stream(iter(requests.get, None))
        requests.put([_jpeg(0)])
        assert next(answers)[0].ok
        start = time.monotonic()
        stopper = threading.Thread(target=s.stop, kwargs={"grace": None})
        stopper.start()
        for i in range(20):  # sent while health says NOT_SERVING but the port still takes calls
            requests.put([_jpeg(i)])
        answered = 0
        with pytest.raises(grpc.RpcError) as ended:
            for outcomes in answers:
                assert outcomes[0].ok
                answered += 1
        stopper.join()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
        assert answered == 20
        assert time.monotonic() - start < 10  # not the 30 s grace period


class _EmptyStore:
    """What the server asks of a gallery store that holds no gallery: the shutdown tests replace
    its close()."""
    location = "in memory"
    load_seconds = None

    def dimensions(self):
        return {}

    def models(self):
        return {}


def test_wait_returns_only_after_the_whole_shutdown(engine):
    """serve_forever (and with it the process) ends when wait() returns, and the gRPC port closes
    before the batcher drains and the galleries are snapshotted: wait() must cover those too."""
    from serving.server import ReidServer

    class Store(_EmptyStore):  # the shutdown's last step is closing (snapshotting) the gallery store
        closed = False

        def close(self):
            self.closed = True

    async def main():
        store = Store()
        server = ReidServer(engine, ServerConfig(port=0, shutdown_delay_seconds=0), store)
        await server.start()
        drain = server.batcher.stop

        async def slow_drain():
            await asyncio.sleep(0.3)
            await drain()

        server.batcher.stop = slow_drain
        stopping = asyncio.ensure_future(server.stop(grace=0))
        await server.wait()
        assert store.closed
        await stopping

    asyncio.run(main())


def test_a_failed_shutdown_step_is_raised_by_wait(engine):
    """A gallery snapshot that fails must not end in a silent exit 0."""
    from serving.server import ReidServer

    class Store(_EmptyStore):
        def close(self):
            raise OSError("disk full")

    async def main():
        server = ReidServer(engine, ServerConfig(port=0, shutdown_delay_seconds=0), Store())
        await server.start()
        stopping = asyncio.ensure_future(server.stop(grace=0))
        with pytest.raises(OSError, match="disk full"):
            await server.wait()
        with pytest.raises(OSError):
            await stopping

    asyncio.run(main())


@contextlib.contextmanager
def _reid_serve(tiny_onnx, *flags: str):
    """reid-serve in a subprocess on a free port: (the process, its "serving ... on" line, its address)."""
    proc = subprocess.Popen([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                             "--model", str(tiny_onnx), "--port", "0", *flags], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        line, deadline = "", time.monotonic() + 60
        while " on 127.0.0.1:" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, f"server did not report its port: {line}"
            line = proc.stderr.readline()
        yield proc, line, "127.0.0.1:" + line.split("127.0.0.1:")[1].split()[0]
    finally:
        proc.kill()
        proc.stderr.close()


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_sigterm_drains_and_exits_zero(tiny_onnx, event_loop):
    with _reid_serve(tiny_onnx, "--event-loop", event_loop) as (proc, line, target):
        # auto picks uvloop, a dependency wherever it installs (not on Windows)
        expected = "asyncio" if event_loop == "asyncio" or importlib.util.find_spec("uvloop") is None else "uvloop"
        assert line.rstrip().endswith(f", {expected} event loop)"), line
        with ReidClient(target) as client:
            assert client.embed([_jpeg(1)])[0].ok
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def test_sighup_does_not_stop_the_server(tiny_onnx):
    """SIGHUP ("reload", by daemon custom) ended the process at once, calls in flight and all."""
    with _reid_serve(tiny_onnx, "--no-gallery") as (proc, _, target):
        time.sleep(0.5)  # the handlers are set just after the line that names the port
        proc.send_signal(signal.SIGHUP)
        assert "received SIGHUP: nothing to do; the TLS and tokens files are read again" in proc.stderr.readline()
        with ReidClient(target) as client:
            assert client.embed([_jpeg(1)])[0].ok
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_json_logs_are_one_object_per_line_from_start_to_stop(tiny_onnx, tmp_path):
    """``--log-format json`` (for log collectors): every line the server logs, start to exit, is one
    JSON object with its time, level, logger and message; and FAISS's loader, imported by the first
    gallery call, no longer adds its 11 lines ("Could not load library with AVX512 support ...").
    The metrics endpoint of reid-serve carries no NAME_created series (one per series otherwise)."""
    metrics_port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                             "--model", str(tiny_onnx), "--port", "0", "--gallery-dir", str(tmp_path), "--log-format", "json",
                             "--metrics-port", str(metrics_port)],
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        entries = []
        deadline = time.monotonic() + 60
        while not any(e["message"].startswith("serving reid.v1.ReIdentification on 127.0.0.1:") for e in entries):
            assert time.monotonic() < deadline, entries
            entries.append(json.loads(proc.stderr.readline()))
        port = int(entries[-1]["message"].split("127.0.0.1:")[1].split()[0])
        with GalleryClient(f"127.0.0.1:{port}") as g:
            g.create("g", 8)
            g.add("g", embeddings=np.eye(2, 8))
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'reid_requests_total{code="OK",method="AddToGallery"} 1.0' in scraped
        assert not [line for line in scraped.splitlines() if "_created" in line], scraped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        entries += [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        proc.kill()
        proc.stderr.close()
    assert all(set(e) == {"time", "level", "logger", "message"} for e in entries), entries
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", e["time"]) for e in entries), entries
    assert [e["message"] for e in entries][-2:] == ["received SIGTERM: draining", "server stopped"]
    assert {e["level"] for e in entries} <= {"INFO", "WARNING"} and "INFO" in {e["level"] for e in entries}
    assert not [e for e in entries if e["logger"].startswith("faiss")], entries


def test_json_logs_hold_warnings_crashes_and_the_fatal_error_too(tmp_path):
    """Python warnings, a thread's uncaught exception, a crash's traceback and the one-line fatal
    error went to stderr as plain (multi-line) text past ``--log-format json``."""
    code = ("import threading, warnings\nfrom serving.cli import configure_logging\n"
            "fatal = configure_logging('json')\nwarnings.warn('a library warns')\n"
            "thread = threading.Thread(target=lambda: 1 / 0, name='pool-1')\nthread.start(); thread.join()\n"
            "fatal('reid-serve: error: what to fix')\nraise RuntimeError('boom')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    entries = [json.loads(line) for line in result.stderr.splitlines()]  # each line one object
    assert [(e["level"], e["logger"]) for e in entries] == [
        ("WARNING", "py.warnings"), ("ERROR", "reid-serve"), ("ERROR", "reid-serve"), ("CRITICAL", "reid-serve")]
    assert "UserWarning: a library warns" in entries[0]["message"]
    assert [e["message"] for e in entries[1:]] == [
        "uncaught exception in thread pool-1", "reid-serve: error: what to fix", "uncaught exception"]
    assert "ZeroDivisionError" in entries[1]["exception"] and "RuntimeError: boom" in entries[3]["exception"]
    text = subprocess.run([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                           "--model", str(tmp_path / "absent.onnx"), "--log-format", "json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert text.returncode == 2 and json.loads(text.stderr.strip().splitlines()[-1])["message"].startswith("reid-serve: error: ")


def test_a_port_that_cannot_be_bound_says_why(engine, monkeypatch):
    """gRPC's failed bind gives no reason, and every failure read "the port is taken or HOST is not
    an address of this machine", a privileged port included."""
    import errno
    import socket

    from serving.server import _bind_failure

    with pytest.raises(OSError, match="cannot listen on 192.0.2.1:0: 192.0.2.1 is not an address of this machine; "
                                      "choose another --host"):
        asyncio.run(ReidServer(engine, ServerConfig(host="192.0.2.1", port=0, insecure=True)).start())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        assert _bind_failure("127.0.0.1", holder.getsockname()[1], False).startswith("the port is taken")
    assert _bind_failure("127.0.0.1", 0, True) == ("gRPC refused it, though the address itself can be bound; gRPC may "
                                                   "have refused the TLS files (its own message is above)")

    class Privileged(socket.socket):
        def bind(self, address):
            raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket, "socket", Privileged)
    assert _bind_failure("127.0.0.1", 80, False) == ("permission denied: ports below 1024 need root or "
                                                     "CAP_NET_BIND_SERVICE; choose another --port (Permission denied)")


def test_a_port_another_server_holds_is_a_startup_error_unless_both_share_it(engine):
    """gRPC binds with SO_REUSEPORT by default: a second server started on a server's port came up,
    and the kernel gave it part of the first one's connections, without a word to either."""
    with ServerThread(engine, ServerConfig(port=0)) as first:
        with pytest.raises(OSError, match=f"cannot listen on {first.target}: the port is taken"):
            asyncio.run(ReidServer(engine, ServerConfig(port=first.server.port)).start())
    with ServerThread(engine, ServerConfig(port=0, reuse_port=True)) as first:  # both asked for it: shared
        with ServerThread(engine, ServerConfig(port=first.server.port, reuse_port=True)) as second:
            assert second.target == first.target
            with ReidClient(second.target) as client:
                assert client.embed([_jpeg(1)])[0].ok


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_an_ipv6_host_is_served_as_given(engine, caplog):
    """``--host ::1`` failed to start with "the port is taken or ::1 is not an address of this
    machine": gRPC needs an IPv6 address in brackets, which the server now adds itself."""
    with caplog.at_level(logging.INFO), ServerThread(engine, ServerConfig(host="::1", port=0)) as s:
        with ReidClient(f"[::1]:{s.server.port}") as client:
            assert client.embed([_jpeg(1)])[0].ok
    assert any(m.startswith(f"serving reid.v1.ReIdentification on [::1]:{s.server.port} (") for m in caplog.messages)


def test_a_metrics_port_in_use_is_a_startup_error_that_names_it(engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}: .*; choose another --metrics-port"):
            asyncio.run(ReidServer(engine, ServerConfig(port=0, metrics_port=port)).start())


def test_connections_are_closed_after_max_connection_age_so_clients_find_new_replicas(engine):
    """Clients balancing over a headless Service's addresses find replicas added later only when
    they resolve the name again, which gRPC does when a connection closes: with
    ``--max-connection-age-seconds`` the server closes each connection once it is that old (GOAWAY;
    calls in progress finish), and the next call goes over a new one."""
    states = []
    with ServerThread(engine, ServerConfig(port=0, max_connection_age_seconds=1.0)) as s:
        channel = grpc.insecure_channel(s.target)
        channel.subscribe(states.append)
        stub = reid_pb2_grpc.ReIdentificationStub(channel)
        assert stub.Embed(build_request([_jpeg(1)]), timeout=30).results[0].HasField("embedding")
        time.sleep(2.5)  # past the age, and its 10 % jitter
        assert stub.Embed(build_request([_jpeg(2)]), timeout=30).results[0].HasField("embedding")

        def paced():  # a stream open across the age: it is not cut off
            for i in range(6):
                time.sleep(0.5)
                yield build_request([_jpeg(i)])

        assert len([r for r in stub.EmbedStream(paced(), timeout=30) if r.results[0].HasField("embedding")]) == 6
        channel.close()
    ready = [i for i, state in enumerate(states) if state == grpc.ChannelConnectivity.READY]
    assert len(ready) >= 2 and grpc.ChannelConnectivity.IDLE in states[ready[0]:ready[-1]], states


def test_uvloop_asked_for_but_missing_is_one_line(tiny_onnx):
    code = "import sys; sys.modules['uvloop'] = None; from serving.cli import serve_main; raise SystemExit(serve_main())"
    result = subprocess.run([sys.executable, "-c", code, "--model", str(tiny_onnx), "--event-loop", "uvloop"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "reid-serve: error: --event-loop uvloop needs the uvloop package (pip install uvloop); or use --event-loop asyncio"]


def test_startup_with_bad_model_is_one_line(tmp_path):
    import torch

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    checkpoint = tmp_path / "model_epoch_010.pth"  # a training checkpoint given as the model: say how to export it
    torch.save({"model": {"w": torch.zeros(2)}}, checkpoint)
    for path, says in ((bad, "is neither an ONNX model"), (tmp_path / "missing.onnx", "does not exist"),
                       (tmp_path, "is a folder; give the model file in it"),
                       (checkpoint, f"is a PyTorch checkpoint; serving takes an exported model: reid-export --checkpoint "
                                    f"{checkpoint} --onnx {tmp_path / 'model_epoch_010.onnx'}")):
        result = subprocess.run([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                                 "--model", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"reid-serve: error: {path}" if path != tmp_path / "missing.onnx"
                                                       else "reid-serve: error: model file") and says in lines[0], result.stderr


@pytest.mark.parametrize("option", ["--port", "--metrics-port"])
def test_a_taken_port_is_one_line_naming_it(tiny_onnx, option):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", str(port)] if option == "--port" else ["--port", "0", "--metrics-port", str(port)]
        result = subprocess.run([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                                 "--model", str(tiny_onnx), "--no-gallery", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2
    # gRPC's C core logs its own line (E... add_port.cc) before ours; nothing else may follow
    ours = [line for line in result.stderr.splitlines() if not line.startswith("E")]
    assert ours == [line for line in ours if line.startswith("reid-serve: error:")] and len(ours) == 1, result.stderr
    assert f"127.0.0.1:{port}" in ours[0] and f"choose another {option}" in ours[0]


def test_a_failed_warm_up_closes_the_port_and_the_galleries(engine):
    class Store:
        closed = False

        def close(self):
            self.closed = True

    store = Store()
    failing = SlowEngine(engine, delay=0.0, fail_on_call=1)
    server = ReidServer(failing, ServerConfig(port=0, metrics_port=_free_port()), store)

    async def start():
        with pytest.raises(ModelFileError, match="the model failed its warm-up run at batch size 32: injected engine failure"):
            await server.start()

    asyncio.run(start())
    assert store.closed
    for port in (server.port, server.config.metrics_port):  # both free again: nothing left listening
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_committed_stubs_are_current(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_protos import generate

    for path in generate(tmp_path):
        assert path.read_text() == (ROOT / "serving" / "proto" / path.name).read_text(), f"{path.name} is stale: run scripts/gen_protos.py"


def test_cuda_python_results_unwrap_or_name_their_error():
    """cuda-python answers ``(error, value...)``; on a machine without a driver every call gave
    ``(cudaErrorInsufficientDriver, None)``, which must surface by name, not as a None buffer."""
    import enum

    from serving.engines.tensorrt import _check

    class cudaError_t(enum.IntEnum):  # the shape of cuda.bindings.runtime.cudaError_t
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35

    assert _check((cudaError_t.cudaSuccess, 7)) == 7
    assert _check((cudaError_t.cudaSuccess, 1, 2)) == [1, 2]
    with pytest.raises(RuntimeError, match=r"CUDA error 35 \(cudaErrorInsufficientDriver\)"):
        _check((cudaError_t.cudaErrorInsufficientDriver, None))


@pytest.mark.parametrize("each_size", [False, True])
def test_warm_up_runs_every_batch_size_where_the_engine_tunes_per_shape(engine, each_size):
    """A GPU runtime's first run at a new batch size is slow (kernel selection): such an engine is
    run at every size the batcher can form before SERVING; a CPU engine once, at the largest."""
    slow = SlowEngine(engine, delay=0.0)
    slow.warm_each_batch_size = each_size
    with ServerThread(slow, ServerConfig(port=0, max_batch_size=5)):
        warm_calls = list(slow.calls)
    assert warm_calls == ([1, 2, 3, 4, 5] if each_size else [5])


def _graph_model(path: Path, nodes: list, inputs: list, output_shape: list) -> Path:
    """A small ONNX model written with onnx.helper (input names/types/shapes in ``inputs``)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, elem, shape) for name, elem, shape in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, output_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_non_finite_embedding_is_that_images_internal_error(tmp_path):
    """A model giving NaN for some images (an FP16 engine that overflows) used to return the NaN
    vector as an embedding, and an AddToGallery with that image failed with "embeddings must be
    finite", about vectors the caller never sent."""
    from onnx import TensorProto, helper

    from retrieval.gallery import FaissGalleryStore
    from serving.engines import ModelMetadata

    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]), helper.make_node("Log", ["pooled"], ["out"])]
    model = _graph_model(tmp_path / "log.onnx", nodes, [("images", TensorProto.FLOAT, ["n", 3, 64, 32])], ["n", 3, 1, 1])
    engine = OnnxRuntimeEngine(model, fallback=ModelMetadata(64, 32, 0, pixel_mean=[0.5] * 3, pixel_std=[0.25] * 3))

    def png(level: int) -> bytes:  # log of the mean normalized pixel: finite above 127, NaN below
        out = io.BytesIO()
        Image.new("RGB", (32, 64), (level,) * 3).save(out, format="PNG")
        return out.getvalue()

    bright, dark, brighter = png(200), png(20), png(240)
    thread = ServerThread(engine, ServerConfig(port=0))
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    internal = grpc.StatusCode.INTERNAL
    with thread as s, ReidClient(s.target) as client, GalleryClient(s.target) as g:
        outcomes = client.embed([bright, dark, brighter])
        assert [o.ok for o in outcomes] == [True, False, True]
        assert np.isfinite(outcomes[0].embedding).all() and np.isfinite(outcomes[2].embedding).all()
        assert (outcomes[1].error_code, outcomes[1].error) == (
            internal.value[0], "the model gave a non-finite embedding (NaN or inf) for this image")
        assert s.metrics.value("reid_images_total", outcome="model_error") == 1
        assert s.metrics.value("reid_images_total", outcome="ok") >= 2

        g.create("people")
        assert len(g.add("people", images=[bright, brighter])) == 2
        with pytest.raises(grpc.RpcError) as err:
            g.add("people", images=[bright, dark])
        assert err.value.code() == internal and err.value.details().startswith("image 1: the model gave a non-finite")
        results = g.search("people", images=[dark, brighter], top_k=1)
        assert results[0].error.code == internal.value[0] and len(results[1].hits) == 1
        assert g.info("people").size == 2


def test_models_with_another_interface_are_refused_in_one_line_or_adapted(tmp_path):
    """A model of the wrong layout, with two inputs, or whose output is not N x D used to pass loading:
    one gave a traceback at startup, another started and then left every request waiting forever."""
    from onnx import TensorProto, helper

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    nchw = ["n", 3, 64, 32]
    pool = helper.make_node("GlobalAveragePool", ["images"], ["out"])  # N x 3 x 1 x 1: a map left unflattened
    fallback = {"pixel_mean": [0.5] * 3, "pixel_std": [0.25] * 3}
    from serving.engines import ModelMetadata

    meta = ModelMetadata(64, 32, 0, **fallback)
    unflattened = OnnxRuntimeEngine(_graph_model(tmp_path / "pool.onnx", [pool], [("images", f32, nchw)], ["n", 3, 1, 1]),
                                    fallback=meta)
    pixels = np.random.default_rng(0).integers(0, 255, (2, 64, 32, 3), dtype=np.uint8)
    expected = ((pixels / 255.0 - 0.5) / 0.25).mean(axis=(1, 2))
    np.testing.assert_allclose(unflattened.run_pixels(pixels), expected, rtol=1e-4)
    assert unflattened.metadata.embedding_dim == 3
    half = OnnxRuntimeEngine(_graph_model(tmp_path / "half.onnx", [helper.make_node("Cast", ["images"], ["x"], to=f32),
                                                                     helper.make_node("GlobalAveragePool", ["x"], ["out"])],
                                          [("images", f16, nchw)], ["n", 3, 1, 1]), fallback=ModelMetadata(64, 32, 0, **fallback))
    np.testing.assert_allclose(half.run_pixels(pixels), expected, rtol=1e-2)

    rows = _graph_model(tmp_path / "rows.onnx", [helper.make_node("ReduceMean", ["images"], ["out"], axes=[3], keepdims=0)],
                        [("images", f32, nchw)], ["n", 3, 64])
    with pytest.raises(ModelFileError, match=r"returned an output of shape \[2, 3, 64\] for 2 images; expected 2 x 3 embeddings"):
        OnnxRuntimeEngine(rows, fallback=ModelMetadata(64, 32, 0, **fallback)).run_pixels(pixels)
    nhwc = _graph_model(tmp_path / "nhwc.onnx", [helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
                                                 helper.make_node("GlobalAveragePool", ["t"], ["out"])],
                        [("images", f32, ["n", 64, 32, 3])], ["n", 3, 1, 1])
    two = _graph_model(tmp_path / "two.onnx", [helper.make_node("Add", ["a", "b"], ["s"]),
                                               helper.make_node("GlobalAveragePool", ["s"], ["out"])],
                       [("a", f32, nchw), ("b", f32, nchw)], ["n", 3, 1, 1])
    for path, says in ((nhwc, "has shape ['n', 64, 32, 3]; expected N x 3 x H x W (channels first"),
                       (two, "the model has 2 inputs (a, b)"),
                       (rows, "the model returned an output of shape [32, 3, 64] for 32 images")):  # in the warm-up
        result = subprocess.run([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                                 "--model", str(path), "--no-gallery", "--port", "0", "--pixel-mean", "0.5", "0.5", "0.5",
                                 "--pixel-std", "0.25", "0.25", "0.25"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
        assert result.returncode == 2 and len(lines) == 1 and says in lines[0], result.stderr


def test_a_failure_delivering_results_fails_that_batch_only(engine, monkeypatch):
    """An error after inference ended the batcher's worker, and every later request waited forever."""
    from serving import batcher

    real, calls = batcher._Request.deliver, []

    def deliver(self, index, row):
        calls.append(index)
        if len(calls) == 1:
            raise ValueError("injected delivery failure")
        return real(self, index, row)

    monkeypatch.setattr(batcher._Request, "deliver", deliver)
    with ServerThread(engine, ServerConfig(port=0, instances=1)) as s, ReidClient(s.target, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.embed([_jpeg(1)])
        assert err.value.code() == grpc.StatusCode.INTERNAL and "injected delivery failure" in err.value.details()
        assert client.embed([_jpeg(2)])[0].ok


def test_a_tensorrt_engine_where_tensorrt_is_missing_is_one_line(tmp_path):
    """Serving or evaluating a .engine file on a machine without TensorRT ended in ModuleNotFoundError."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from serving.engines import ModelMetadata, open_engine

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    sidecar = tmp_path / "model.engine.json"
    sidecar.write_text('{"metadata": ' + json.dumps(ModelMetadata(256, 128, 512).to_props()) + "}")
    with pytest.raises(ModelFileError, match="model.engine is a TensorRT engine, but tensorrt is not installed here"):
        open_engine(engine)
    sidecar.write_text("{not json")
    with pytest.raises(ModelFileError, match="model.engine.json is not JSON"):
        open_engine(engine)


def test_an_engine_built_for_another_tensorrt_or_gpu_says_how_to_rebuild_it(tmp_path, monkeypatch):
    """TensorRT's deserializer refuses a plan built by another TensorRT version or for another GPU
    model by returning None; the error said only that, not which versions, nor the command.
    Faked TensorRT (none here): its runtime refuses every plan, as it does such an engine."""
    import sys
    import types

    import serving.engines.tensorrt as trt_engine
    from serving.engines import ModelMetadata, open_engine

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return None

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.4.0"
    fake.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    fake.Runtime = Runtime
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_engine, "cuda_runtime", lambda: object())
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    (tmp_path / "model.engine.json").write_text(json.dumps({
        "format": "tensorrt", "tensorrt_version": "10.13.3", "source_onnx": "runs/model.fp16.onnx",
        "profile": {"min": 1, "opt": 16, "max": 64}, "metadata": ModelMetadata(256, 128, 512).to_props()}))
    with pytest.raises(ModelFileError) as err:
        open_engine(engine)
    assert str(err.value) == (f"{engine} does not load with TensorRT 11.4.0 on this GPU (it was built with TensorRT "
                              "10.13.3): an engine runs only with the TensorRT version and GPU model it was built for; "
                              f"rebuild it on this machine: reid-export --onnx runs/model.fp16.onnx --engine {engine}")


def _slow_decoding(monkeypatch, seconds: float) -> list:
    """Make the server's decoding of each image take ``seconds``; returns the list that gets one
    item per image decoded."""
    import serving.preprocessing as preprocessing

    real, decoded = preprocessing.to_rgb, []

    def slow(image, max_pixels):
        time.sleep(seconds)
        decoded.append(1)
        return real(image, max_pixels)

    monkeypatch.setattr(preprocessing, "to_rgb", slow)
    return decoded


def test_a_request_whose_caller_gave_up_is_not_decoded_to_the_end(engine, monkeypatch):
    """Decoding ran on through every image of a request whose deadline had passed."""
    decoded = _slow_decoding(monkeypatch, 0.3)  # large images
    with ServerThread(engine, ServerConfig(port=0, workers=1)) as s:
        stub = reid_pb2_grpc.ReIdentificationStub(grpc.insecure_channel(s.target))
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(build_request([_jpeg(i) for i in range(10)]), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(3.5)  # all ten would be decoded by now
        assert len(decoded) <= 4  # the one in hand when the caller went finishes; no more start
        assert s.metrics.value("reid_images_inferred_total") == 0


def test_a_cancelled_stream_stops_the_work_of_the_requests_it_had_sent(engine, monkeypatch):
    """Requests a stream had sent but not yet been answered for went on decoding and embedding after
    the caller cancelled the stream."""
    decoded = _slow_decoding(monkeypatch, 0.2)
    with ServerThread(engine, ServerConfig(port=0, workers=1)) as s:
        stub = reid_pb2_grpc.ReIdentificationStub(grpc.insecure_channel(s.target))
        call = stub.EmbedStream(iter([build_request([_jpeg(i)], request_id=str(i)) for i in range(10)]), timeout=30)
        assert next(call).request_id == "0"
        call.cancel()
        time.sleep(2.5)  # all ten would be decoded by now
        assert len(decoded) <= 4  # the first, and those in hand when the stream ended (a loaded machine: one more)
        assert s.metrics.value("reid_images_inferred_total") <= 4


def test_the_health_probe_waits_for_a_server_that_comes_up(engine):
    """``python -m serving.healthcheck --wait`` is how scripts wait for a starting server: it keeps
    asking until SERVING, and gives up (exit 1) once its time is out."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.healthcheck import main as probe

    target = f"127.0.0.1:{_free_port()}"
    assert probe([target]) == 1  # nothing there, no waiting
    start = time.monotonic()
    assert probe([target, "--wait", "1"]) == 1 and time.monotonic() - start >= 1
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(probe, [target, "--wait", "60"])
        time.sleep(1.0)
        assert not waiting.done()
        with ServerThread(engine, ServerConfig(port=int(target.rsplit(":", 1)[1]))):
            assert waiting.result(timeout=60) == 0


def test_an_engine_that_keeps_failing_turns_health_not_serving_until_it_works_again(engine, caplog):
    """Health said SERVING while every batch failed (a lost GPU context), so balancers kept sending
    traffic to the broken replica and orchestrators never replaced it."""
    from serving.healthcheck import is_serving

    class Breakable(SlowEngine):
        broken = False

        def _run(self, batch):
            if self.broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super()._run(batch)

    flaky = Breakable(engine, delay=0.0)
    config = ServerConfig(port=0, unhealthy_after_failures=2, engine_probe_seconds=0.2)
    with ServerThread(flaky, config) as s, ReidClient(s.target, retries=0) as client:
        assert is_serving(s.target)
        flaky.broken = True
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                client.embed([_jpeg(1)])
            assert err.value.code() == grpc.StatusCode.INTERNAL
        end = time.monotonic() + 5
        while is_serving(s.target) and time.monotonic() < end:
            time.sleep(0.05)
        assert not is_serving(s.target)
        assert "failed 2 batches in a row (last: CUDA error: an illegal memory access" in caplog.text
        # the first failure of the streak is logged too (a lone failure left no line), the second not
        assert caplog.text.count("an engine batch failed: CUDA error: an illegal memory access") == 1
        end = time.monotonic() + 5
        while "engine probe failed" not in caplog.text and time.monotonic() < end:  # a probe every 0.2 s
            time.sleep(0.05)
        assert "engine probe failed: CUDA error" in caplog.text and not is_serving(s.target)  # still broken
        flaky.broken = False
        end = time.monotonic() + 5
        while not is_serving(s.target) and time.monotonic() < end:
            time.sleep(0.05)
        assert is_serving(s.target)  # a probe worked
        assert client.embed([_jpeg(1)])[0].ok


def test_a_usage_error_is_not_buried_under_every_option(capsys):
    """argparse prints its usage above an error; reid-serve's own would be 30 lines of options."""
    from serving.cli import parse_serve_args

    with pytest.raises(SystemExit):
        parse_serve_args(["--model", "m.onnx", "--port", "abc"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["usage: reid-serve --model PATH [--config FILE] [options]  (all options: reid-serve --help)",
                   "reid-serve: error: argument --port: invalid int value: 'abc'"]
