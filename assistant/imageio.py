"""Safe image input for every surface (CLI, app, server, eval): one loader, one error type.

`load_image` turns whatever a user hands the assistant (a path, bytes, a stream, a PIL image or a
numpy array) into a fully decoded 8-bit RGB ``PIL.Image.Image``, or raises `ImageInputError` whose
message is one line naming the input and the reason, e.g. ``cannot read 'x.png': image data is
truncated``. `image_from_upload` is the stricter entry for bytes arriving over the network.

What the loader does, in order:

- refuses before decoding: missing files, directories, empty inputs, images whose header declares
  no pixels or more than ``max_pixels`` pixels (a decompression bomb: a few KB that decode to GBs).
  PIL's own bomb guard (``Image.MAX_IMAGE_PIXELS``, left untouched) still applies on top, so the
  limit is the smaller of the two; whichever check fires, the message is the same one, naming the
  image's pixel count and that limit;
- decodes the whole first frame (``img.load()``), so truncated files fail here instead of coming
  back half grey (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never enabled);
- applies the EXIF orientation, so the pixels are the way the picture is meant to be seen;
- converts to RGB: transparency (LA, PA, RGBA, P with a transparent colour, H×W×4 arrays) is
  composited on white; 16-bit and 32-bit grey data is scaled to 8 bits as `to_uint8` documents.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

#: formats `image_from_upload` accepts unless told otherwise
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
#: PIL reports many camera JPEGs (those with a multi-picture index) as "MPO": they are JPEGs
_FORMAT_ALIASES = {"JPEG": ("MPO",)}
#: pixel modes whose alpha channel is composited on white
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
#: grey modes deeper than 8 bits, scaled by `to_uint8` rather than clipped by ``convert``
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_WHITE = (255, 255, 255)


class ImageInputError(ValueError):
    """An input that cannot be used as an image; ``str(error)`` is one line.

    `name` says which input (a quoted path, or a placeholder such as ``<bytes>``) and `reason`
    why, so that an app can show the reason alone.
    """

    def __init__(self, name: str, reason: str):
        name, reason = (" ".join(str(text).split()) for text in (name, reason))
        super().__init__(name, reason)  # both in args: the error pickles across processes
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read {self.name}: {self.reason}"


def load_image(source, *, max_pixels: int = 64_000_000, name: str | None = None) -> Image.Image:
    """Decode `source` into a new RGB image, or raise `ImageInputError`.

    `source` is a path (``str`` or ``os.PathLike``), ``bytes``, a binary file-like object (read from
    its current position), a ``PIL.Image.Image`` or a numpy array (H×W, H×W×1, H×W×3 or H×W×4 of
    uint8, uint16, bool, other integers in 0..65535, or floats in [0, 1]). Animated images give
    their first frame. `name` labels the input in error messages instead of its path or a
    placeholder such as ``<bytes>`` (useful for bytes whose file name is known). The result never
    shares memory with `source`, and `source` is left as it was (a stream is read to its end).
    """
    label = repr(str(name)) if name is not None else _default_label(source)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), label, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(source), label, max_pixels)
    if isinstance(source, Image.Image):
        return _load_pil(source, label, max_pixels)
    if isinstance(source, np.ndarray):
        return _load_array(source, label, max_pixels)
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{label} must be opened in binary mode, read() gave {type(data).__name__}")
        return _load_bytes(bytes(data), label, max_pixels)
    raise TypeError(
        "an image source is a path, bytes, a binary file object, a PIL image or a numpy array, "
        f"not {type(source).__name__}"
    )


def image_from_upload(
    data: bytes,
    *,
    max_bytes: int,
    allowed_formats: Sequence[str] = UPLOAD_FORMATS,
    max_pixels: int = 64_000_000,
    name: str | None = None,
) -> Image.Image:
    """Decode uploaded bytes for the app or the server, trusting nothing the client says.

    The size is capped at `max_bytes` before anything else, and the format is the one the bytes
    themselves have: only PIL's decoders for `allowed_formats` ever look at them, so a file name
    or extension plays no part (`name` only labels error messages). "JPEG" admits camera JPEGs
    that PIL reports as "MPO". Raises `ImageInputError`, or ``ValueError`` for a format name PIL
    does not know.
    """
    label = repr(name) if name else "<upload>"
    formats = _pil_formats(allowed_formats)
    size = len(data)
    if size == 0:
        raise ImageInputError(label, "upload is empty")
    if size > max_bytes:
        raise ImageInputError(label, f"upload is {size:,} bytes, over the limit of {max_bytes:,}")
    unknown = f"not a {', '.join(fmt.upper() for fmt in allowed_formats)} image"
    return _decode(io.BytesIO(bytes(data)), label, max_pixels, formats=formats, unknown=unknown)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale deep grey (or multichannel) data to uint8, keeping its contrast.

    - integer data within 0..65535 that spans at least half of that range (a full-range 16-bit
      image), or is constant, is divided by 257: the exact map of 0..65535 onto 0..255, which keeps
      absolute levels comparable between images;
    - other integer data (12-bit sensor data in a 16-bit container, depth maps, 32-bit or negative
      values) is stretched from its own [min, max] onto 0..255: dividing 12-bit data by 257 would
      leave 16 grey levels;
    - float data within [0, 1] is multiplied by 255; other float data is stretched like the
      integers; NaN and infinities become 0.

    All channels share one scale, so colour balance is kept.
    """
    values = np.asarray(values)
    is_float = np.issubdtype(values.dtype, np.floating)
    finite = np.isfinite(values) if is_float else np.ones(values.shape, dtype=bool)
    data = values.astype(np.float64)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if is_float and lo >= 0.0 and hi <= 1.0:
        scaled = data * 255.0
    elif not is_float and lo >= 0 and hi <= 65535 and (hi - lo >= 32768 or hi == lo):
        scaled = data / 257.0
    elif hi > lo:
        scaled = (data - lo) * (255.0 / (hi - lo))
    else:  # constant float data outside [0, 1]: no contrast to keep
        scaled = np.zeros_like(data)
    scaled[~finite] = 0.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _load_path(path: Path, label: str, max_pixels: int) -> Image.Image:
    """Refuse what is not a non-empty readable file, then decode it from disk."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageInputError(label, "no such file") from None
    except OSError as exc:
        raise ImageInputError(label, exc.strerror or str(exc)) from None
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise ImageInputError(label, f"invalid path ({exc})") from None
    if path.is_dir():
        raise ImageInputError(label, "is a directory, not an image file")
    if stat.st_size == 0:
        raise ImageInputError(label, "file is empty")
    try:
        with path.open("rb") as file:
            return _decode(file, label, max_pixels)
    except OSError as exc:  # opening failed: permissions, a special file
        raise ImageInputError(label, exc.strerror or str(exc)) from None


def _load_bytes(data: bytes, label: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageInputError(label, "no data (0 bytes)")
    return _decode(io.BytesIO(data), label, max_pixels)


def _load_pil(image: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Normalise an image someone else opened; it may still be lazy, so decode it here."""
    _check_size(image.size, label, max_pixels)
    with _pil_errors(label, max_pixels):
        image.load()
        return _to_rgb(image, label)


def _load_array(array: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    """An H×W(×1/3/4) array of uint8, uint16, bool, small integers or floats in [0, 1] to RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageInputError(label, f"expected an H×W, H×W×1, H×W×3 or H×W×4 array, got shape {array.shape}")
    height, width = array.shape[:2]
    _check_size((width, height), label, max_pixels)
    pixels = _array_to_uint8(array, label)  # always a fresh array: the image never shares memory with the input
    if pixels.ndim == 2:
        return Image.fromarray(pixels).convert("RGB")
    image = Image.fromarray(pixels)
    return _flatten_alpha(image) if image.mode == "RGBA" else image


def _array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    """A new uint8 array: bool as 0/255, uint16 through `to_uint8`, other integers as 8-bit data
    when they fit 0..255 (else through `to_uint8`), floats in [0, 1] times 255."""
    dtype = array.dtype
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if dtype == np.uint8:
        return array.copy()
    if dtype == np.uint16:
        return to_uint8(array)
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if 0 <= lo and hi <= 255:
            return array.astype(np.uint8)
        if 0 <= lo and hi <= 65535:
            return to_uint8(array)
        raise ImageInputError(label, f"integer values must lie in 0..65535, got {lo}..{hi}")
    if np.issubdtype(dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError(label, "float array holds NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageInputError(label, f"float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        return np.rint(array * 255.0).astype(np.uint8)
    raise ImageInputError(label, f"unsupported array dtype {dtype}")


def _decode(
    file, label: str, max_pixels: int, *, formats: Sequence[str] | None = None, unknown: str | None = None
) -> Image.Image:
    """Open `file` with PIL, check the header's size, decode the first frame fully, convert to RGB."""
    with _pil_errors(label, max_pixels, unknown=unknown):
        with Image.open(file, formats=formats) as image:
            _check_size(image.size, label, max_pixels)  # header only: nothing decoded yet
            image.load()
            return _to_rgb(image, label)


@contextmanager
def _pil_errors(label: str, max_pixels: int, *, unknown: str | None = None) -> Iterator[None]:
    """Turn whatever PIL raises while identifying or decoding into one `ImageInputError`.

    PIL's decoders raise a zoo of types (OSError, SyntaxError, EOFError, struct.error, zlib.error,
    IndexError, ...), so past the specific cases every ``Exception`` is a bad input here.
    ``warnings.catch_warnings`` swaps the process-wide filters: two threads loading at once may
    briefly see each other's filters, which at worst lets PIL's bomb warning print instead of
    fail; the header check against ``max_pixels`` is unaffected.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except ImageInputError:
            raise
        except UnidentifiedImageError as exc:
            raise ImageInputError(label, unknown or "not a recognised image format") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))  # PIL names the count, not the size
            pixels = int(found.group(1)) if found else None
            raise ImageInputError(label, _too_many_pixels(pixels, max_pixels)) from exc
        except MemoryError as exc:
            raise ImageInputError(label, "not enough memory to decode the image") from exc
        except Exception as exc:  # noqa: BLE001 - see the docstring
            text = " ".join(str(exc).split()) or type(exc).__name__
            if "truncat" in text.lower():
                raise ImageInputError(label, "image data is truncated") from exc
            raise ImageInputError(label, f"image data is corrupt ({type(exc).__name__}: {text})") from exc


def _check_size(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageInputError(label, f"image has no pixels ({width}×{height})")
    if width * height > pixel_limit(max_pixels):
        raise ImageInputError(label, _too_many_pixels(width * height, max_pixels))


def pixel_limit(max_pixels: int) -> int:
    """The limit in force: `max_pixels`, or PIL's own bomb limit when that is lower."""
    return min(max_pixels, Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else max_pixels


def _too_many_pixels(pixels: int | None, max_pixels: int) -> str:
    """The one message for an image over the pixel limit, whether this module's check or PIL's fired."""
    count = f"{pixels:,} pixels" if pixels is not None else "more pixels than allowed"
    return f"image is {count}, over the limit of {pixel_limit(max_pixels):,} pixels (possible decompression bomb)"


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """A new RGB image from a decoded one: EXIF orientation applied, alpha on white, deep data scaled."""
    image = _apply_orientation(image)
    if image.mode in _DEEP_MODES:
        return Image.fromarray(to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _flatten_alpha(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageInputError(label, f"unsupported pixel mode {image.mode!r}") from exc


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate or flip as the EXIF orientation says; no copy when there is nothing to do."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is metadata lost, the pixels are intact
        return image
    if orientation not in range(2, 9):
        return image
    return ImageOps.exif_transpose(image)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite an RGBA image on white and drop the alpha channel."""
    background = Image.new("RGBA", image.size, _WHITE + (255,))
    return Image.alpha_composite(background, image).convert("RGB")


def _pil_formats(allowed_formats: Sequence[str]) -> list[str]:
    """PIL format names for `allowed_formats`, aliases included; unknown names are a ValueError."""
    Image.init()
    formats = []
    for name in allowed_formats:
        name = name.upper()
        if name not in Image.OPEN:
            raise ValueError(f"PIL cannot open the image format {name!r}")
        formats += [name, *(alias for alias in _FORMAT_ALIASES.get(name, ()) if alias in Image.OPEN)]
    return formats


def _default_label(source) -> str:
    """How error messages name `source`: a quoted path or file name, else a placeholder."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fsdecode(source))
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return repr(filename) if filename else "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, np.ndarray):
        return "<array>"
    filename = getattr(source, "name", None)
    return repr(os.fsdecode(filename)) if isinstance(filename, (str, bytes, os.PathLike)) else "<stream>"
