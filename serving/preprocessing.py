"""Request images -> model-ready arrays, one outcome per image (an array or an ``ImageError``).

Decoding, cropping and resizing run here, in a thread pool off the event loop; the resize itself
is ``engines.base.resize``, the function training and offline evaluation use too. Images leave as
uint8 pixels at the model's input size; the engine converts a whole batch to floats at once.
"""
from __future__ import annotations

import math

import numpy as np

from retrieval.cancellation import check_cancelled
from serving.engines.base import ImageError, decode_image, resize
from serving.proto import reid_pb2


_PIXEL_FORMATS = (reid_pb2.PIXEL_FORMAT_UNSPECIFIED, reid_pb2.RGB8, reid_pb2.BGR8)


def to_rgb(image: reid_pb2.Image, max_pixels: int) -> np.ndarray:
    """An ``Image`` message -> H x W x 3 uint8 RGB, refusing anything over ``max_pixels`` before decoding."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        if not image.encoded:
            raise ImageError("encoded image is empty")
        return decode_image(image.encoded, max_pixels)
    if kind == "raw":
        raw = image.raw
        if raw.format not in _PIXEL_FORMATS:  # e.g. a newer client's RGBA: its bytes would be misread as RGB
            raise ImageError(f"raw image format {raw.format} is not one this server knows (RGB8 = 1, BGR8 = 2)")
        if raw.height == 0 or raw.width == 0:
            raise ImageError("raw image has zero height or width")
        if raw.height * raw.width > max_pixels:
            raise ImageError(f"raw image of {raw.width}x{raw.height} pixels exceeds the limit of {max_pixels}")
        expected = raw.height * raw.width * 3
        if len(raw.pixels) != expected:
            raise ImageError(f"raw image {raw.width}x{raw.height} needs {expected} bytes, got {len(raw.pixels)}")
        pixels = np.frombuffer(raw.pixels, dtype=np.uint8).reshape(raw.height, raw.width, 3)
        return pixels[:, :, ::-1] if raw.format == reid_pb2.BGR8 else pixels
    raise ImageError("image has neither encoded bytes nor raw pixels")


def crop(frame: np.ndarray, box: reid_pb2.BoundingBox) -> np.ndarray:
    """Pixels of ``box`` clipped to the frame; an empty or non-finite box is an error for that box."""
    coords = (box.x1, box.y1, box.x2, box.y2)
    if not all(math.isfinite(c) for c in coords):
        raise ImageError(f"box {coords} has non-finite coordinates")
    if box.x2 <= box.x1 or box.y2 <= box.y1:
        raise ImageError(f"box {coords} has zero or negative size")
    h, w = frame.shape[:2]
    x1, x2 = max(0, int(math.floor(box.x1))), min(w, int(math.ceil(box.x2)))
    y1, y2 = max(0, int(math.floor(box.y1))), min(h, int(math.ceil(box.y2)))
    if x2 <= x1 or y2 <= y1:
        raise ImageError(f"box {coords} has no pixels inside the {w}x{h} frame")
    return frame[y1:y2, x1:x2]


def prepare(request: reid_pb2.EmbedRequest, height: int, width: int, max_pixels: int) -> list:
    """One entry per requested image (crops first, then frame boxes): height x width x 3 uint8 or an ``ImageError``."""
    out: list = []
    for image in request.images:
        check_cancelled()  # a caller that has gone: decode nothing more for it
        try:
            out.append(resize(to_rgb(image, max_pixels), height, width))
        except ImageError as exc:
            out.append(exc)
    if request.frame.boxes:
        try:
            frame = to_rgb(request.frame.image, max_pixels)
        except ImageError as exc:
            out += [ImageError(f"frame: {exc}")] * len(request.frame.boxes)
            return out
        for box in request.frame.boxes:
            check_cancelled()
            try:
                out.append(resize(crop(frame, box), height, width))
            except ImageError as exc:
                out.append(exc)
    return out


def count_images(request: reid_pb2.EmbedRequest) -> int:
    return len(request.images) + len(request.frame.boxes)
