"""Checking that image files exist and can be decoded."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    """True for a regular file whose suffix is a common image suffix (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_problem(path: str | Path, full: bool = False) -> str | None:
    """Why `path` is not a usable image, or None when it is.

    The cheap check opens the header (size, mode); ``full=True`` decodes every pixel, which also
    catches truncated files.
    """
    return _checked(path, full)[0]


def _checked(path: str | Path, full: bool) -> tuple[str | None, tuple[int, int] | None]:
    """(`image_problem`, (width, height) when readable), from one opening of the file."""
    path = Path(path)
    if not path.exists():
        return "file not found", None
    if not path.is_file():
        return "not a file", None
    try:
        with Image.open(path) as image:
            if full:
                image.load()
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"unreadable image ({type(error).__name__}: {error})".rstrip(), None
    if width == 0 or height == 0:
        return "empty image", (width, height)
    return None, (width, height)


def pair_problem(image: str | Path, mask: str | Path | None, full: bool = False) -> str | None:
    """Why an (image, mask) pair is unusable: either file unreadable, or sizes that differ."""
    reason, size = _checked(image, full)  # each file opened once (the header check of 32,000 pairs: half the time)
    if reason is not None:
        return f"image {Path(image).name}: {reason}"
    if mask is None:
        return None
    reason, mask_size = _checked(mask, full)
    if reason is not None:
        return f"mask {Path(mask).name}: {reason}"
    if size != mask_size:
        return f"mask size {mask_size} differs from image size {size}"
    return None


#: a full check of at least this many images decodes them in one process per core (`data_prep.parallel`)
PARALLEL_CHECK_FROM = 2000


def pair_problems(pairs: list, full: bool = False) -> list[str | None]:
    """`pair_problem` of each (image, mask) pair, in order. A full check of `PARALLEL_CHECK_FROM` pairs or more
    runs in one process per core: decoding every pixel is most of it (the default model's 32,000 images and
    19,200 masks: 20 s against 29 s in one process on 2 cores)."""
    from .parallel import default_workers, ordered_map

    workers = default_workers() if full and len(pairs) >= PARALLEL_CHECK_FROM else 1
    return list(ordered_map(lambda pair: pair_problem(pair[0], pair[1], full), pairs, workers, chunksize=256))
