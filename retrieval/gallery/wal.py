"""Append-only write-ahead log with checksummed records.

Record: ``b"RWAL"`` | payload length (u32) | CRC32 of payload (u32) | payload. An append is
flushed and fsync'ed before it returns, so an acknowledged change survives a crash or power
loss. On replay a record cut short or failing its checksum (a torn last write) ends the log: it
is dropped with a warning and the file truncated to the last good record, never a crash.
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

MAGIC = b"RWAL"
_HEADER = struct.Struct("<4sII")


class WriteAheadLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def replay(self) -> Iterator[bytes]:
        """Every intact record in order; truncates a torn tail."""
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + _HEADER.size]
            if len(header) < _HEADER.size:
                break
            magic, length, crc = _HEADER.unpack(header)
            payload = data[offset + _HEADER.size : offset + _HEADER.size + length]
            if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                break
            yield payload
            offset += _HEADER.size + length
            good_end = offset
        if good_end < len(data):
            log.warning("%s: dropped a torn or corrupt tail of %d bytes after the last intact record",
                        self.path, len(data) - good_end)
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def append(self, payload: bytes) -> None:
        """Durable once this returns (write + flush + fsync)."""
        if self._file is None:
            self._file = open(self.path, "ab")
        self._file.write(_HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload)
        self._file.flush()
        os.fsync(self._file.fileno())

    def truncate(self) -> None:
        """Empty the log (after a snapshot has made its records redundant)."""
        self.close()
        with open(self.path, "wb") as f:
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
