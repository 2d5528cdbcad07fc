"""The client library's retries, against a real gRPC server whose answers the test scripts: calls
that change nothing are sent again after RESOURCE_EXHAUSTED or UNAVAILABLE, writes never."""
from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.client import AsyncGalleryClient, AsyncReidClient, GalleryClient, ReidClient
from serving.proto import reid_pb2, reid_pb2_grpc


class Scripted(reid_pb2_grpc.ReIdentificationServicer):
    """Fails each method's first ``failures`` calls with ``code``, then answers."""

    def __init__(self, failures: int, code: grpc.StatusCode):
        self.failures, self.code, self.calls = failures, code, Counter()

    def _answer(self, method: str, context, response):
        self.calls[method] += 1
        if self.calls[method] <= self.failures:
            context.abort(self.code, f"scripted failure {self.calls[method]}")
        return response

    def Embed(self, request, context):
        return self._answer("Embed", context, reid_pb2.EmbedResponse(dimension=4))

    def Search(self, request, context):
        return self._answer("Search", context, reid_pb2.SearchResponse(results=[reid_pb2.SearchResult()]))

    def AddToGallery(self, request, context):
        return self._answer("AddToGallery", context, reid_pb2.AddToGalleryResponse(ids=[1]))


@pytest.fixture
def scripted(request):
    failures, code = request.param
    servicer = Scripted(failures, code)
    server = grpc.server(ThreadPoolExecutor(4))
    reid_pb2_grpc.add_ReIdentificationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("scripted", [(2, grpc.StatusCode.RESOURCE_EXHAUSTED), (2, grpc.StatusCode.UNAVAILABLE)], indirect=True)
def test_reads_are_retried_until_they_succeed(scripted):
    servicer, target = scripted
    with ReidClient(target) as c, GalleryClient(target) as g:
        assert c.embed_response([]).dimension == 4
        assert len(g.search("g", embeddings=np.ones((1, 4)))) == 1
    assert servicer.calls == {"Embed": 3, "Search": 3}


@pytest.mark.parametrize("scripted", [(1, grpc.StatusCode.UNAVAILABLE)], indirect=True)
def test_writes_are_not_retried(scripted):
    servicer, target = scripted
    with GalleryClient(target) as g, pytest.raises(grpc.RpcError) as err:
        g.add("g", embeddings=np.ones((1, 4)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == {"AddToGallery": 1}


@pytest.mark.parametrize("scripted", [(5, grpc.StatusCode.RESOURCE_EXHAUSTED)], indirect=True)
def test_retries_are_bounded_and_can_be_turned_off(scripted):
    servicer, target = scripted
    with ReidClient(target, retries=1) as c, pytest.raises(grpc.RpcError) as err:
        c.embed([])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and servicer.calls["Embed"] == 2
    with ReidClient(target, retries=0) as c, pytest.raises(grpc.RpcError):
        c.embed([])
    assert servicer.calls["Embed"] == 3

    async def once_more():
        async with AsyncReidClient(target, retries=2) as c:
            return await c.embed([])

    assert asyncio.run(once_more()) == [] and servicer.calls["Embed"] == 6  # failures 4 and 5, then the answer
    with pytest.raises(ValueError, match="retries must be within 0..4"):
        ReidClient(target, retries=5)


@pytest.mark.parametrize("scripted", [(1, grpc.StatusCode.INVALID_ARGUMENT)], indirect=True)
def test_other_failures_are_not_retried(scripted):
    servicer, target = scripted
    with ReidClient(target) as c, pytest.raises(grpc.RpcError) as err:
        c.embed([])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and servicer.calls["Embed"] == 1


@pytest.mark.parametrize("retries", [2, 0])
def test_calls_are_spread_over_every_address_the_target_names(retries):
    """A target naming several servers (a Kubernetes headless Service's DNS name, or
    ``ipv4:HOST:PORT,HOST:PORT``) sent every call to the first that answered: gRPC's default policy
    is pick_first. The clients balance call by call (round_robin), as deployment.md advises."""
    servicers, servers, ports = [], [], []
    for _ in range(2):
        servicers.append(Scripted(0, grpc.StatusCode.OK))
        servers.append(grpc.server(ThreadPoolExecutor(2)))
        reid_pb2_grpc.add_ReIdentificationServicer_to_server(servicers[-1], servers[-1])
        ports.append(servers[-1].add_insecure_port("127.0.0.1:0"))
        servers[-1].start()
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        with ReidClient(target, retries=retries) as c:
            for _ in range(20):
                assert c.embed_response([]).dimension == 4
        # every server takes its share (the first calls may go where a connection is ready first)
        assert min(s.calls["Embed"] for s in servicers) >= 5 and sum(s.calls["Embed"] for s in servicers) == 20

        async def gallery_calls():
            async with AsyncGalleryClient(target, retries=retries) as g:
                for _ in range(10):
                    await g.search("g", embeddings=np.ones((1, 4)))

        asyncio.run(gallery_calls())
        assert min(s.calls["Search"] for s in servicers) >= 2 and sum(s.calls["Search"] for s in servicers) == 10
    finally:
        for server in servers:
            server.stop(0)
