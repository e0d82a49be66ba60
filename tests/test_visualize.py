"""Evidence overlays: what a user sees must sit where the evidence is."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from assistant.localize import boxes_from_mask, mask_from_map
from assistant.visualize import BOX_COLOUR, CONTOUR_COLOUR, heatmap_rgb, jet_lut, overlay, side_by_side

GREY = (128, 128, 128)


def grey_image(width: int = 64, height: int = 64) -> Image.Image:
    return Image.new("RGB", (width, height), GREY)


def hot_square(width: int = 64, height: int = 64, box=(20, 24, 36, 40)) -> np.ndarray:
    """A map that is 0 everywhere but 1 on the box [x0, y0, x1) × [y0, y1)."""
    values = np.zeros((height, width), dtype=np.float32)
    x0, y0, x1, y1 = box
    values[y0:y1, x0:x1] = 1.0
    return values


def coloured(image: Image.Image, colour) -> np.ndarray:
    return np.all(np.asarray(image) == np.array(colour, dtype=np.uint8), axis=-1)


def test_colormap_runs_blue_cyan_yellow_red():
    table = jet_lut()
    assert table.shape == (256, 3) and table.dtype == np.uint8 and not table.flags.writeable
    blue, cyan, yellow, red = (table[i].astype(int) for i in (16, 96, 160, 224))
    assert blue[2] > 180 and blue[0] < 30
    assert cyan[1] > 200 and cyan[2] > 200 and cyan[0] < 50
    assert yellow[0] > 200 and yellow[1] > 200 and yellow[2] < 50
    assert red[0] > 200 and red[1] < 50 and red[2] < 50


def test_heatmap_rgb_scales_between_vmin_and_vmax():
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]])
    colours = heatmap_rgb(values)
    assert colours.shape == (1, 6, 3) and colours.dtype == np.uint8
    table = jet_lut()
    assert (colours[0, 0] == table[0]).all() and (colours[0, 2] == table[255]).all()
    assert (colours[0, 3] == table[255]).all()  # above vmax
    assert (colours[0, 4] == table[0]).all() and (colours[0, 5] == table[0]).all()  # below vmin, NaN
    assert (heatmap_rgb(values * 10, vmin=0, vmax=10) == colours).all()
    with pytest.raises(ValueError):
        heatmap_rgb(values, vmin=1, vmax=1)


def test_overlay_keeps_size_turns_hot_red_and_leaves_cold_alone():
    image, values = grey_image(), hot_square()
    result = overlay(image, values)
    assert result.size == image.size and result.mode == "RGB"
    pixels = np.asarray(result).astype(int)
    red, green, blue = pixels[30, 28]
    assert red > green + 60 and red > blue + 60
    cold = values == 0
    assert (pixels[cold] == GREY).all()


def test_overlay_resizes_a_small_map_to_the_image():
    values = hot_square(16, 16, box=(8, 0, 16, 8))  # hot top-right quarter
    pixels = np.asarray(overlay(grey_image(64, 48), values)).astype(int)
    assert pixels.shape == (48, 64, 3)
    assert pixels[5, 60, 0] > pixels[5, 60, 1] + 60  # top right is hot
    assert (pixels[40, 5] == GREY).all()  # bottom left untouched


def ring(height: int, width: int, box, thickness: int) -> np.ndarray:
    """The expected contour of a filled box: the box minus the box shrunk by `thickness`."""
    x0, y0, x1, y1 = box
    expected = np.zeros((height, width), dtype=bool)
    expected[y0:y1, x0:x1] = True
    expected[y0 + thickness : y1 - thickness, x0 + thickness : x1 - thickness] = False
    return expected


@pytest.mark.parametrize("size, thickness", [(64, 1), (600, 2)])
def test_mask_contour_lies_exactly_on_the_boundary(size, thickness):
    box = (size // 4, size // 3, size // 2, size // 2 + 7)
    values = hot_square(size, size, box)
    mask = mask_from_map(values, 0.5)
    result = overlay(grey_image(size, size), values, mask=mask)
    assert (coloured(result, CONTOUR_COLOUR) == ring(size, size, box, thickness)).all()


def test_contour_closes_along_the_image_border_and_follows_a_resized_mask():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True  # top-left quarter, touching two image edges
    result = overlay(grey_image(32, 32), None, mask=mask)
    assert (coloured(result, CONTOUR_COLOUR) == ring(32, 32, (0, 0, 16, 16), 1)).all()


def test_boxes_are_outlined_at_their_coordinates_with_a_score_label():
    values = hot_square(100, 80, box=(30, 40, 60, 70))
    boxes = boxes_from_mask(mask_from_map(values, 0.5), values)
    assert boxes == [{"box": [30, 40, 60, 70], "score": 1.0, "center": [45.0, 55.0]}]
    result = overlay(grey_image(100, 80), values, boxes=boxes)
    outline = coloured(result, BOX_COLOUR)
    x0, y0, x1, y1 = boxes[0]["box"]
    assert outline[y0:y1, x0].all() and outline[y0:y1, x1 - 1].all()
    assert outline[y0, x0:x1].all() and outline[y1 - 1, x0:x1].all()
    assert not outline[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].any()  # hollow
    assert not outline[y0:y1, x1].any() and not outline[y1, x0:x1].any()  # exclusive x1/y1
    label = np.asarray(result)[:y0, x0 : x1 + 20]
    assert coloured(Image.fromarray(label), BOX_COLOUR).sum() > 20  # label above the box
    assert (label.max(axis=-1) < 60).sum() > 5  # with dark (antialiased) text in it


def test_box_at_the_top_edge_gets_its_label_inside_and_boxes_outside_are_clipped():
    boxes = [{"box": [10, 0, 70, 50], "score": 0.5}, {"box": [-20, 55, 300, 90]}]
    result = overlay(grey_image(80, 60), None, boxes=boxes)
    outline = coloured(result, BOX_COLOUR)
    assert outline[0, 10:70].all() and outline[0:50, 69].all()
    assert outline[55, 0:80].all() and outline[55:60, 79].all()


def test_title_strip_sits_above_the_overlay():
    image = grey_image(200, 100)
    plain = overlay(image, hot_square(200, 100))
    titled = overlay(image, hot_square(200, 100), title="ANOMALOUS 0.93")
    strip = titled.height - image.height
    assert titled.width == image.width and 8 < strip < 60
    assert np.array_equal(np.asarray(titled)[strip:], np.asarray(plain))
    assert (np.asarray(titled)[:strip] > 200).all(axis=-1).any()  # white text on the dark strip


def test_inputs_are_not_changed():
    image = Image.new("RGBA", (40, 30), (10, 200, 30, 255))
    values = hot_square(40, 30, box=(5, 5, 20, 20))
    mask = values > 0.5
    boxes = boxes_from_mask(mask, values)
    before = (image.tobytes(), image.mode, values.copy(), mask.copy(), copy.deepcopy(boxes))
    result = overlay(image, values, mask=mask, boxes=boxes, title="ANOMALOUS 1.00")
    assert (image.tobytes(), image.mode) == before[:2]
    assert np.array_equal(values, before[2]) and np.array_equal(mask, before[3]) and boxes == before[4]
    assert result is not image


def test_tiny_and_large_images():
    boxes = [{"box": [0, 0, 1, 1], "score": 0.9}]
    one = np.ones((1, 1))
    tiny = overlay(Image.new("RGB", (1, 1)), one, mask=one > 0, boxes=boxes, title="ANOMALOUS 0.90")
    assert tiny.width == 1 and tiny.height > 1
    assert overlay(Image.new("RGB", (1, 1)), np.ones((7, 7))).size == (1, 1)
    wide = overlay(Image.new("RGB", (4000, 3)), np.zeros((3, 4000)), title="NORMAL 0.01")
    assert wide.width == 4000
    large = overlay(Image.new("RGB", (2000, 1500)), np.random.default_rng(0).random((64, 64)))
    assert large.size == (2000, 1500)


def test_side_by_side_lines_up_bottoms():
    image = grey_image(50, 40)
    titled = overlay(image, hot_square(50, 40, box=(1, 1, 5, 5)), title="ANOMALOUS 0.70")
    pair = side_by_side(image, titled)
    assert pair.size == (50 + 4 + 50, titled.height)
    pixels = np.asarray(pair)
    assert (pixels[-40:, :50] == GREY).all()
    assert np.array_equal(pixels[-40:, 54:], np.asarray(titled)[-40:])
    assert (pixels[: titled.height - 40, :50] == 255).all()  # white above the shorter image
