"""Market-1501 folder layout: ``PPPP_cCsS_FFFFFF_BB.jpg`` files, one folder per split.

pid -1 marks junk images (dropped everywhere) and pid 0 distractors (kept only in galleries, where
they are valid non-matches). CUHK03 and DukeMTMC in Market layout follow the same naming.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.metrics import queries_with_matches
from training.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NAME = re.compile(r"^(-?\d+)_c(\d+)")
JUNK_PID = -1
DISTRACTOR_PID = 0


@dataclass(frozen=True)
class ImageRecord:
    path: str
    pid: int
    camid: int


def parse_name(name: str) -> tuple[int, int]:
    """``0002_c1s1_000451_03.jpg`` -> (pid 2, camera 1)."""
    match = _NAME.match(name)
    if not match:
        raise DataError(f"{name}: file name does not follow the Market-1501 pattern PPPP_cC...")
    return int(match.group(1)), int(match.group(2))


def require_folder(folder: str, keys: str) -> str:
    """``folder``, or a ConfigError naming the spec keys that set it: an empty path would otherwise
    read the working directory and fail there with a message about file names."""
    if not folder:
        raise ConfigError(f"no dataset folder given: set {keys}")
    return folder


def load_query_gallery(query: str, gallery: str, command: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Query and gallery records for ``reid evaluate``/``reid inference`` (``command``), whose own
    ``query_dataset``/``test_dataset`` keys fall back to the spec's dataset folders."""
    return (load_query(require_folder(query, f"{command}.query_dataset (or dataset.query_dataset_dir in the spec)")),
            load_gallery(require_folder(gallery, f"{command}.test_dataset (or dataset.test_dataset_dir in the spec)")))


def list_split(folder: str | Path, keep_distractors: bool) -> list[ImageRecord]:
    """Every usable image of one split folder, sorted by file name; junk is always dropped. Hidden
    files are not images of the set: a dataset copied from a Mac holds a ``._NAME.jpg`` (metadata)
    beside each image, which stopped the run as a file name off the Market-1501 pattern."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist")
    records = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        try:
            pid, camid = parse_name(path.name)
        except DataError as exc:
            raise DataError(f"{folder}/{exc}") from None
        if pid == JUNK_PID or (pid == DISTRACTOR_PID and not keep_distractors):
            continue
        records.append(ImageRecord(str(path), pid, camid))
    if not records:
        raise DataError(f"dataset folder {folder} holds no Market-1501-named images{_split_hint(folder)}")
    return records


def _split_hint(folder: Path) -> str:
    """A dataset root given where a split folder belongs (``data`` for ``data/bounding_box_train``)
    is the likely mistake when a folder holds no images: name its subfolders that do hold some."""
    splits = sorted(sub.name for sub in folder.iterdir()
                    if sub.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir()))
    if not splits:
        return ""
    return f"; its subfolders {', '.join(splits)} hold images: give one of them (a split, not the dataset root)"


def require_matches(query: list[ImageRecord], gallery: list[ImageRecord], query_dir: str, test_dir: str,
                    purpose: str, fix: str) -> None:
    """Stop before any embedding when no query has a gallery image of the same person from another
    camera: ``purpose`` (validation, the evaluation) would have no mAP to report, found only after
    embedding every image."""
    if not queries_with_matches(*protocol_ids(query, gallery)).any():
        raise DataError(f"no query in {query_dir} has an image of the same person from another camera in "
                        f"{test_dir}, so {purpose} has no mAP to report; {fix}")


def warn_of_training_images(train_dir: str, query: list[ImageRecord], gallery: list[ImageRecord], what: str) -> None:
    """Say so when query or gallery images are files of the training folder (the test folder set
    to ``bounding_box_train`` by a slip): ``what`` (validation, the evaluation) would then report
    what the model memorized as re-identification, with nothing else looking wrong. Folders are
    compared by their real paths (one real path per folder, not per image: a training set of
    100,000 images costs nothing), so the training folder reached by another path or a link
    counts, and another dataset's files with the same Market-1501 names do not."""
    if not train_dir or not Path(train_dir).is_dir():
        return
    trained, verdicts = os.path.realpath(train_dir), {}

    def in_training(record: ImageRecord) -> bool:
        folder = os.path.dirname(record.path)
        if folder not in verdicts:
            verdicts[folder] = os.path.realpath(folder) == trained
        return verdicts[folder]

    in_query, in_gallery = sum(map(in_training, query)), sum(map(in_training, gallery))
    if in_query or in_gallery:
        log.warning("%d of %d query and %d of %d gallery images are training images (dataset.train_dataset_dir=%s): "
                    "%s measures what the model memorized, not how it finds people it never saw; give the "
                    "held-out query and test folders", in_query, len(query), in_gallery, len(gallery), train_dir, what)


def protocol_ids(query: list[ImageRecord], gallery: list[ImageRecord]) -> tuple[np.ndarray, ...]:
    """(query pids, gallery pids, query camids, gallery camids) as numpy arrays: the identity
    arguments of ``retrieval.metrics.evaluate_rank``, in its order."""
    return (np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
            np.array([r.camid for r in query]), np.array([r.camid for r in gallery]))


def relabel(records: list[ImageRecord]) -> tuple[list[ImageRecord], dict[int, int]]:
    """Map training pids to 0..N-1 (classifier targets), in ascending pid order."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records], mapping


def load_train(folder: str | Path, num_classes: int | None = None) -> list[ImageRecord]:
    """Training records with relabelled pids; checks ``num_classes`` against the data."""
    records, mapping = relabel(list_split(folder, keep_distractors=False))
    if num_classes is not None and num_classes != len(mapping):
        raise DataError(
            f"dataset.num_classes={num_classes} but {folder} holds {len(mapping)} identities; "
            f"set dataset.num_classes={len(mapping)}"
        )
    return records


def load_query(folder: str | Path) -> list[ImageRecord]:
    return list_split(folder, keep_distractors=False)


def load_gallery(folder: str | Path) -> list[ImageRecord]:
    return list_split(folder, keep_distractors=True)
