"""ONNX Runtime engine: CUDA execution provider when available, else CPU."""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from retrieval.cpu_quota import usable_cores
from serving.engines.base import Engine, ModelFileError, ModelMetadata, NoPreprocessingMetadata, first_line

log = logging.getLogger(__name__)

# ONNX Runtime's highest graph optimization level (its default) also moves convolutions into its
# blocked NCHWc layout. Whether that pays depends on the model and the CPU: on one 2-core VM
# (1 thread, batch 8) OSNet-x0.25 ran at 94 img/s with it and 152 without (EXTENDED), ResNet-50 at
# 22.8 against 16.4, Swin-Tiny the same either way. A CPU session therefore times both levels at
# load, one image at a time, and keeps the faster; the other must be this much faster to be chosen.
OPTIMIZATION_MARGIN = 1.1
OPTIMIZATION_ROUNDS = 3
GRAPH_OPTIMIZATIONS = ("auto", "all", "extended")


def metadata_from_graph(session, fallback: ModelMetadata | None) -> ModelMetadata:
    """Metadata for an ONNX file from another tool: sizes from the graph, preprocessing from the caller."""
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    height, width = inp.shape[2], inp.shape[3]
    # N x D, or N x D x 1 x 1 (see Engine._embeddings); 0 = dynamic, taken from the first run
    dim = out.shape[1] if len(out.shape) >= 2 and isinstance(out.shape[1], int) else 0
    if fallback is None or not fallback.pixel_mean:
        raise NoPreprocessingMetadata(
            "the model carries no reid preprocessing metadata; give its pixel mean/std "
            "(e.g. --pixel-mean 0.485 0.456 0.406 --pixel-std 0.229 0.224 0.225)"
        )
    if not isinstance(height, int) or not isinstance(width, int):
        if not (fallback.input_height and fallback.input_width):  # a guessed size embeds every crop wrongly
            raise NoPreprocessingMetadata(
                f"the model's input size is dynamic ({height} x {width}) and it carries no reid metadata; "
                "give the size it was trained at (e.g. --input-size 256 128)")
        height, width = fallback.input_height, fallback.input_width
    return ModelMetadata(
        input_height=height, input_width=width, embedding_dim=dim or fallback.embedding_dim,
        output_normalized=fallback.output_normalized, pixel_mean=list(fallback.pixel_mean),
        pixel_std=list(fallback.pixel_std), input_name=inp.name, output_name=out.name,
    )


def check_interface(session) -> None:
    """One float image input, N x 3 x H x W: what every engine is fed. Anything else would pass
    loading and fail at the first run with ONNX Runtime's own message (or a traceback at startup)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelFileError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "serving feeds one N x 3 x H x W image input")
    inp = inputs[0]
    if inp.type not in ("tensor(float)", "tensor(float16)"):
        raise ModelFileError(f"model input {inp.name!r} is {inp.type}; serving feeds float images")
    if len(inp.shape) != 4 or (isinstance(inp.shape[1], int) and inp.shape[1] != 3):
        raise ModelFileError(f"model input {inp.name!r} has shape {inp.shape}; expected N x 3 x H x W "
                             "(channels first, RGB)")


@functools.cache
def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` pip packages before a CUDA session starts.

    ``pip install "onnxruntime-gpu[cuda,cudnn]"`` puts them in site-packages, where the dynamic loader
    does not look, so without this the CUDA provider fails on ``libcublasLt.so.13`` unless
    LD_LIBRARY_PATH names every ``nvidia/*/lib`` folder. ``onnxruntime.preload_dlls`` (1.21+) loads
    them by path, then falls back to the default search (system CUDA, as in NVIDIA's containers);
    on a CPU-only build it does nothing. It reports failures with ``print``: returned here, to be
    logged and shown if the provider then fails to start.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            preload()
        except Exception as exc:  # a broken install must not stop a CPU fallback
            print(f"preload_dlls failed: {exc}")
    report = " ".join(out.getvalue().split())
    if report:
        log.debug("onnxruntime.preload_dlls: %s", report)
    return report


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime session, sized for ``instances`` concurrent runs: the CPU cores are divided among them.

    ``instances=0`` picks 2 on a CPU (1 with CUDA): on 2 cores, two single-threaded runs of
    OSNet-x0.25 or Swin-Tiny outpace one run on 2 threads by 10-15 % and lose less when decoding
    preempts them (docs/performance.md). reid-serve asks for that; a single caller keeps 1.
    """

    name = "onnxruntime"
    thread_safe_run = True  # InferenceSession.run may be called concurrently

    def __init__(self, path: str | Path, device: str = "auto", intra_op_threads: int = 0,
                 fallback: ModelMetadata | None = None, max_batch_size: int = 64, instances: int = 1,
                 graph_optimization: str = "auto"):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist")
        if instances < 0 or intra_op_threads < 0:
            raise ValueError("instances and intra-op threads must not be negative (0 = automatic)")
        if graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise ValueError(f"graph optimization {graph_optimization!r} is not one of {', '.join(GRAPH_OPTIMIZATIONS)}")
        available = ort.get_available_providers()
        providers: list = ["CPUExecutionProvider"]
        preload_report = ""
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            # cuDNN's exhaustive algorithm search (the default) benchmarks every convolution at each
            # new input shape, 0.3-1.3 s per shape (PaddleX PR 5057, onnxruntime issue 6978), and the
            # batcher makes every batch size from 1 to the maximum; the heuristic pick costs
            # milliseconds and ran as fast in that measurement.
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
            preload_report = preload_cuda_libraries()
        elif device == "cuda":
            raise ModelFileError("device cuda asked for, but onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        wants_cuda = len(providers) > 1
        cores, quota_bound = usable_cores()
        self.instances = instances or (1 if wants_cuda else min(2, cores))
        options = ort.SessionOptions()
        # 0 lets ONNX Runtime use every core, which is right for one instance only, and only where
        # no CPU quota allows fewer (ONNX Runtime counts the host's cores, not the quota).
        options.intra_op_num_threads = intra_op_threads or (
            max(1, cores // self.instances) if self.instances > 1 or quota_bound else 0)
        if quota_bound and not intra_op_threads:
            log.info("a CPU quota allows %d core(s): ONNX Runtime runs %d thread(s) per instance, %d instance(s)",
                     cores, options.intra_op_num_threads, self.instances)
        if graph_optimization == "extended":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFileError(f"{path} is not a loadable ONNX model: {first_line(exc)}") from None
        self.providers = self.session.get_providers()
        self.warm_each_batch_size = self.providers[0] == "CUDAExecutionProvider"
        if wants_cuda and "CUDAExecutionProvider" not in self.providers:
            # ONNX Runtime falls back to the CPU when the CUDA provider cannot start (a missing CUDA or
            # cuDNN library, or no GPU driver): a user who asked for the GPU must hear it, not get CPU speed silently.
            hint = f"; loading the CUDA libraries said: {preload_report}" if preload_report else ""
            if device == "cuda":
                raise ModelFileError("device cuda asked for, but ONNX Runtime's CUDA provider did not start "
                                     f"(ONNX Runtime's own log above names the missing library{hint})")
            log.warning("ONNX Runtime's CUDA provider did not start; %s runs on the CPU%s", path.name, hint)
        check_interface(self.session)
        self.graph_optimization = "extended" if graph_optimization == "extended" else "all"
        if graph_optimization == "auto" and self.providers[0] == "CPUExecutionProvider":
            self._choose_optimization(ort, path, options)
        self._half_input = self.session.get_inputs()[0].type == "tensor(float16)"
        props = self.session.get_modelmeta().custom_metadata_map
        own = ModelMetadata.from_props(props)
        self.uses_fallback = own is None
        self.metadata = own or metadata_from_graph(self.session, fallback)
        self._identify(path)
        self.metadata.input_name = self.session.get_inputs()[0].name
        self.metadata.output_name = self.session.get_outputs()[0].name
        batch_dim = self.session.get_inputs()[0].shape[0]
        self._static_batch = isinstance(batch_dim, int) and batch_dim > 0
        self.max_batch_size = batch_dim if self._static_batch else max_batch_size

    def _choose_optimization(self, ort, path: Path, options) -> None:
        """Keep whichever of ONNX Runtime's ALL and EXTENDED optimization levels runs this model
        faster here (see OPTIMIZATION_MARGIN): a few runs of one image on each, at load. A graph
        whose input size is unknown, or that fails on the trial input, keeps ALL: the warm-up then
        reports what is wrong with it."""
        inp = self.session.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        if shape[0] is None:
            shape[0] = 1
        if len(shape) != 4 or None in shape:
            return
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        feed = {inp.name: np.random.default_rng(0).random(shape).astype(dtype)}
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            sessions = {"all": self.session,
                        "extended": ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])}
            seconds = self._timed(sessions, feed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the warm-up reports them
            log.debug("%s: kept graph optimization all (trying extended failed: %s)", path.name, exc)
            return
        if seconds["extended"] * OPTIMIZATION_MARGIN < seconds["all"]:
            self.session, self.graph_optimization = sessions["extended"], "extended"
        log.debug("%s: ONNX Runtime graph optimization %s (a run of %s took %.1f ms with all, %.1f ms with extended)",
                  path.name, self.graph_optimization, "x".join(map(str, shape)), 1000 * seconds["all"],
                  1000 * seconds["extended"])

    @staticmethod
    def _timed(sessions: dict, feed: dict) -> dict[str, float]:
        """Each session's median time for one run of ``feed``, the sessions taking turns (so that
        a busy moment of a shared machine falls on both), after one untimed run each (the first
        run allocates)."""
        for session in sessions.values():
            session.run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(OPTIMIZATION_ROUNDS):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in times.items()}

    @property
    def label(self) -> str:
        where = "CUDA" if self.providers[0] == "CUDAExecutionProvider" else "CPU"
        return f"{self.name} on {where}, graph optimization {self.graph_optimization}"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._half_input:  # a graph converted to FP16 with its inputs too
            batch = batch.astype(np.float16)
        if self._static_batch and len(batch) < self.max_batch_size:  # a fixed-batch graph: pad, then trim
            pad = np.zeros((self.max_batch_size - len(batch), *batch.shape[1:]), dtype=batch.dtype)
            return self.session.run([self.metadata.output_name], {self.metadata.input_name: np.concatenate([batch, pad])})[0][: len(batch)]
        return self.session.run([self.metadata.output_name], {self.metadata.input_name: batch})[0]
