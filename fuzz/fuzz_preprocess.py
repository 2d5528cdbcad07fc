"""atheris fuzz target: arbitrary bytes as an EmbedRequest message through the server's preprocessing.

Anything but an ImageError per item (or a protobuf DecodeError for bytes that are no message) is
a bug. Run by hand for a bounded time, e.g.:
    pip install atheris
    python fuzz/fuzz_preprocess.py -max_total_time=60 -rss_limit_mb=4096
"""
from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from serving.engines.base import ImageError
    from serving.preprocessing import count_images, prepare
    from serving.proto import reid_pb2


def test_one_input(data: bytes) -> None:
    try:
        request = reid_pb2.EmbedRequest.FromString(data)
    except DecodeError:
        return
    if count_images(request) > 64:
        return
    out = prepare(request, 32, 16, max_pixels=1 << 20)
    assert len(out) == count_images(request)
    for item in out:
        assert isinstance(item, ImageError) or item.shape == (32, 16, 3)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
