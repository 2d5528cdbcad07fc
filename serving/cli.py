"""``reid-serve``: options, config file and startup of the gRPC server (``reid-client`` is in ``client_cli``)."""
from __future__ import annotations

import serving.grpc_logs  # noqa: F401  first: sets gRPC's log level before gRPC is imported

import argparse
import importlib.metadata
import asyncio
import dataclasses
import difflib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Coroutine

import prometheus_client

from retrieval.gallery import FaissGalleryStore, GalleryError
from retrieval.gallery.milvus_store import CONSISTENCY_LEVELS
from serving.engines import ModelFileError, ModelMetadata, check_pixel_flags, open_engine, warn_if_wide
from serving.engines.onnxruntime import GRAPH_OPTIMIZATIONS
from serving.security import SecurityError, env_tokens, read_tokens_file
from serving.server import ServerConfig, serve_forever
from serving.service import Limits
from serving.strict_yaml import YamlFileError, load_yaml_file

log = logging.getLogger(__name__)


def serve_parser() -> argparse.ArgumentParser:
    # argparse's generated usage lists all 40 options, 30 lines printed above every one-line error
    p = argparse.ArgumentParser(prog="reid-serve", description="Serve ReID embeddings over gRPC with dynamic batching.",
                                usage="%(prog)s --model PATH [--config FILE] [options]  (all options: %(prog)s --help)")
    p.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('reid')}")
    model = p.add_argument_group("the model and its engine")
    model.add_argument("--model", help="ONNX file or TensorRT engine (with its .json sidecar); required, here or in --config")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider")
    model.add_argument("--instances", type=int,
                       help="engine runs in flight at once (default: 2 for ONNX Runtime on a CPU, else 1)")
    model.add_argument("--intra-op-threads", type=int, default=0,
                       help="ONNX Runtime threads per run (default: the CPU cores divided among the instances)")
    model.add_argument("--graph-optimization", choices=GRAPH_OPTIMIZATIONS, default="auto",
                       help="ONNX Runtime graph optimization level; auto (CPU): time all and extended at load, keep the faster")
    model.add_argument("--model-id", help="the model's id, recorded in the galleries it fills and checked against them "
                       "(default: the training checkpoint's hash from the model's metadata, else the model file's hash)")
    model.add_argument("--pixel-mean", type=float, nargs=3, help="preprocessing for a model without reid metadata")
    model.add_argument("--pixel-std", type=float, nargs=3, help="preprocessing for a model without reid metadata")
    model.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                       help="input size when the graph's is dynamic (needed then: no size is guessed)")
    net = p.add_argument_group("network and process")
    net.add_argument("--config", type=Path,
                     help="YAML file with any of these options (dashes or underscores; the command line wins)")
    net.add_argument("--host", help="bind address (default 127.0.0.1)")
    net.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    net.add_argument("--reuse-port", action="store_true",
                     help="let servers share the port (SO_REUSEPORT: the kernel spreads connections among them), e.g. "
                          "to start a new server beside the old one; without it a port in use is an error")
    net.add_argument("--metrics-port", type=int, help="Prometheus metrics HTTP port (default: off)")
    net.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                     help="auto: uvloop when installed (less CPU per call), else asyncio's own loop")
    net.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one JSON object per line")
    batch = p.add_argument_group("batching and limits")
    batch.add_argument("--max-batch-size", type=int, help="images per engine call (default 32)")
    batch.add_argument("--max-queue-delay-ms", type=float, help="longest wait for a fuller batch (default 0: take what is queued)")
    batch.add_argument("--split-batch-ms", type=float,
                       help="with several instances, a full batch that would run longer than this is shared fairly "
                            "among them, so callers wait for batches of equal length (default 250)")
    batch.add_argument("--queue-capacity", type=int, help="images that may wait; beyond it calls fail with RESOURCE_EXHAUSTED (default 1024)")
    batch.add_argument("--workers", type=int, help="preprocessing threads (default 2)")
    batch.add_argument("--no-batching", action="store_true", help="run each request on its own (for comparison)")
    batch.add_argument("--max-images-per-request", type=int, help="default 256")
    batch.add_argument("--max-image-pixels", type=int, help="largest decoded image, width x height (default 16M)")
    batch.add_argument("--max-message-bytes", type=int, help="largest gRPC message (default 64 MiB)")
    batch.add_argument("--unhealthy-after-failures", type=int,
                       help="engine failures in a row that turn health NOT_SERVING until a batch works again "
                            "(default 3; 0 = never)")
    batch.add_argument("--min-client-ping-seconds", type=float,
                       help="shortest interval between a client's keepalive pings that is accepted; closer pings end "
                            "the connection with GOAWAY too_many_pings (default 10)")
    batch.add_argument("--max-connection-age-seconds", type=float,
                       help="close each client connection once it is this old (calls on it finish), so that clients "
                            "balancing over a name's addresses find replicas added since (default: never)")
    gallery = p.add_argument_group("galleries")
    gallery.add_argument("--gallery-dir", type=Path, default=Path("galleries"),
                         help="where FAISS galleries live (snapshots + write-ahead logs); default ./galleries")
    gallery.add_argument("--no-gallery", action="store_true", help="serve embeddings only")
    gallery.add_argument("--gallery-backend", choices=["faiss", "milvus"], default="faiss",
                         help="faiss: in-process galleries under --gallery-dir; milvus: collections in --milvus-uri")
    gallery.add_argument("--gallery-threads", type=int,
                         help="gallery calls run at once (default 4); searches of one FAISS gallery run side by side")
    gallery.add_argument("--gallery-queue-capacity", type=int,
                         help="gallery calls that may wait for or run on those threads; beyond it calls fail with "
                              "RESOURCE_EXHAUSTED (default 256)")
    gallery.add_argument("--milvus-uri", help="Milvus Lite file path, or http(s)://host:port of a Milvus server/cluster")
    gallery.add_argument("--milvus-token", help="Milvus token ('user:password' or an API key); or set MILVUS_TOKEN")
    gallery.add_argument("--milvus-ca", help="CA (PEM) to verify a Milvus server over TLS")
    gallery.add_argument("--milvus-consistency", choices=list(CONSISTENCY_LEVELS), default="strong",
                         help="what searches see: strong (default) every acknowledged add of any replica, about 300 ms per "
                              "search on a Milvus server; bounded: at once, possibly missing other replicas' last seconds")
    security = p.add_argument_group("security")
    security.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key enables TLS. The TLS files are "
                          "read again when they change")
    security.add_argument("--tls-key", help="server private key (PEM)")
    security.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to: mutual TLS")
    security.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address (logs a warning)")
    security.add_argument("--tokens-file", help="bearer tokens, one 'TOKEN read|write' per line; read again when "
                          "the file changes")
    security.add_argument("--tokens-env", help="environment variable holding 'TOKEN:read|write,...'")
    return p


class JsonFormatter(logging.Formatter):
    """Structured logs for collectors: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _from_config(action: argparse.Action, value, name: str):
    """A config file's value for an option, checked and converted as the command line's would be.

    Values went to the option unchecked: ``insecure: "false"`` (a string, so true) allowed plaintext
    beyond localhost, and ``pixel_mean: 0.5`` ended the start in a traceback.
    """
    if action.nargs == 0:  # a flag: --insecure, --no-gallery, --no-batching
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    if isinstance(action.nargs, int):  # --pixel-mean R G B, --input-size H W
        if not isinstance(value, list) or len(value) != action.nargs:
            raise ValueError(f"{name} must be a list of {action.nargs} values, not {value!r}")
        return [_config_scalar(action, v, name) for v in value]
    return _config_scalar(action, value, name)


def _config_scalar(action: argparse.Action, value, name: str):
    kind = {int: "a whole number", float: "a number"}.get(action.type, "a single value")
    if isinstance(value, (bool, list, dict)) or value is None:  # YAML's yes/no, lists and mappings are no option's value
        raise ValueError(f"{name} must be {kind}, not {value!r}")
    try:
        converted = action.type(str(value)) if action.type else str(value)  # int("8.5") fails, as --port 8.5 does
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{name} must be {kind}, not {value!r}") from None
    if action.choices and converted not in action.choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return converted


def parse_serve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line over ``--config``: any option may sit in the file, and what the file holds
    beyond the options (``grace_seconds``, ...) stays in ``args.config_values`` for ``build_config``."""
    parser = serve_parser()
    args = parser.parse_args(argv)
    values: dict = {}
    if args.config:
        try:
            loaded = load_yaml_file(args.config) or {}
        except OSError as exc:
            parser.error(f"cannot read --config {args.config}: {exc.strerror or exc}")
        except YamlFileError as exc:
            parser.error(f"--config {args.config} {exc}")
        if not isinstance(loaded, dict):
            parser.error(f"--config {args.config} must hold a mapping of option: value")
        values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        try:
            options = {key: _from_config(actions[key], value, f"{key} in {args.config}")
                       for key, value in values.items() if key in actions}
        except ValueError as exc:
            parser.error(str(exc))
        parser.set_defaults(**options)
        args = parser.parse_args(argv)
        args.config_paths = {k: v for k, v in values.items() if k in PATH_OPTIONS and isinstance(v, str)}
        values = {k: v for k, v in values.items() if k not in actions}
    if not args.model:
        parser.error("--model is required (on the command line or in --config)")
    args.config_values = values
    return args


# Options that name files or folders. In a --config file, as on the command line, a relative one is
# taken from the working directory.
PATH_OPTIONS = ("model", "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "milvus_ca", "gallery_dir")


def config_folder_hint(args: argparse.Namespace) -> str:
    """For a start that failed: the --config file's relative paths that do not exist from the
    working directory but do beside the file, the likely cause (a config file and its model kept
    together, the server started elsewhere)."""
    if not args.config:
        return ""
    folder = Path(args.config).parent
    misplaced = [f"{key}: {value}" for key, value in args.config_paths.items()
                 if not Path(value).is_absolute() and not Path(value).exists() and (folder / value).exists()]
    if not misplaced:
        return ""
    return (f"relative paths in --config are taken from the working directory {Path.cwd()}, not from {folder}, "
            f"which holds {', '.join(misplaced)}: give absolute paths, or start from {folder}")


def _given(args: argparse.Namespace, settings) -> dict:
    """The flags named after ``settings``' fields (a dataclass) that the command line or --config
    gave: a flag left out is None (False for a switch such as --insecure)."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(settings)}
    return {name: v for name, v in values.items() if v is not None and v is not False}


def build_config(args) -> ServerConfig:
    """The server's settings from ``parse_serve_args``'s result: every flag named after a
    ``ServerConfig`` or ``Limits`` field sets it, over what ``--config`` holds beyond the flags."""
    values = dict(getattr(args, "config_values", {}))
    values.update(_given(args, ServerConfig))
    if args.no_batching:
        values["batching"] = False
    if args.tokens_env:
        values["tokens"] = env_tokens(args.tokens_env)
    if args.tokens_file:  # read here too, so that a bad file stops the start before the model loads
        read_tokens_file(Path(args.tokens_file))
    limits = {f.name: values.pop(f.name) for f in dataclasses.fields(Limits) if f.name in values}
    limits.update(_given(args, Limits))
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        options = known | {f.name for f in dataclasses.fields(Limits)} | {
            a.dest for a in serve_parser()._actions if a.dest not in ("help", "config")}
        raise ValueError(f"unknown option(s) in {args.config}: {', '.join(_with_guess(k, options) for k in unknown)}")
    return ServerConfig(**values, limits=Limits(**limits))


def _with_guess(key: str, options: set[str]) -> str:
    """``key``, and the option it most likely misspells (a config file gets no argparse help)."""
    guess = difflib.get_close_matches(key, sorted(options), n=1)
    return f"{key} (did you mean {guess[0]}?)" if guess else key


def event_loop_runner(choice: str) -> Callable[[Coroutine], object]:
    """How to run the server's coroutine for ``--event-loop``.

    uvloop's loop costs less CPU per call than asyncio's: with one crop per call the event loop is
    a large share of the server's work (OSNet-x0.25 on 2 cores: 4-7 % more images/s, see
    docs/performance.md). gRPC's asyncio stack runs on either loop.
    """
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("--event-loop uvloop needs the uvloop package (pip install uvloop); "
                                 "or use --event-loop asyncio") from None
        else:
            return uvloop.run
    return asyncio.run


def open_store(args):
    if args.gallery_backend == "faiss":
        return FaissGalleryStore(args.gallery_dir)
    if not args.milvus_uri:
        raise ValueError("--gallery-backend milvus needs --milvus-uri (a file path for Milvus Lite, or http(s)://host:port)")
    from retrieval.gallery.milvus_store import MilvusGalleryStore

    kwargs = {"server_pem_path": args.milvus_ca, "secure": True} if args.milvus_ca else {}
    return MilvusGalleryStore(args.milvus_uri, token=args.milvus_token or os.environ.get("MILVUS_TOKEN", ""),
                              consistency=args.milvus_consistency, **kwargs)


_PREPROCESSING_FLAGS = ("--pixel-mean", "--pixel-std", "--input-size")


def preprocessing_fallback(args: argparse.Namespace) -> ModelMetadata | None:
    """Preprocessing for a model without reid metadata, from the command line."""
    check_pixel_flags(args.pixel_mean, args.pixel_std)
    if args.pixel_mean is None:
        return None
    h, w = args.input_size or (0, 0)  # 0: the graph's fixed size, else refused (no guess)
    warn_if_wide(h, w, f"--input-size {h} {w}")
    return ModelMetadata(h, w, 0, pixel_mean=args.pixel_mean, pixel_std=args.pixel_std)


def configure_logging(log_format: str) -> Callable[[str], None]:
    """Logging for ``--log-format``, and the function that reports a fatal error with it.

    With ``json`` every line on stderr must be one object, or a collector splits and mislabels what
    it cannot parse: Python warnings, a thread's uncaught exception and a crash's traceback went
    to stderr as plain multi-line text, and the fatal one-liner (``reid-serve: error: ...``) too.
    They go through logging here. Warnings do in text mode as well, with a time stamp like the rest.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.captureWarnings(True)
    if log_format != "json":
        return lambda message: print(message, file=sys.stderr)
    crash = logging.getLogger("reid-serve")
    sys.excepthook = lambda kind, error, trace: crash.critical("uncaught exception", exc_info=(kind, error, trace))
    threading.excepthook = lambda hook: crash.error("uncaught exception in thread %s", getattr(hook.thread, "name", "?"),
                                                    exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))
    return crash.error


def serve_main(argv: list[str] | None = None) -> int:
    args = parse_serve_args(argv)
    fatal = configure_logging(args.log_format)
    # FAISS's loader logs at INFO which CPU build it tried, 11 lines at the first gallery call, most
    # of them "Could not load library with AVX512 support due to: ModuleNotFoundError(...)"
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # prometheus_client adds a NAME_created gauge beside every counter and histogram series (the
    # time it was made), which Prometheus stores as a series of its own: twice the series for
    # nothing a dashboard reads. Process-wide, so the CLI (which owns the process) turns it off.
    prometheus_client.disable_created_metrics()
    misplaced = config_folder_hint(args)  # before the store makes a gallery_dir that did not exist here
    try:
        config = build_config(args)
        fallback = preprocessing_fallback(args)
        run = event_loop_runner(args.event_loop)
        engine = open_engine(args.model, args.device, fallback, args.intra_op_threads, config.max_batch_size,
                             config.instances, args.graph_optimization)
        given = [flag for flag in _PREPROCESSING_FLAGS if getattr(args, flag[2:].replace("-", "_"))]
        if given and not engine.uses_fallback:
            log.warning("%s ignored: %s carries its own preprocessing metadata", ", ".join(given), args.model)
        if args.model_id is not None:
            if not args.model_id.strip():
                raise ValueError("--model-id must not be empty")
            engine.model_id = args.model_id.strip()
        store = None if args.no_gallery else open_store(args)
        if misplaced:  # a gallery_dir beside the config, and a new empty one made here: its galleries looked gone
            log.warning(misplaced)
    except (ModelFileError, GalleryError, SecurityError, ValueError, OSError) as exc:
        fatal(f"reid-serve: error: {exc}" + (f" ({misplaced})" if misplaced else ""))
        return 2
    try:
        run(serve_forever(engine, config, store))
    except (OSError, SecurityError, ModelFileError) as exc:  # ModelFileError: a model that fails its warm-up
        fatal(f"reid-serve: error: {exc}")
        return 2
    return 0
