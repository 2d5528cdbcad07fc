"""Market-1501 folder layout: ``PPPP_cCsS_FFFFFF_BB.jpg`` files, one folder per split.

pid -1 marks junk images (dropped everywhere) and pid 0 distractors (kept only in galleries, where
they are valid non-matches). CUHK03 and DukeMTMC in Market layout follow the same naming.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import ConfigError, DataError

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
    """Every usable image of one split folder, sorted by file name; junk is always dropped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist")
    records = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
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
