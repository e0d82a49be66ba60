"""From an anomaly map to a mask, boxes and words: where the defect is.

One vocabulary of locations is shared by inference (`AnomalyReport.location`), the instruction-data
writer (`data_prep.instruct`) and the evaluation of location words, so that what the model is taught
is what it is scored on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

VERTICAL = ("upper", "middle", "lower")
HORIZONTAL = ("left", "center", "right")
#: every phrase `location_words` can return
LOCATION_WORDS = tuple("center" if (v, h) == ("middle", "center") else f"{v} {h}" for v in VERTICAL for h in HORIZONTAL)


def mask_from_map(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose anomaly probability reaches `threshold` (bool array, same shape)."""
    return np.asarray(anomaly_map) >= threshold


def boxes_from_mask(mask: np.ndarray, anomaly_map: np.ndarray | None = None, min_area: int = 1) -> list[dict]:
    """One box per connected region of `mask` (8-connectivity), largest score first.

    Each box is ``{"box": [x0, y0, x1, y1], "score": s, "center": [cx, cy]}`` in pixel coordinates
    with exclusive x1/y1 (so ``x1 - x0`` is the width); the score is the region's peak map value, or
    its area fraction when no map is given; the center is the region's centre of mass (pixel i spans
    [i, i + 1), so a one-pixel region at (2, 3) has center [2.5, 3.5]). The center, not the box's
    middle, is where `location_words` places a region: it is how a ground-truth mask is placed too.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    boxes = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        ys, xs = region
        component = labels[region] == index
        area = int(component.sum())
        if area < min_area:
            continue
        if anomaly_map is not None:
            score = float(np.asarray(anomaly_map)[region][component].max())
        else:
            score = area / mask.size
        cy, cx = ndimage.center_of_mass(component)
        center = [round(float(xs.start + cx + 0.5), 2), round(float(ys.start + cy + 0.5), 2)]
        boxes.append(
            {"box": [int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)], "score": score, "center": center}
        )
    boxes.sort(key=lambda b: b["score"], reverse=True)
    return boxes


def location_words(mask_or_box, width: int | None = None, height: int | None = None) -> str:
    """Plain-words position of a defect on a 3×3 grid: "upper left", "center", "lower right", ...

    Takes a boolean mask (its centre of mass is used), or a box ``[x0, y0, x1, y1]`` (its middle) or a point
    ``[x, y]`` in pixels together with the image's `width` and `height`. Returns "" for an empty mask.
    """
    if isinstance(mask_or_box, (list, tuple)) and len(mask_or_box) in (2, 4) and np.ndim(mask_or_box) == 1:
        if width is None or height is None:
            raise ValueError("a box or point needs the image width and height")
        values = [float(v) for v in mask_or_box]
        x, y = (
            (values[0], values[1]) if len(values) == 2 else ((values[0] + values[2]) / 2, (values[1] + values[3]) / 2)
        )
        cx, cy = x / width, y / height
    else:
        mask = np.asarray(mask_or_box, dtype=bool)
        if not mask.any():
            return ""
        height, width = mask.shape
        cy, cx = ndimage.center_of_mass(mask)
        cx, cy = (cx + 0.5) / width, (cy + 0.5) / height
    v = VERTICAL[min(int(cy * 3), 2)]
    h = HORIZONTAL[min(int(cx * 3), 2)]
    return "center" if (v, h) == ("middle", "center") else f"{v} {h}"


def relative_size(mask: np.ndarray) -> str:
    """Size of a defect relative to the image, in words: "tiny", "small", "medium" or "large"."""
    fraction = float(np.asarray(mask, dtype=bool).mean())
    if fraction < 0.005:
        return "tiny"
    if fraction < 0.03:
        return "small"
    if fraction < 0.12:
        return "medium"
    return "large"
