"""``reid-client``: embed images and manage and search galleries from a shell.

For smoke checks and scripts around a deployed server; programs use ``serving.client``. Exit
status: 0 when everything asked for was done, 1 when the server refused the call or part of it was
not done (an image that failed, an id not found: each printed on its own line), 2 for a usage
error found before calling.
"""
from __future__ import annotations

import serving.grpc_logs  # noqa: F401  first: sets gRPC's log level before gRPC is imported

import argparse
import importlib.metadata
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from retrieval.distance import l2_normalize
from serving.client import GalleryClient, ReidClient, metadata_message, parse_response
from serving.proto import reid_pb2
from serving.security import TLS_CA_ENV, TLS_CLIENT_ENV, SecurityError, client_tls
from serving.targets import port_missing


class UsageError(Exception):
    """A problem with the command line, found before any call (exit status 2)."""


class CommandFailed(Exception):
    """A problem found while the command runs, said in one line (exit status 1)."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # what a folder argument picks up
NAME_GROUPS = ("person", "camera")  # the named groups --name-pattern reads

CONNECTION_DEFAULTS = {"server": "127.0.0.1:50051", "timeout": 60.0, "token": None, "tls_ca": None, "tls_cert": None,
                       "tls_key": None, "tls_server_name": None}


def _number(kind, low, inclusive: bool = True):
    """An argparse type: ``kind`` at least (or above) ``low``. Out-of-range values used to reach the
    request builder, where protobuf refused them with a traceback (``--top-k -3``, a negative id)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {low}, got {text}")
        return value
    return parse


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    """Before or after the command (``reid-client --server H:P embed ...`` or ``... embed --server H:P``).
    Both parsers leave an option unset (SUPPRESS) unless given, as a subcommand's default would
    otherwise overwrite a value given before it; ``client_main`` fills the defaults in."""
    s = argparse.SUPPRESS
    parser.add_argument("--server", default=s, help="host:port of reid-serve, or a gRPC target naming several (dns:///NAME:PORT, "
                        "ipv4:H:P,H:P), whose calls are spread over all (default: $REID_SERVER, else 127.0.0.1:50051)")
    parser.add_argument("--timeout", type=_number(float, 0, inclusive=False), default=s, help="seconds per call (default 60)")
    parser.add_argument("--token", default=s, help="bearer token (or set REID_TOKEN)")
    parser.add_argument("--tls-ca", default=s, help="CA (PEM) to verify the server; enables TLS (or set REID_TLS_CA)")
    parser.add_argument("--tls-cert", default=s,
                        help="client certificate (PEM), for a server under mutual TLS (or set REID_TLS_CERT)")
    parser.add_argument("--tls-key", default=s, help="the client certificate's private key (PEM; or set REID_TLS_KEY)")
    parser.add_argument("--tls-server-name", default=s,
                        help="the name to check the server's certificate against, where --server is an address the "
                             "certificate does not hold (or set REID_TLS_SERVER_NAME; default: --server's host)")


def client_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common)
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--batch", type=int, default=64,
                        help="images per call (default 64; the server refuses calls over its per-request limit)")

    p = argparse.ArgumentParser(prog="reid-client", description="Call a reid-serve server.")
    p.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('reid')}")
    _add_connection_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", parents=[common, images], help="embed image files; print embeddings or write them as .npy")
    e.add_argument("images", nargs="+", type=Path, help="image files, or folders of them (their images in name order, hidden files left out)")
    e.add_argument("--output", type=Path, help=".npy file for the N x D embeddings (rows of failed images are NaN)")

    gl = sub.add_parser("galleries", parents=[common], help="list galleries: name, entries, dimension, index, backend, model")
    gl.add_argument("--json", action="store_true", help="one JSON object per gallery instead of text")
    c = sub.add_parser("create", parents=[common], help="create an empty gallery")
    c.add_argument("gallery")
    c.add_argument("--index", choices=["flat", "hnsw"], default="flat", help="flat: exact (default); hnsw: approximate")
    c.add_argument("--dimension", type=_number(int, 0), default=0, help="embedding width (default: the served model's)")
    d = sub.add_parser("drop", parents=[common], help="delete a gallery and everything in it")
    d.add_argument("gallery")

    a = sub.add_parser("enroll", parents=[common, images], help="embed images on the server and add them to a gallery")
    a.add_argument("gallery")
    a.add_argument("images", nargs="+", type=Path, help="image files, or folders of them (their images in name order, hidden files left out)")
    a.add_argument("--person-id", default="", help="person or track id recorded with every image of this call")
    a.add_argument("--camera-id", default="", help="camera id recorded with every image of this call")
    a.add_argument("--name-pattern", type=_name_pattern, metavar="REGEX",
                   help="read each image's person and/or camera id from its file name: a regular expression with "
                        "named groups 'person' and/or 'camera', e.g. '^(?P<person>\\d+)_(?P<camera>c\\d+)' for "
                        "Market-1501 names")
    a.add_argument("--timestamp", type=_number(float, 0), default=0.0, help="seconds, recorded with every image of this call")
    a.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a free-form label (repeatable)")
    a.add_argument("--skip", type=_number(int, 0), default=0, metavar="N",
                   help="leave out the first N images (files in the order given, folders in name order): to go on "
                        "after an enroll that stopped, with the N it printed, without adding images twice")

    s = sub.add_parser("search", parents=[common, images], help="who is in these images: the closest gallery entries")
    s.add_argument("gallery")
    s.add_argument("images", nargs="*", type=Path, help="image files, or folders of them (their images in name order, hidden files left out)")
    s.add_argument("--entry", action="append", default=[], type=_number(int, 1), metavar="ID",
                   help="search with this gallery entry's stored embedding instead of images (repeatable): where "
                        "else was it seen? It is its own best hit unless --exclude-camera leaves it out")
    s.add_argument("--top-k", type=_number(int, 1), default=5, help="hits per image (default 5)")
    s.add_argument("--exclude-camera", default="", help="leave out entries seen by this camera")
    s.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking of the candidate pool (server defaults)")
    s.add_argument("--rerank-k1", type=_number(int, 1), help="re-ranking's k1 (server default 20; implies --rerank)")
    s.add_argument("--rerank-k2", type=_number(int, 1), help="re-ranking's k2 (server default 6; implies --rerank)")
    s.add_argument("--rerank-lambda", type=_number(float, 0), help="re-ranking's lambda_value, 0..1 (server default 0.3; "
                   "implies --rerank)")
    s.add_argument("--rerank-pool", type=_number(int, 1), help="candidates re-ranked per query (server default 100; "
                   "implies --rerank)")
    s.add_argument("--by-person", action="store_true",
                   help="one hit per person: the best entry of each of --top-k people (entries without a person id stand alone)")
    s.add_argument("--track", action="store_true",
                   help="the images are crops of one person (a tracker's track): search once with the mean of their "
                        "embeddings, which finds people more often than any single crop")
    s.add_argument("--json", action="store_true", help="one JSON object per image instead of text")

    r = sub.add_parser("remove", parents=[common],
                       help="remove entries from a gallery by id, every entry of a person, or every entry older than a time")
    r.add_argument("gallery")
    r.add_argument("ids", nargs="*", type=_number(int, 1))
    r.add_argument("--person", action="append", default=[], metavar="PERSON_ID",
                   help="remove every entry of this person (repeatable; instead of ids)")
    r.add_argument("--before", type=_number(float, 0, inclusive=False), metavar="TIMESTAMP",
                   help="remove every entry whose timestamp is set and earlier (seconds, as enroll's --timestamp): a retention period")

    n = sub.add_parser("entries", parents=[common],
                       help="list a gallery's entries (id, person, camera, timestamp, labels), lowest id first")
    n.add_argument("gallery")
    n.add_argument("--person", action="append", default=[], metavar="PERSON_ID",
                   help="only this person's entries (repeatable): what the gallery holds about them")
    n.add_argument("--since", type=_number(float, 0, inclusive=False), metavar="TIMESTAMP",
                   help="only entries whose timestamp is at or after this (seconds)")
    n.add_argument("--before", type=_number(float, 0, inclusive=False), metavar="TIMESTAMP",
                   help="only entries whose timestamp is set and earlier: what 'remove --before' would remove")
    n.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="only entries with this label (repeatable)")
    n.add_argument("--json", action="store_true", help="one JSON object per entry instead of text")
    n.add_argument("--embeddings", action="store_true", help="with --json: each entry's stored embedding too")

    rl = sub.add_parser("relabel", parents=[common],
                        help="give every entry of some people another person id (tracks found to be one person)")
    rl.add_argument("gallery")
    rl.add_argument("--person", action="append", default=[], metavar="PERSON_ID", required=True,
                    help="a person (or track) id whose entries move (repeatable)")
    rl.add_argument("--to", required=True, metavar="PERSON_ID", help="the person id they get")

    m = sub.add_parser("import", parents=[common],
                       help="add the entries of an 'entries --json --embeddings' listing to a gallery, with their ids")
    m.add_argument("gallery")
    m.add_argument("listing", type=Path, help="JSON lines, each with id and embedding (and person_id, camera_id, timestamp, labels)")
    m.add_argument("--batch", type=_number(int, 1), default=1000, help="entries per call (default 1000)")
    m.add_argument("--replace", action="store_true", help="overwrite entries whose ids the gallery already holds")
    return p


def _name_pattern(text: str) -> re.Pattern:
    """An argparse type: a regular expression naming at least one of ``NAME_GROUPS``."""
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a regular expression: {exc}") from None
    if not set(NAME_GROUPS) & set(pattern.groupindex):
        raise argparse.ArgumentTypeError(f"'{text}' has no (?P<person>...) or (?P<camera>...) group")
    return pattern


def _image_files(paths: list[Path]) -> list[Path]:
    """The files given, each folder replaced by the image files directly inside it in name order:
    a gallery of thousands of crops is one folder, not a glob that can outgrow the command line.
    Hidden files are left out, as a shell's ``*.jpg`` leaves them out: a folder copied from a Mac
    holds a ``._NAME.jpg`` beside each image (its metadata, not a JPEG), each an error line."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
            if not inside:
                raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return files


def _batches(args, items: list | None = None) -> list[list]:
    """The command's image files (``_image_files``), or ``items``, in calls of ``--batch``, all
    checked before any call."""
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    files = _image_files(args.images) if items is None else items
    return [files[i : i + args.batch] for i in range(0, len(files), args.batch)]


def _labels(pairs: list[str]) -> dict[str, str]:
    bad = [x for x in pairs if "=" not in x or not x.split("=", 1)[0]]
    if bad:
        raise UsageError(f"--label {bad[0]!r} is not KEY=VALUE")
    return dict(x.split("=", 1) for x in pairs)


def _output_path(output: Path) -> Path:
    """Where ``np.save`` will write, checked before any embedding is computed so that none is lost."""
    path = output if output.name.endswith(".npy") else output.with_name(output.name + ".npy")  # as np.save does
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--output {output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--output {output}: cannot write there (permission denied)")
    return path


_STATUS_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _print_failure(what: Path | str, code: int, message: str) -> None:
    """One image (or entry) the server could not use, on its own stderr line (``embed``, ``enroll``,
    ``search``): the gRPC status code's number and name (``error 3 (INVALID_ARGUMENT)``)."""
    print(f"{what}: error {code} ({_STATUS_NAMES.get(code, 'unknown code')}): {message}", file=sys.stderr)


def _embed(args, connect) -> int:
    batches = _batches(args)
    output = _output_path(args.output) if args.output is not None else None
    failed, rows = 0, []  # rows (None for a failed image) only for --output
    with connect(ReidClient) as client:
        for batch in batches:  # printed as each call answers: a failing later call keeps what came before
            for path, o in zip(batch, client.embed(batch)):
                if not o.ok:
                    failed += 1
                    _print_failure(path, o.error_code, o.error)
                if output is not None:
                    rows.append(o.embedding if o.ok else None)
                elif o.ok:
                    print(f"{path}: " + " ".join(f"{v:.5f}" for v in o.embedding))
            sys.stdout.flush()
    if output is not None:
        dim = next((len(r) for r in rows if r is not None), 0)
        rows = [r if r is not None else np.full(dim, np.nan, dtype=np.float32) for r in rows]
        tmp = output.with_name(output.name + ".tmp")  # renamed into place: an interrupted write keeps the old file whole
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.stack(rows) if rows else np.zeros((0, dim), np.float32))
            tmp.replace(output)
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {output} ({len(rows)} x {dim})")
    return 1 if failed else 0


def _print_info(info: reid_pb2.GalleryInfo) -> None:
    print(f"{info.name}: {info.size} entries, {info.dimension}-d, {reid_pb2.IndexType.Name(info.index_type).lower()} index, "
          f"{info.backend} on {info.device or 'cpu'}" + (f", model {info.model}" if info.model else ""))


def _galleries(args, connect) -> int:
    with connect(GalleryClient) as g:
        for info in g.list():
            if args.json:
                print(json.dumps({"name": info.name, "entries": info.size, "dimension": info.dimension,
                                  "index": reid_pb2.IndexType.Name(info.index_type).lower(), "backend": info.backend,
                                  "device": info.device or "cpu", "model": info.model}))
            else:
                _print_info(info)
    return 0


def _create(args, connect) -> int:
    with connect(GalleryClient) as g:
        _print_info(g.create(args.gallery, args.dimension, args.index))
    return 0


def _drop(args, connect) -> int:
    with connect(GalleryClient) as g:
        g.drop(args.gallery)
    print(f"dropped {args.gallery}")
    return 0


def _metadata(args, files: list[Path]) -> dict[Path, reid_pb2.EntryMetadata]:
    """Each file's entry metadata: the command's ids, or those ``--name-pattern`` reads from its
    name (every name checked before any call, so a stray file does not stop the command midway)."""
    labels = _labels(args.label)
    pattern = args.name_pattern
    groups = set(pattern.groupindex) & set(NAME_GROUPS) if pattern else set()
    for group in groups:
        if getattr(args, f"{group}_id"):
            raise UsageError(f"--{group}-id and --name-pattern's '{group}' group both set the {group} id; give one")
    out = {}
    for path in files:
        ids = {"person": args.person_id, "camera": args.camera_id}
        if pattern:
            match = pattern.search(path.name)
            if match is None:
                raise UsageError(f"{path}: file name does not match --name-pattern '{pattern.pattern}'")
            ids.update({group: match.group(group) or "" for group in groups})
            for group in groups:
                if not _utf8(ids[group]):  # a name in another encoding: protobuf refused it with a traceback
                    shown = str(path).encode("utf-8", "backslashreplace").decode()
                    raise UsageError(f"{shown}: the {group} id --name-pattern reads from this file name, {ids[group]!r}, "
                                     f"is not UTF-8 text; rename the file (e.g. with convmv) or give --{group}-id")
        out[path] = metadata_message(ids["person"], ids["camera"], args.timestamp, labels)
    return out


def _utf8(text: str) -> bool:
    """Whether ``text`` can go into a message: file names and arguments in another encoding than
    UTF-8 reach Python with their bytes kept as surrogates, which protobuf's strings refuse."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _enroll(args, connect) -> int:
    """Embeds each call's images, then adds the embeddings of those that worked: AddToGallery with
    images adds all of a call's or none, so one corrupt file would stop the command with its
    neighbours and every later image left out. A failed image gets its own line, as in ``embed``.

    Running a stopped enroll again would add its first images twice (the server gives each added
    embedding a new id), so a stop says how many images are done and the ``--skip`` that goes on."""
    files = _image_files(args.images)
    if args.skip >= len(files):
        raise UsageError(f"--skip {args.skip} leaves none of the {len(files)} images")
    batches = _batches(args, files[args.skip:])
    meta = _metadata(args, [p for batch in batches for p in batch])
    failed = enrolled = done = 0  # done: images whose call is over, enrolled or failed alone
    pending = 0  # images of the call to add under way (its failed ones too): it may apply though the client gave up
    with connect(GalleryClient) as g, connect(ReidClient) as client:
        try:
            for batch, outcomes in _embedded_for(args.gallery, g, client, batches, "enroll into a new gallery"):
                for path, o in zip(batch, outcomes):
                    if not o.ok:
                        failed += 1
                        _print_failure(path, o.error_code, o.error)
                good = [(path, o.embedding) for path, o in zip(batch, outcomes) if o.ok]
                if good:
                    pending = len(batch)
                    ids = g.add(args.gallery, embeddings=np.stack([e for _, e in good]), metadata=[meta[p] for p, _ in good])
                    for (path, _), entry in zip(good, ids):
                        print(f"{path}: id {entry}", flush=True)
                    enrolled += len(good)
                done, pending = done + len(batch), 0
        except (grpc.RpcError, CommandFailed, KeyboardInterrupt) as exc:
            if done or pending:
                _print_enroll_stop(args, exc, enrolled, len(files), done, pending)
            raise
    return 1 if failed else 0


def _print_enroll_stop(args, exc: BaseException, enrolled: int, total: int, done: int, adding: int) -> None:
    """How far a stopped enroll got, and the ``--skip`` that goes on. A call to add that was under
    way when the client gave up (deadline, Ctrl-C) or lost the server may still have added its
    images: then both numbers are given (``adding``: that call's images, its failed ones too)."""
    stop = "the interruption" if isinstance(exc, KeyboardInterrupt) else "the failure below"
    line = f"enrolled {enrolled} of {total} images into {args.gallery} before {stop}"
    skip = args.skip + done
    unsure = adding and (isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, grpc.RpcError) and exc.code() in _OUTCOME_UNKNOWN and "Failed to connect" not in (exc.details() or "")))
    if unsure:
        line += (f"; the call adding the next {adding} images may have added them: --skip {skip + adding} goes on "
                 f"if 'reid-client entries {args.gallery}' lists them, else --skip {skip}")
    else:
        line += f"; to go on, run the same command with --skip {skip}"
    print(line, file=sys.stderr)


# Codes with which a call may have done its work before the client heard back.
_OUTCOME_UNKNOWN = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def _embedded_for(gallery: str, g: GalleryClient, client: ReidClient, batches: list[list], fix: str):
    """(batch, its EmbedOutcomes) for each batch, embedded by the server for ``gallery``'s use.

    Embeddings go to the gallery as values, which the server cannot check against the model that
    filled it (it does for images), so a server whose model is not the gallery's stops the command
    (``fix`` says what to do instead). ``g.info`` fails with NOT_FOUND before any image is embedded."""
    holds = g.info(gallery).model
    for batch in batches:
        response = client.embed_response(batch)
        if holds and response.model_id and response.model_id != holds:
            raise CommandFailed(f"gallery {gallery!r} holds embeddings of model {holds}, and the server embeds with "
                                f"model {response.model_id}: {fix}")
        yield batch, parse_response(response)


def _meta_fields(m: reid_pb2.EntryMetadata) -> dict:
    return {"person_id": m.person_id, "camera_id": m.camera_id, "timestamp": m.timestamp, "labels": dict(m.labels)}


def _search(args, connect) -> int:
    if bool(args.images) == bool(args.entry):
        raise UsageError("give images to search with, or --entry ID (one of the two)")
    filters = [reid_pb2.SearchFilter(exclude_camera_id=args.exclude_camera)] if args.exclude_camera else []  # one for all
    given = {"k1": args.rerank_k1, "k2": args.rerank_k2, "lambda_value": args.rerank_lambda, "pool": args.rerank_pool}
    args.rerank_options = {k: v for k, v in given.items() if v is not None} if args.rerank or any(
        v is not None for v in given.values()) else None
    if args.track:
        return _search_track(args, connect, filters)
    if args.entry:  # the gallery's own entries as queries
        batches = _batches(args, args.entry)
        queries = [("entry", i, f"entry {i}") for i in args.entry]
    else:
        batches = _batches(args)
        queries = [("image", str(p), str(p)) for batch in batches for p in batch]
    kind = "entry_ids" if args.entry else "images"
    failed, done = 0, 0
    with connect(GalleryClient) as g:
        for batch in batches:  # each call's answers printed as they come: a long search shows its progress
            results = g.search(args.gallery, top_k=args.top_k, filters=filters, rerank=args.rerank_options,
                               group_by_person=args.by_person, **{kind: batch})
            for (key, value, label), result in zip(queries[done:done + len(batch)], results):
                failed += _print_result(args, key, value, label, result)
            sys.stdout.flush()
            done += len(batch)
    return 1 if failed else 0


def _search_track(args, connect, filters: list) -> int:
    """``search --track``: one query, the mean of the images' L2-normalized embeddings."""
    if args.entry:
        raise UsageError("--track averages the embeddings of images; it does not take --entry")
    batches, rows, used, failed = _batches(args), [], [], 0
    with connect(GalleryClient) as g, connect(ReidClient) as client:
        for batch, outcomes in _embedded_for(args.gallery, g, client, batches, "search a gallery of this model"):
            for path, o in zip(batch, outcomes):
                if o.ok:
                    rows.append(o.embedding)
                    used.append(str(path))
                else:
                    failed += 1
                    _print_failure(path, o.error_code, o.error)
        if not rows:
            raise CommandFailed("no image of the track could be embedded")
        query = l2_normalize(np.stack(rows)).mean(axis=0, keepdims=True)
        result, = g.search(args.gallery, embeddings=query, top_k=args.top_k, filters=filters,
                           rerank=args.rerank_options, group_by_person=args.by_person)
    failed += _print_result(args, "track", used, f"track of {len(used)} image{'s' if len(used) > 1 else ''}", result)
    return 1 if failed else 0


def _print_result(args, key: str, value, label: str, result) -> int:
    """One query's hits (or failure) as ``search`` prints them; 1 if it failed."""
    if result.HasField("error"):
        _print_failure(label, result.error.code, result.error.message)
        return 1
    hits = [{"id": h.id, "score": round(h.score, 6), "distance": round(h.distance, 6), **_meta_fields(h.metadata)}
            for h in result.hits]
    if args.json:
        print(json.dumps({key: value, "hits": hits}))
        return 0
    print(f"{label}:" + ("" if hits else " no hits"))
    for rank, h in enumerate(hits, 1):
        reranked = f"  re-ranked distance {h['distance']:.4f}" if args.rerank_options is not None else ""
        print(f"  {rank}. id {h['id']}  score {h['score']:.4f}{reranked}  person {h['person_id'] or '-'}  "
              f"camera {h['camera_id'] or '-'}")
    return 0


def _check_people(person_ids: list[str]) -> None:
    """``--person`` values: an empty one would mean every entry without a person id."""
    if any(not p for p in person_ids):
        raise UsageError("--person must not be empty")


def _without_entries(person_ids: list[str], seen: set[str]) -> list[str]:
    """The people asked for (once each, in order) that no entry listed carried."""
    return [p for p in dict.fromkeys(person_ids) if p not in seen]


def _remove(args, connect) -> int:
    given = sum(map(bool, (args.ids, args.person, args.before)))
    if given != 1:
        raise UsageError("give one of: entry ids, --person, --before" if given else
                         "give entry ids, --person PERSON_ID or --before TIMESTAMP")
    _check_people(args.person)
    with connect(GalleryClient) as g:
        answer = g.remove(args.gallery, args.ids, args.person, args.before or 0.0)
    missing = [*map(str, answer.missing), *answer.missing_person_ids]
    print(f"removed {answer.removed}" + (f"; not found: {' '.join(missing)}" if missing else ""))
    return 1 if missing else 0


def _entries(args, connect) -> int:
    if args.embeddings and not args.json:
        raise UsageError("--embeddings needs --json")
    _check_people(args.person)
    if args.since and args.before and args.since >= args.before:
        raise UsageError(f"--since {args.since:g} is not before --before {args.before:g}")
    # "set and earlier than T", as remove --before counts it, in the filter's inclusive bounds:
    # at or after the smallest positive time, at or before the last time below T
    since = args.since or (math.ulp(0.0) if args.before else 0.0)
    until = math.nextafter(args.before, 0.0) if args.before else 0.0
    where = reid_pb2.SearchFilter(time_from=since, time_to=until, labels=_labels(args.label))
    seen = set()
    with connect(GalleryClient) as g:
        # each embedding names its model, so that an import into another model's gallery is refused
        model = {"model": g.info(args.gallery).model} if args.embeddings else {}
        for entry in g.entries(args.gallery, args.person, include_embeddings=args.embeddings, filter=where):
            m = entry.metadata
            seen.add(m.person_id)
            if args.json:
                embedding = {"embedding": [round(v, 7) for v in entry.embedding.values], **model} if args.embeddings else {}
                print(json.dumps({"id": entry.id, **_meta_fields(m), **embedding}))
            else:
                labels = "".join(f"  {k}={v}" for k, v in sorted(m.labels.items()))
                print(f"id {entry.id}  person {m.person_id or '-'}  camera {m.camera_id or '-'}  "
                      f"timestamp {f'{m.timestamp:.3f}' if m.timestamp else '-'}{labels}", flush=True)
    missing = _without_entries(args.person, seen)
    if missing:
        print(f"reid-client: no entries of: {' '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


def _relabel(args, connect) -> int:
    """Each entry is added again under its id with the new person id (``replace``), a call per
    1,000: entries keep their ids, embeddings, cameras, times and labels. Not one change: a
    relabel that stops midway, or misses entries added meanwhile, is finished by running it again."""
    if not args.to or any(not p for p in args.person):
        raise UsageError("person ids must not be empty")
    if args.to in args.person:
        raise UsageError(f"--to {args.to} is one of the people to relabel")
    moved = 0
    with connect(GalleryClient) as g:
        entries = list(g.entries(args.gallery, args.person, include_embeddings=True))
        for start in range(0, len(entries), 1000):
            part = entries[start : start + 1000]
            meta = [metadata_message(args.to, e.metadata.camera_id, e.metadata.timestamp, dict(e.metadata.labels)) for e in part]
            g.add(args.gallery, embeddings=np.asarray([e.embedding.values for e in part], dtype=np.float32),
                  metadata=meta, ids=[e.id for e in part], replace=True)
            moved += len(part)
    missing = _without_entries(args.person, {e.metadata.person_id for e in entries})
    print(f"relabelled {moved} entries to {args.to}" + (f"; no entries of: {' '.join(missing)}" if missing else ""))
    return 1 if missing else 0


def _listing_entry(line: str, where: str, width: int | None) -> tuple[int, list, reid_pb2.EntryMetadata, str]:
    """One line of an ``entries --json --embeddings`` listing: (id, embedding, metadata, model)."""
    try:
        row = json.loads(line)
        entry_id, embedding, model = row["id"], row["embedding"], row.get("model", "")
        if not isinstance(model, str):
            raise ValueError(f"model must be a string, got {model!r}")
        if isinstance(entry_id, bool) or not (isinstance(entry_id, int) and 1 <= entry_id < 2**63):
            raise ValueError(f"id must be a whole number within 1..2^63-1, got {entry_id!r}")
        if not (isinstance(embedding, list) and embedding and all(isinstance(v, (int, float)) for v in embedding)
                and all(map(math.isfinite, embedding))):
            raise ValueError("embedding must be a non-empty list of finite numbers")
        if width is not None and len(embedding) != width:
            raise ValueError(f"embedding has {len(embedding)} values, the lines before {width}")
        labels = row.get("labels") or {}
        if not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
            raise ValueError("labels must map names to strings")
        meta = metadata_message(str(row.get("person_id", "")), str(row.get("camera_id", "")),
                                float(row.get("timestamp", 0.0)), labels)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise UsageError(f"{where}: {what} (expected a line of 'reid-client entries --json --embeddings')") from None
    return entry_id, embedding, meta, model


def _listing(path: Path):
    """The listing's entries, one (id, embedding, metadata, model) at a time; blank lines are skipped.
    Read as UTF-8, as JSON is, whatever the locale (under a Latin-1 one, "Zoë" came in as "ZoÃ«"),
    past a byte-order mark (a listing saved again by a Windows editor failed at its first line)."""
    width = None
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    entry = _listing_entry(line, f"{path}:{n}", width)
                    width = len(entry[1])
                    yield entry
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _import(args, connect) -> int:
    """Every line is checked before any call (a listing that breaks off midway adds nothing), then
    the entries go in calls of ``--batch``, keeping their ids: an import that fails midway can be
    run again with ``--replace``."""
    models = Counter(entry[3] for entry in _listing(args.listing))
    total = sum(models.values())
    if not total:
        raise UsageError(f"{args.listing} holds no entries")
    models.pop("", None)  # a listing made before models were recorded, or of a gallery without one
    if len(models) > 1:
        raise UsageError(f"{args.listing} mixes embeddings of models {', '.join(sorted(models))}: they do not compare")
    done = 0
    with connect(GalleryClient) as g:
        theirs, ours = next(iter(models), ""), g.info(args.gallery).model
        if theirs and ours and theirs != ours:
            raise CommandFailed(f"{args.listing} holds embeddings of model {theirs}, and gallery {args.gallery!r} is for "
                                f"model {ours}: they do not compare. Import into a gallery made for model {theirs}")

        def add(batch: list) -> int:
            ids, vectors, meta, _ = zip(*batch)
            g.add(args.gallery, embeddings=np.asarray(vectors, dtype=np.float32), metadata=meta, ids=ids, replace=args.replace)
            if sys.stderr.isatty():
                print(f"\rimported {done + len(batch)} of {total}", end="", file=sys.stderr, flush=True)
            return len(batch)

        batch: list = []
        try:
            for entry in _listing(args.listing):
                batch.append(entry)
                if len(batch) == args.batch:
                    done += add(batch)
                    batch = []
            if batch:
                done += add(batch)
        except (grpc.RpcError, KeyboardInterrupt) as exc:
            stop = "the interruption" if isinstance(exc, KeyboardInterrupt) else "the failure below"
            if done and sys.stderr.isatty():
                print(file=sys.stderr)  # past the progress line
            print(f"imported {done} of {total} entries into {args.gallery} before {stop}"
                  + (" (run again with --replace to go on)" if done else ""), file=sys.stderr)
            raise
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"imported {done} entries into {args.gallery}")
    return 0


COMMANDS = {"embed": _embed, "galleries": _galleries, "create": _create, "drop": _drop, "enroll": _enroll,
            "search": _search, "remove": _remove, "entries": _entries,
            "import": _import, "relabel": _relabel}


def _fix_for(exc: grpc.RpcError, args: argparse.Namespace) -> str:
    """What to change in this command, where the failure says: the --batch the server's
    per-request image limit allows (64 images a call, the default, is over a lower limit); TLS on
    one side only, which gRPC reports as a closed socket or an SSL version error; a server address
    where nothing listens (the default one, when --server and REID_SERVER were forgotten); a gallery
    not created yet; a token missing, unknown, or only for reading; a client certificate missing;
    a name the server's certificate does not hold; a server certificate expired, or not from the
    CA given."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        given = args.token or os.environ.get("REID_TOKEN")
        return (" (the server does not know this token: check --token or REID_TOKEN)" if given
                else " (the server wants a token: give --token or set REID_TOKEN)")
    if exc.code() == grpc.StatusCode.PERMISSION_DENIED and "not change galleries" in details:
        return " (this is a read token: changes need a write token)"
    missing = re.search(r"no gallery named '(.*)'", details)
    if exc.code() == grpc.StatusCode.NOT_FOUND and missing:
        return f" (reid-client galleries lists the galleries; reid-client create {missing.group(1)} makes this one)"
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "Connection refused" in details:
        if port_missing(args.server):
            return (f" (--server {args.server} gives no port, so gRPC called port 443; reid-serve listens on 50051 "
                    f"unless told otherwise: give --server {args.server}:PORT)")
        return f" (nothing listens at {args.server}: start reid-serve there, or give --server HOST:PORT or REID_SERVER)"
    over = re.search(r"request has \d+ images; the limit is (\d+)", details)
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and over and hasattr(args, "batch"):
        return f" (give --batch {over.group(1)} or less)"
    tls = bool(args.tls_ca or os.environ.get(TLS_CA_ENV))
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not tls and "Socket closed" in details:
        return " (if the server serves TLS, give --tls-ca)"
    if exc.code() == grpc.StatusCode.UNAVAILABLE and tls and "WRONG_VERSION_NUMBER" in details:
        return " (the server speaks plaintext: leave out --tls-ca and REID_TLS_CA)"
    if (exc.code() == grpc.StatusCode.UNAVAILABLE and tls and not (args.tls_cert or os.environ.get(TLS_CLIENT_ENV["cert"]))
            and "Socket closed" in details):
        return " (if the server wants a client certificate, mutual TLS, give --tls-cert and --tls-key)"
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "Hostname Verification" in details:
        return (" (the server's certificate does not hold the name called: call it by a name it holds, or give "
                "--tls-server-name)")
    if exc.code() == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in details:
        if "expired" in details:
            return " (the server's certificate has expired: renew it; reid-serve reads it again when it changes)"
        ca = args.tls_ca or os.environ.get(TLS_CA_ENV)
        return f" (the server's certificate is not signed by the CA in {ca}: give the CA that signed it as --tls-ca)"
    return ""


def client_main(argv: list[str] | None = None) -> int:
    args = client_parser().parse_args(argv)
    for key, default in {**CONNECTION_DEFAULTS, "server": os.environ.get("REID_SERVER") or CONNECTION_DEFAULTS["server"]}.items():
        if not hasattr(args, key):
            setattr(args, key, default)

    def connect(kind):
        try:
            tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        except SecurityError as exc:
            raise UsageError(str(exc)) from None
        try:
            return kind(args.server, timeout=args.timeout, token=args.token or os.environ.get("REID_TOKEN"), **tls)
        except ValueError as exc:  # an address that is not a gRPC target
            raise UsageError(f"--server: {exc}") from None

    try:
        return COMMANDS[args.command](args, connect)
    except UsageError as exc:
        print(f"reid-client: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"reid-client: error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"reid-client: error: {exc.code().name}: {exc.details()}{_fix_for(exc, args)}", file=sys.stderr)
        return 1
    except UnicodeEncodeError as exc:
        if exc.encoding.replace("-", "").lower() == "utf8":  # a gallery name, id or label given in another encoding
            print(f"reid-client: error: {exc.object!r} is not UTF-8 text, which requests carry; give it in UTF-8", file=sys.stderr)
        else:  # an answer's person id that this terminal's encoding cannot show
            print(f"reid-client: error: cannot print {ascii(exc.object[exc.start:exc.end])} in this terminal's encoding "
                  f"({exc.encoding}); use a UTF-8 locale, or set PYTHONIOENCODING=utf-8", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was done is printed already; no traceback
        print("reid-client: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `reid-client search ... | head`: the reader left; stop without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 1
