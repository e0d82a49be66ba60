"""Evidence overlays, anomalib-style: a heatmap over the image, mask contours, boxes, a verdict strip.

Everything is numpy + PIL: the jet-like colormap is a 256-entry lookup table, contours come from a
scipy binary erosion, boxes and labels are drawn with ``PIL.ImageDraw`` and PIL's built-in font.
Inputs are never modified; every function returns a new image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from assistant.imageio import load_image

#: colormap anchors (position, RGB): dark blue → blue → cyan → yellow → red → dark red, like jet
_JET_ANCHORS = (
    (0.000, (0, 0, 143)),
    (0.125, (0, 0, 255)),
    (0.375, (0, 255, 255)),
    (0.625, (255, 255, 0)),
    (0.875, (255, 0, 0)),
    (1.000, (200, 0, 0)),
)
CONTOUR_COLOUR = (0, 255, 0)
BOX_COLOUR = (255, 0, 255)
_LABEL_TEXT = (0, 0, 0)
_TITLE_BACKGROUND = (32, 32, 32)
_TITLE_TEXT = (255, 255, 255)


@lru_cache(maxsize=1)
def jet_lut() -> np.ndarray:
    """The colormap: a read-only 256×3 uint8 table, index 0 blue (normal) to 255 red (anomalous)."""
    positions = np.linspace(0.0, 1.0, 256)
    anchors = np.array([position for position, _ in _JET_ANCHORS])
    colours = np.array([colour for _, colour in _JET_ANCHORS], dtype=np.float64)
    table = np.stack([np.interp(positions, anchors, colours[:, c]) for c in range(3)], axis=1)
    table = np.rint(table).astype(np.uint8)
    table.flags.writeable = False
    return table


def heatmap_rgb(anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Colour an H×W anomaly map: an H×W×3 uint8 array, `vmin` and below blue, `vmax` and above red."""
    levels = _levels(_as_map(anomaly_map), vmin, vmax)
    return jet_lut()[_lut_index(levels)]


def overlay(
    image,
    anomaly_map: np.ndarray | None,
    mask: np.ndarray | None = None,
    boxes: list[dict] | None = None,
    alpha: float = 0.45,
    title: str | None = None,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Image.Image:
    """The evidence picture: `image` with the heatmap, the mask's contour, boxes and a title strip.

    `image` is anything `assistant.imageio.load_image` accepts (converted the same way as for
    analysis). The map is resized to the image (bilinear) when its shape differs, coloured with
    `jet_lut` between `vmin` and `vmax`, and blended with an opacity that grows with the map value
    up to `alpha`, so normal regions keep the image as it is and hot regions turn red. The mask
    (resized with nearest neighbour if needed) is outlined by its inner boundary, 1 px thick, 2 px
    on images of 512 px and more. `boxes` are ``{"box": [x0, y0, x1, y1], "score": s}`` in image
    pixels with exclusive x1/y1, as `assistant.localize.boxes_from_mask` gives them; each is
    outlined and labelled with its score when the label fits. A `title` (e.g. "ANOMALOUS 0.93")
    goes in a strip above the image, which makes the result taller than the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    base = load_image(image)
    width, height = base.size
    pixels = np.array(base, dtype=np.float32)
    if anomaly_map is not None:
        levels = _resize_levels(_levels(_as_map(anomaly_map), vmin, vmax), width, height)
        opacity = (alpha * levels)[:, :, None]
        pixels = pixels * (1.0 - opacity) + jet_lut()[_lut_index(levels)] * opacity
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    thickness = 2 if max(width, height) >= 512 else 1
    if mask is not None:
        pixels[mask_boundary(_resize_mask(mask, width, height), thickness)] = CONTOUR_COLOUR
    result = Image.fromarray(pixels)
    if boxes:
        _draw_boxes(result, boxes, thickness)
    if title:
        result = _add_title(result, title)
    return result


def side_by_side(image, overlay_image, gap: int = 4) -> Image.Image:
    """The image and its overlay next to each other on white, bottoms aligned, for galleries.

    Bottom alignment lines the pixels up when the overlay carries a title strip on top.
    """
    left, right = load_image(image), load_image(overlay_image)
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + gap + right.width, height), (255, 255, 255))
    canvas.paste(left, (0, height - left.height))
    canvas.paste(right, (left.width + gap, height - right.height))
    return canvas


def mask_boundary(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The mask pixels within `thickness` pixels of the background (4-connectivity).

    Pixels on the image border count as next to the background, so a region touching the edge
    is closed there too.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    interior = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~interior


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    """A float32 H×W copy of a map given as H×W, 1×H×W or H×W×1."""
    return _squeeze_2d(np.array(anomaly_map, dtype=np.float32), "an anomaly map")


def _squeeze_2d(values: np.ndarray, what: str) -> np.ndarray:
    """Drop a leading or trailing singleton axis of a 3-D array; insist on a non-empty 2-D result."""
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    elif values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"{what} is a non-empty H×W array, got shape {values.shape}")
    return values


def _levels(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values to [0, 1] between `vmin` and `vmax`; NaN counts as `vmin`."""
    if not vmax > vmin:
        raise ValueError(f"vmax must exceed vmin, got vmin={vmin}, vmax={vmax}")
    levels = (values.astype(np.float32) - vmin) / (vmax - vmin)
    return np.clip(np.nan_to_num(levels, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _lut_index(levels: np.ndarray) -> np.ndarray:
    return np.rint(levels * 255).astype(np.uint8)


def _resize_levels(levels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Levels in [0, 1] resized to the image, bilinear (PIL's float "F" mode)."""
    if levels.shape == (height, width):
        return levels
    resized = Image.fromarray(np.ascontiguousarray(levels, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A boolean H×W mask at the image size (nearest neighbour)."""
    mask = _squeeze_2d(np.asarray(mask).astype(bool), "a mask")
    if mask.shape == (height, width):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def _draw_boxes(image: Image.Image, boxes: list[dict], thickness: int) -> None:
    """Outline each box in place on `image` (our own copy) and label it with its score."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    font = _font(max(10, min(width, height) // 25))
    for entry in boxes:
        x0, y0, x1, y1 = (int(round(float(v))) for v in entry["box"])
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=thickness)
        score = entry.get("score")
        if score is not None:
            _draw_label(draw, f"{float(score):.2f}", font, (x0, y0), (width, height), thickness)


def _draw_label(draw: ImageDraw.ImageDraw, text: str, font, corner: tuple[int, int], size, thickness: int):
    """A filled label just above the box corner, or just inside it when there is no room above."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 1
    label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
    width, height = size
    if label_w > width or label_h > height:
        return  # an image smaller than the label: the outline alone says it
    x0, y0 = corner
    x = min(x0, width - label_w)
    y = y0 - label_h if y0 >= label_h else min(y0 + thickness, height - label_h)
    draw.rectangle((x, y, x + label_w - 1, y + label_h - 1), fill=BOX_COLOUR)
    draw.text((x + pad - left, y + pad - top), text, fill=_LABEL_TEXT, font=font)


def _add_title(image: Image.Image, title: str) -> Image.Image:
    """A new image: a dark strip with `title` in white, then `image` below it."""
    width, height = image.size
    font = _font(min(32, max(10, width // 20)))
    probe = ImageDraw.Draw(image)
    left, top, _, bottom = probe.textbbox((0, 0), title, font=font)
    pad = max(2, (bottom - top) // 4)
    strip = bottom - top + 2 * pad
    canvas = Image.new("RGB", (width, height + strip), _TITLE_BACKGROUND)
    canvas.paste(image, (0, strip))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), title, fill=_TITLE_TEXT, font=font)
    return canvas


def _font(size: int):
    """PIL's built-in scalable font at `size` px; its fixed bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError, TypeError):  # no FreeType, or Pillow < 10.1 without `size`
        return ImageFont.load_default()
