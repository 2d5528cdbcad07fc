"""Decoding, resizing and the uint8 -> model-input conversion that training, evaluation and serving share."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.engines.base import ImageError, ModelMetadata, decode_image, resize
from training.data.transforms import build_eval_transform

IMAGENET = {"pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225]}


def _encode(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(h=90, w=40, seed=0) -> np.ndarray:
    """Smooth colour gradients plus noise: JPEG-friendly and not symmetric in any channel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], axis=2)
    return np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_decode_matches_pillow_in_rgb_order(fmt):
    pixels = _photo()
    data = _encode(pixels, fmt)
    with Image.open(io.BytesIO(data)) as img:
        expected = np.asarray(img.convert("RGB"))
    got = decode_image(data)
    assert got.dtype == np.uint8 and got.shape == (90, 40, 3)
    np.testing.assert_array_equal(got, expected)  # same libjpeg-turbo output; RGB, not OpenCV's BGR


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _sof_sampling(data: bytes, luma: int) -> bytes:
    """The JPEG with its first component's sampling byte in the baseline frame header replaced."""
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    return data[: sof + 11] + bytes([luma]) + data[sof + 12 :]


@pytest.mark.parametrize("mode,kw", [("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}),
                                     ("RGB", {"subsampling": 0}), ("RGB", {"subsampling": 1})])
def test_jpeg_variants_decode_as_pillow_does(mode, kw):
    buf = io.BytesIO()
    Image.fromarray(_photo()).convert(mode).save(buf, format="JPEG", **kw)
    data = buf.getvalue()
    got = decode_image(data)
    assert got.shape == (90, 40, 3)
    np.testing.assert_allclose(got, _pillow_rgb(data), atol=1 if mode == "CMYK" else 0)


def test_jpeg_with_a_layout_turbojpeg_cannot_classify_still_decodes():
    # Luma sampled 3x1 and chroma 1x1 is legal JPEG that TurboJPEG's header reader refuses
    # ("could not determine subsampling level"); libjpeg's general decoder reads it.
    data = _sof_sampling(_encode(_photo(48, 48), "JPEG", subsampling=0), 0x31)
    np.testing.assert_array_equal(decode_image(data), _pillow_rgb(data))


def test_jpeg_over_the_pixel_limit_is_refused_before_decoding():
    data = _encode(np.zeros((300, 200, 3), np.uint8), "JPEG")
    with pytest.raises(ImageError, match="200x300 pixels exceeds the limit of 59999"):
        decode_image(data, max_pixels=59_999)
    assert decode_image(data, max_pixels=60_000).shape == (300, 200, 3)


@pytest.mark.parametrize("marker", [b"\xff\xd9", b"\xff\xc4"])
def test_jpeg_warnings_are_tolerated_like_pillow(marker):
    # Stray bytes before a marker (common from cameras) draw only a libjpeg warning: the image
    # decodes, as it does in Pillow and in training's loader. Before the end-of-image marker
    # TurboJPEG accepts them too; before a Huffman table its header reader refuses, and libjpeg
    # decodes instead.
    data = _encode(_photo(), "JPEG")
    at = data.rfind(marker)
    data = data[:at] + b"\x00\x01\x02" + data[at:]
    np.testing.assert_array_equal(decode_image(data), _pillow_rgb(data))


def test_truncated_jpeg_is_refused_not_grey_filled():
    data = _encode(_photo(200, 100), "JPEG", quality=90)
    assert decode_image(data).shape == (200, 100, 3)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) * 2 // 3])


def test_exif_orientation_is_ignored_as_in_training():
    pixels = _photo(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": a decoder that applies it would return 30 x 60
    data = _encode(pixels, "JPEG", exif=exif.tobytes(), quality=95)
    assert decode_image(data).shape == (60, 30, 3)


def test_resize_shrinks_with_area_averaging():
    checker = (np.indices((256, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = resize(np.repeat(checker[:, :, None], 3, axis=2), 64, 32)
    assert out.shape == (64, 32, 3) and out.dtype == np.uint8
    assert abs(float(out.mean()) - 127.5) < 1.0 and out.std() < 1.0  # aliasing would give 0s and 255s


def test_resize_enlarges_smoothly_and_keeps_the_input_size_untouched():
    ramp = np.repeat(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], 16, axis=0).repeat(3, axis=2)
    big = resize(ramp, 64, 128).astype(int)
    assert big.shape == (64, 128, 3)
    assert (np.diff(big[0, :, 0]) >= 0).all() and (np.diff(big[0, :, 0]) <= 3).all()  # monotone, no steps
    same = _photo(64, 32)
    np.testing.assert_array_equal(resize(same, 64, 32), same)


@pytest.mark.parametrize("bad", [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 5), np.uint8),
                                 np.zeros((5, 5, 3), np.float32)])
def test_resize_refuses_what_is_not_an_rgb_image(bad):
    with pytest.raises(ImageError):
        resize(bad, 8, 4)


def test_training_eval_transform_sees_the_serving_pixels():
    img = _photo(150, 70)
    tensor = build_eval_transform(64, 32)(Image.fromarray(img)).numpy()
    np.testing.assert_allclose(tensor, resize(img, 64, 32).transpose(2, 0, 1) / 255.0, atol=1e-6)


@pytest.mark.parametrize("norm", [{}, IMAGENET], ids=["in-graph", "imagenet"])
def test_to_input_equals_scaling_then_normalize(norm):
    md = ModelMetadata(8, 4, 1, **norm)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 8, 4, 3), dtype=np.uint8)
    floats = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    got = md.to_input(pixels)
    assert got.shape == (3, 3, 8, 4) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, md.normalize(floats), atol=1e-6)
    if norm:
        mean = np.array(norm["pixel_mean"], np.float32).reshape(1, 3, 1, 1)
        std = np.array(norm["pixel_std"], np.float32).reshape(1, 3, 1, 1)
        np.testing.assert_allclose(md.normalize(floats), (floats - mean) / std, atol=1e-6)


def test_prepare_gives_each_image_its_own_outcome_in_order():
    """Crops first, then the frame's boxes; a frame that does not decode fails each of its boxes
    (with a message that says the frame, not the box, is at fault) and none of the crops."""
    from serving.preprocessing import prepare
    from serving.proto import reid_pb2

    request = reid_pb2.EmbedRequest()
    request.images.add(encoded=_encode(_photo(), "PNG"))
    request.images.add(encoded=b"")
    request.images.add(raw=reid_pb2.RawImage(pixels=b"", height=0, width=4, format=reid_pb2.RGB8))
    request.images.add()  # neither encoded bytes nor raw pixels
    request.frame.image.encoded = b"\xff\xd8 not a jpeg"
    for x in (0, 10):
        request.frame.boxes.add(x1=x, y1=0, x2=x + 8, y2=16)
    out = prepare(request, 32, 16, 10_000)
    assert len(out) == 6
    assert out[0].shape == (32, 16, 3) and out[0].dtype == np.uint8
    messages = [str(o) for o in out[1:]]
    assert "empty" in messages[0]
    assert "zero height or width" in messages[1]
    assert "neither encoded bytes nor raw pixels" in messages[2]
    assert all(isinstance(o, ImageError) for o in out[1:])
    assert messages[3] == messages[4] and messages[3].startswith("frame: cannot decode")


@pytest.mark.parametrize("box, why", [((0, 0, float("nan"), 5), "non-finite"), ((5, 0, 5, 5), "zero or negative"),
                                      ((50, 50, 60, 60), "no pixels inside")])
def test_a_bad_box_fails_alone(box, why):
    from serving.preprocessing import prepare
    from serving.proto import reid_pb2

    request = reid_pb2.EmbedRequest()
    request.frame.image.encoded = _encode(_photo(), "PNG")  # 40 x 90
    request.frame.boxes.add(x1=0, y1=0, x2=20, y2=40)
    x1, y1, x2, y2 = box
    request.frame.boxes.add(x1=x1, y1=y1 + 40, x2=x2, y2=y2 + 40)
    good, bad = prepare(request, 32, 16, 10_000)
    assert good.shape == (32, 16, 3)
    assert isinstance(bad, ImageError) and why in str(bad)


def test_decoding_stops_at_the_next_image_once_the_caller_has_gone(monkeypatch):
    """A request of many large images whose caller gave up kept a preprocessing thread decoding
    every one of them for nobody."""
    import threading

    import serving.preprocessing as preprocessing
    from retrieval.cancellation import Cancelled, run_cancellable
    from serving.proto import reid_pb2

    request = reid_pb2.EmbedRequest()
    for seed in range(5):
        request.images.add(encoded=_encode(_photo(seed=seed), "PNG"))
    request.frame.image.encoded = _encode(_photo(), "PNG")
    request.frame.boxes.add(x1=0, y1=0, x2=20, y2=40)
    ended, decoded = threading.Event(), []
    real = preprocessing.to_rgb

    def to_rgb(image, max_pixels):
        decoded.append(1)
        return real(image, max_pixels)

    monkeypatch.setattr(preprocessing, "to_rgb", to_rgb)
    assert len(run_cancellable(ended, preprocessing.prepare, request, 32, 16, 10_000)) == 6  # 5 crops, 1 box
    decoded.clear()

    def caller_goes_after_the_second(image, max_pixels):
        if len(decoded) == 1:
            ended.set()
        return to_rgb(image, max_pixels)

    monkeypatch.setattr(preprocessing, "to_rgb", caller_goes_after_the_second)
    with pytest.raises(Cancelled):
        run_cancellable(ended, preprocessing.prepare, request, 32, 16, 10_000)
    assert len(decoded) == 2


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped():
    """A 16-bit PNG (a depth-capable camera's export) keeps its picture: each value v becomes
    v / 257, where Pillow's RGB conversion would turn everything above 255 white."""
    import cv2

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 10, 3)).astype(np.uint8)
    for pixels in (rgb[..., ::-1].astype(np.uint16) * 257, rgb[..., 0].astype(np.uint16) * 257):  # BGR, and gray
        ok, png = cv2.imencode(".png", pixels)
        out = decode_image(png.tobytes())
        want = rgb if pixels.ndim == 3 else np.repeat(rgb[..., :1], 3, axis=2)
        assert out.dtype == np.uint8 and np.array_equal(out, want)


def test_metadata_keys_of_a_newer_export_are_named_not_dropped_silently(caplog):
    """A key this version does not know may change how the model must be fed; it is ignored, but
    the start says so."""
    props = {**ModelMetadata(256, 128, 512, **IMAGENET).to_props(), "reid.channel_order": '"BGR"', "other.key": "1"}
    with caplog.at_level("WARNING"):
        meta = ModelMetadata.from_props(props)
    assert (meta.input_height, meta.pixel_mean) == (256, IMAGENET["pixel_mean"])
    assert "model metadata holds reid.channel_order, which this version of reid does not know" in caplog.text
    assert "other.key" not in caplog.text  # not ours to judge
    caplog.clear()
    with caplog.at_level("WARNING"):
        ModelMetadata.from_props(ModelMetadata(256, 128, 512).to_props())
    assert caplog.text == ""
