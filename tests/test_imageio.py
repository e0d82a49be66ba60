"""Safe image input: every bad or odd image is built here, in tmp_path or in memory."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from assistant.imageio import ImageInputError, image_from_upload, load_image, to_uint8


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG that is all header: IHDR declaring width×height (8-bit RGB), no pixel data, IEND."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def read_error(source, **kwargs) -> str:
    """The message of the ImageInputError that loading `source` raises; it must be one line."""
    with pytest.raises(ImageInputError) as caught:
        load_image(source, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot read ")
    return message


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- files that are not images -------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path):
    message = read_error(tmp_path / "nope.png")
    assert "nope.png" in message and "no such file" in message


def test_directory(tmp_path):
    assert "directory" in read_error(tmp_path)


def test_empty_file(tmp_path):
    message = read_error(write(tmp_path, "empty.png", b""))
    assert "empty.png" in message and "empty" in message.split(":", 1)[1]


def test_corrupt_bytes(tmp_path):
    message = read_error(write(tmp_path, "junk.jpg", np.random.default_rng(1).bytes(4096)))
    assert "junk.jpg" in message and "not a recognised image format" in message


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'


@pytest.mark.parametrize("name, data", [("notes.png", b"just some text\n" * 20), ("logo.svg", SVG)])
def test_unsupported_formats(tmp_path, name, data):
    message = read_error(write(tmp_path, name, data))
    assert name in message and "not a recognised image format" in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_raise_instead_of_half_grey(tmp_path, fmt):
    data = encode(noise(), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    message = read_error(path)
    assert "cut." in message and "truncated" in message


def test_bad_pixel_data_is_reported_as_corrupt(tmp_path):
    data = bytearray(encode(noise(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 200] = bytes(200)  # zlib stream broken, chunk CRC now wrong
    message = read_error(write(tmp_path, "broken.png", bytes(data)))
    assert "broken.png" in message and ("corrupt" in message or "truncated" in message)


def test_error_pickles_and_stays_one_line(tmp_path):
    message = read_error(tmp_path / "two\nlines.png")
    assert "two\\nlines.png" in message
    with pytest.raises(ImageInputError) as caught:
        load_image(tmp_path / "x.png")
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value) and again.reason == "no such file"
    assert isinstance(again, ValueError)


# --- decompression bombs and empty images ----------------------------------------------------------


def test_bomb_beyond_pils_hard_limit(tmp_path):
    message = read_error(write(tmp_path, "bomb.png", png_header(100_000, 100_000)))
    assert "bomb.png" in message and "decompression bomb" in message


def test_header_over_max_pixels_is_refused_before_decoding(tmp_path):
    max_before = Image.MAX_IMAGE_PIXELS
    path = write(tmp_path, "big.png", png_header(9000, 9000))  # 81 Mpx: under PIL's limit, over ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning (or any other) may leak out
        message = read_error(path)
        # a header claiming 100 Mpx trips PIL's warning: it becomes our error, not a printed warning
        assert "decompression bomb" in read_error(png_header(10_000, 10_000))
    # refused on the header: decoding this pixel-less file would have said "truncated"
    assert "81,000,000 pixels" in message and "limit of 64,000,000" in message
    assert Image.MAX_IMAGE_PIXELS == max_before


def test_max_pixels_applies_to_every_source():
    image = noise(20, 20)
    for source in (encode(image, "PNG"), image, np.asarray(image)):
        assert "over the limit of 100" in read_error(source, max_pixels=100)
    assert load_image(image, max_pixels=400).size == (20, 20)


def test_zero_pixel_images(tmp_path):
    read_error(write(tmp_path, "zero.png", png_header(0, 5)))  # PIL does not identify it at all
    assert "no pixels" in read_error(Image.new("RGB", (0, 5)))
    assert "no pixels" in read_error(np.zeros((0, 4), dtype=np.uint8))


# --- pixel modes --------------------------------------------------------------------------------------


def pixel(image: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel((x, y))


def test_grey_and_bilevel(tmp_path):
    grey = Image.new("L", (3, 2), 77)
    assert pixel(load_image(write(tmp_path, "grey.png", encode(grey, "PNG")))) == (77, 77, 77)
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((1, 1), 1)
    result = load_image(write(tmp_path, "bits.png", encode(bilevel, "PNG")))
    assert pixel(result) == (0, 0, 0) and pixel(result, 1, 1) == (255, 255, 255)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    result = load_image(write(tmp_path, "rgba.png", encode(rgba, "PNG")))
    assert pixel(result, 0) == (255, 0, 0)
    assert pixel(result, 1) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in pixel(result, 2))

    grey_alpha = Image.new("LA", (2, 1), (10, 0))
    assert pixel(load_image(grey_alpha)) == (255, 255, 255)

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    result = load_image(write(tmp_path, "palette.png", encode(palette, "PNG", transparency=0)))
    assert pixel(result, 0) == (255, 255, 255) and pixel(result, 1) == (200, 0, 0)


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    result = load_image(write(tmp_path, "cmyk.tif", encode(cmyk, "TIFF")))
    assert pixel(result) == (255, 0, 0)


def test_16bit_gradient_keeps_order_and_contrast(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"
    result = np.asarray(load_image(write(tmp_path, "deep.png", encode(image, "PNG"))))
    row = result[0, :, 0]
    assert np.all(np.diff(row.astype(int)) >= 0) and row[0] == 0 and row[-1] == 255
    assert (result[..., 0] == result[..., 2]).all()
    # full range: divided by 257, so absolute levels survive
    assert row[128] == round(float(gradient[0, 128]) / 257)


def test_12bit_data_in_16bit_container_is_stretched(tmp_path):
    gradient = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # 256 levels in 0..4080
    result = np.asarray(load_image(write(tmp_path, "sensor.png", encode(Image.fromarray(gradient), "PNG"))))
    row = result[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) > 0)  # 256 distinct levels, not 16


def test_big_endian_32bit_and_float_modes():
    values = np.tile(np.arange(0, 60000, 600, dtype=np.uint16), (2, 1))
    big_endian = Image.frombytes("I;16B", (values.shape[1], 2), values.astype(">u2").tobytes())
    row = np.asarray(load_image(big_endian))[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[-1] > 200

    signed = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert signed.mode == "I"
    assert np.asarray(load_image(signed))[0, :, 0].tolist() == [0, 128, 255]

    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-3.0, 7.0, np.nan]], dtype=np.float32))
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 255, 0]


def test_to_uint8_rules():
    assert to_uint8(np.array([0, 65535], dtype=np.uint16)).tolist() == [0, 255]
    assert to_uint8(np.array([1000, 1000], dtype=np.uint16)).tolist() == [4, 4]  # constant: /257
    assert to_uint8(np.array([100, 300], dtype=np.uint16)).tolist() == [0, 255]  # small range: stretched


# --- geometry and frames -----------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = stored.getexif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    result = load_image(write(tmp_path, "phone.jpg", encode(stored, "JPEG", exif=exif, quality=95)))
    assert result.size == (20, 40)
    top, bottom = pixel(result, 10, 5), pixel(result, 10, 35)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    assert result.getexif().get(0x0112, 1) == 1  # loading again does not rotate twice
    assert load_image(result).size == (20, 40)


@pytest.mark.parametrize("size", [(1, 1), (4000, 3), (3, 4000)])
def test_tiny_and_extreme_aspect_ratios(tmp_path, size):
    image = Image.new("RGB", size, (10, 20, 30))
    result = load_image(write(tmp_path, "odd.png", encode(image, "PNG")))
    assert result.size == size and pixel(result) == (10, 20, 30)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = load_image(write(tmp_path, "anim.gif", data))
    assert pixel(result) == (255, 0, 0)


# --- sources --------------------------------------------------------------------------------------------


def test_every_kind_of_source_gives_the_same_pixels(tmp_path):
    image = noise(16, 12)
    data = encode(image, "PNG")
    path = write(tmp_path, "same.png", data)
    stream = io.BytesIO(b"HEADER" + data)
    stream.seek(6)  # read from the current position, not from zero as PIL would
    expected = np.asarray(image)
    for source in (path, str(path), data, bytearray(data), memoryview(data), stream, image, expected):
        result = load_image(source)
        assert result.mode == "RGB" and np.array_equal(np.asarray(result), expected)
    with path.open("rb") as file:
        assert np.array_equal(np.asarray(load_image(file)), expected)
    assert "same.png" in read_error(io.BufferedReader(io.FileIO(write(tmp_path, "same.png", b"oops"))))


def test_inputs_are_not_changed_and_memory_not_shared():
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 0))
    result = load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (1, 2, 3, 0) and result is not rgba
    rgb = Image.new("RGB", (2, 2), (9, 9, 9))
    copy = load_image(rgb)
    copy.putpixel((0, 0), (0, 0, 0))
    assert rgb.getpixel((0, 0)) == (9, 9, 9)
    array = np.full((3, 3), 50, dtype=np.uint8)
    from_array = load_image(array)
    array[:] = 0
    assert pixel(from_array) == (50, 50, 50)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 2), 200, dtype=np.uint8), (200, 200, 200)),
        (np.full((2, 2, 1), 200, dtype=np.uint8), (200, 200, 200)),
        (np.tile(np.array([1, 2, 3], dtype=np.uint8), (2, 2, 1)), (1, 2, 3)),
        (np.tile(np.array([0, 0, 0, 0], dtype=np.uint8), (2, 2, 1)), (255, 255, 255)),
        (np.ones((2, 2), dtype=bool), (255, 255, 255)),
        (np.full((2, 2), 0.5), (128, 128, 128)),
        (np.array([[0, 65535], [0, 65535]], dtype=np.uint16), (0, 0, 0)),
        (np.full((2, 2), 7, dtype=np.int64), (7, 7, 7)),
    ],
)
def test_numpy_arrays(array, expected):
    assert pixel(load_image(array)) == expected


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.full((2, 2), 1.5), "[0, 1]"),
        (np.full((2, 2), np.nan), "NaN"),
        (np.zeros((2, 2, 2), dtype=np.uint8), "shape"),
        (np.zeros((1, 2, 2, 3), dtype=np.uint8), "shape"),
        (np.full((2, 2), -1, dtype=np.int32), "0..65535"),
        (np.zeros((2, 2), dtype=complex), "dtype"),
    ],
)
def test_bad_arrays(array, reason):
    message = read_error(array)
    assert "<array>" in message and reason in message


def test_unsupported_source_type_is_a_type_error():
    with pytest.raises(TypeError):
        load_image(42)
    with pytest.raises(TypeError):
        load_image(io.StringIO("text"))


# --- uploads --------------------------------------------------------------------------------------------


def upload_error(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageInputError) as caught:
        image_from_upload(data, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_upload_caps_bytes_before_decoding():
    data = encode(noise(), "PNG")
    assert image_from_upload(data, max_bytes=len(data)).size == (64, 48)
    message = upload_error(data, max_bytes=len(data) - 1, name="cat.png")
    assert "'cat.png'" in message and "over the limit" in message
    assert "empty" in upload_error(b"", max_bytes=10)


def test_upload_format_comes_from_the_bytes_not_the_name():
    bmp = encode(noise(8, 8), "BMP")
    message = upload_error(bmp, max_bytes=10**6, allowed_formats=("PNG",), name="looks_like.png")
    assert "not a PNG image" in message
    assert image_from_upload(bmp, max_bytes=10**6, name="looks_like.png").size == (8, 8)
    assert "not a PNG, JPEG" in upload_error(encode(noise(8, 8), "PPM"), max_bytes=10**6)
    assert "truncated" in upload_error(encode(noise(), "JPEG")[:500], max_bytes=10**6)
    assert "decompression bomb" in upload_error(png_header(100_000, 100_000), max_bytes=10**6)


def test_upload_accepts_camera_jpegs_that_pil_calls_mpo():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    result = image_from_upload(data, max_bytes=10**6, allowed_formats=("JPEG",))
    assert result.size == (8, 8) and result.getpixel((4, 4))[0] > 200


def test_upload_rejects_unknown_format_names():
    with pytest.raises(ValueError, match="NOPE"):
        image_from_upload(b"x", max_bytes=10, allowed_formats=("PNG", "nope"))


def test_one_message_and_one_limit_for_too_many_pixels_whichever_check_fires(tmp_path):
    # 81 Mpx: only this module's check; 100 Mpx: PIL's warning; 10,000 Mpx: PIL's error
    sizes = {(9000, 9000): 81_000_000, (10_000, 10_000): 100_000_000, (100_000, 100_000): 10_000_000_000}
    reasons = []
    for (width, height), pixels in sizes.items():
        path = write(tmp_path, f"big-{width}.png", png_header(width, height))
        with pytest.raises(ImageInputError) as caught:
            load_image(path)
        reasons.append(caught.value.reason)
        expected = f"image is {pixels:,} pixels, over the limit of 64,000,000 pixels (possible decompression bomb)"
        assert caught.value.reason == expected
        with pytest.raises(ImageInputError) as uploaded:
            image_from_upload(png_header(width, height), max_bytes=10**6)
        assert uploaded.value.reason == caught.value.reason
    assert "PIL" not in " ".join(reasons)
