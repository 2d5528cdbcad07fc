"""Shared load generation for the serving benchmarks: a reid-serve subprocess on loopback and
asyncio clients that each loop on Embed calls for a bounded time."""
from __future__ import annotations

import asyncio
import io
import random
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.client import AsyncReidClient, build_request  # noqa: E402
from serving.healthcheck import wait_serving  # noqa: E402


def _jpeg(pixels: np.ndarray) -> bytes:
    """H x W x 3 uint8 RGB as a quality-85 JPEG, the encoding every generated test image uses."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def crops(n: int, size=(64, 128), seed: int = 0) -> list[bytes]:
    """JPEG person-crop-sized test images."""
    rng = np.random.default_rng(seed)
    return [_jpeg(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def frame_with_boxes(n: int, size=(1920, 1080), box=(128, 256)) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """A JPEG video frame (smooth gradients plus mild noise, quality 85: about 195 KB at 1080p) and
    ``n`` person-sized boxes in it, side by side in rows, for callers that send frames to be
    cropped on the server."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 / w, y * 255 / h, (x + y) % 256], -1)
    pixels = np.clip(pixels + np.random.default_rng(0).normal(0, 3, pixels.shape), 0, 255).astype(np.uint8)
    per_row = w // box[0]
    boxes = [((i % per_row) * box[0], (i // per_row % (h // box[1])) * box[1]) for i in range(n)]
    return _jpeg(pixels), [(x1, y1, x1 + box[0], y1 + box[1]) for x1, y1 in boxes]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # what the server decodes


def load_images(folder: str | Path, limit: int = 1024) -> list[bytes]:
    """Encoded images (JPEG, PNG, BMP, WebP) from ``folder``, sorted by name, at most ``limit``: real
    crops to send instead of the synthetic ones. Synthetic crops are noise, the costliest content
    for a JPEG decoder per pixel; real crops differ in size and content, so both are worth a run."""
    files = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    return [f.read_bytes() for f in files[:limit]]


def as_raw(pool: list[bytes]) -> list[np.ndarray]:
    """The same images decoded once, here, to H x W x 3 uint8 RGB: sent as raw pixels, they cost the
    server no decoding (what a pipeline that already holds decoded frames can send)."""
    return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pool]


def start_server(model: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start reid-serve on a free loopback port; returns (process, target) once it is SERVING."""
    proc = subprocess.Popen([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                             "--model", str(Path(model).resolve()), "--port", "0", "--no-gallery", *extra], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"reid-serve exited with {proc.returncode}")
        if " on 127.0.0.1:" in line:
            target = f"127.0.0.1:{int(line.split('127.0.0.1:')[1].split()[0])}"
            if wait_serving(target, 60):
                return proc, target
    proc.kill()
    raise RuntimeError("reid-serve did not come up")


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(timeout=60)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


STAGES = ("inference", "preprocess", "gallery")
GRPC_THREADS = ("event_engine", "grpc", "lifeguard")


def cpu_by_stage(pid: int) -> Counter:
    """CPU seconds used so far by each stage of a reid-serve process (Linux /proc).

    Its pools name their OS threads after their stage (serving/threads.py); the main thread runs
    the event loop (gRPC's Python side, batching, responses); "grpc" is gRPC's C threads; "runtime"
    is every unnamed thread, on a CPU ONNX Runtime's own pool when one run uses several threads
    (with 1 instance), whose share of inference work (and spinning) shows up there.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    out: Counter = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        if int(tid) == pid:
            stage = "loop"
        else:
            stage = next((s for s in STAGES if name.startswith(s)), "grpc" if name.startswith(GRPC_THREADS) else "runtime")
        out[stage] += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return out


def idle_cores_seconds() -> float:
    """Core-seconds the whole machine has spent idle so far (Linux /proc/stat: idle + iowait)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def _outcome(response) -> str:
    """OK when every image of the answer has an embedding, else ERROR (an image was refused)."""
    return "OK" if all(r.WhichOneof("result") == "embedding" for r in response.results) else "ERROR"


async def _stream_client(target: str, request, stop_at: float, lat: list, codes: Counter) -> None:
    """One EmbedStream per client, one request in flight on it (send, wait for the answer, repeat)."""
    async with AsyncReidClient(target, retries=0) as client:  # every answer counted as the server gave it
        call = client.stub.EmbedStream()
        while time.monotonic() < stop_at:
            start = time.monotonic()
            await call.write(request)
            response = await call.read()
            codes[_outcome(response)] += 1
            lat.append(time.monotonic() - start)
        await call.done_writing()


async def _client(target: str, request, stop_at: float, timeout: float, lat: list, codes: Counter) -> None:
    """Unary Embed calls in a loop. The request is built once and answers are not unpacked into
    arrays: the load generator shares the server's cores and should take as little as it can."""
    backoff = 0.01
    async with AsyncReidClient(target, retries=0) as client:  # every answer counted as the server gave it
        while time.monotonic() < stop_at:
            start = time.monotonic()
            try:
                response = await client.stub.Embed(request, timeout=timeout)
                lat.append(time.monotonic() - start)
                codes[_outcome(response)] += 1
                backoff = 0.01
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # exponential backoff with jitter, as the docs advise clients to do
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 1.0)


def run_load(target: str, clients: int, crops_per_request: int, seconds: float, timeout: float = 30.0,
             stream: bool = False, server_pid: int | None = None, pool: list[bytes] | None = None,
             raw: bool = False, frame: bool = False) -> dict:
    """``clients`` concurrent callers for ``seconds`` (unary Embed calls, or one EmbedStream each with
    ``stream``); images/s counts successful images only. Every call sends the same synthetic crops,
    or, with ``pool`` (``load_images``), each client its own ``crops_per_request`` images from it;
    with ``raw``, as raw RGB pixels instead of encoded bytes; with ``frame``, as that many boxes in
    one 1920x1080 JPEG frame (``frame_with_boxes``), cropped by the server.
    With ``server_pid`` the result also says how many cores each server stage and the load
    generator itself used meanwhile; "idle" is the whole machine's unused cores."""
    if frame:
        data, boxes = frame_with_boxes(crops_per_request)
        shared = build_request(frame=data, boxes=boxes)
        requests = [shared] * clients
    else:
        pool = pool or crops(crops_per_request)  # synthetic: every client gets the same crops
        if raw:
            pool = as_raw(pool)
        requests = [build_request([pool[(i * crops_per_request + j) % len(pool)] for j in range(crops_per_request)])
                    for i in range(clients)]

    lat: list[float] = []
    codes: Counter = Counter()

    async def main():
        stop_at = time.monotonic() + seconds
        if stream:
            await asyncio.gather(*(_stream_client(target, r, stop_at, lat, codes) for r in requests))
        else:
            await asyncio.gather(*(_client(target, r, stop_at, timeout, lat, codes) for r in requests))

    server_before = cpu_by_stage(server_pid) if server_pid else Counter()
    idle_before = idle_cores_seconds()
    client_before = time.process_time()
    start = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - start
    client_cpu = time.process_time() - client_before
    idle = idle_cores_seconds() - idle_before
    server_cpu = cpu_by_stage(server_pid) - server_before if server_pid else Counter()
    pct = np.percentile(lat, [50, 95, 99]) * 1000 if lat else [float("nan")] * 3
    return {"clients": clients, "crops": crops_per_request, "stream": stream, "images_per_s": codes["OK"] * crops_per_request / elapsed,
            "p50_ms": pct[0], "p95_ms": pct[1], "p99_ms": pct[2], "codes": dict(codes),
            "cores": {**{k: v / elapsed for k, v in server_cpu.items()}, "client": client_cpu / elapsed,
                      "idle": idle / elapsed}}


def fmt(r: dict) -> str:
    errors = {k: v for k, v in r["codes"].items() if k != "OK"}
    return (f"{r['clients']:3d} {'streams' if r.get('stream') else 'clients'} x {r['crops']} crops: {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:7.1f} ms  "
            f"p95 {r['p95_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  ok {r['codes'].get('OK', 0)}"
            + (f"  errors {errors}" if errors else "")
            + "  cores: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cores"].items(), key=lambda kv: -kv[1])))
