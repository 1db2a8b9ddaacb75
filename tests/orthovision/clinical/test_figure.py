"""The report's heat-map figure: the letterbox undone, the heat where the model saw it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from orthovision.clinical.figure import heatmap_on_source, report_figure


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def layer_with_hot_spot(box: tuple[int, int, int, int], at: tuple[int, int]) -> bytes:
    """A 224x224 RGBA heat layer, transparent but for one opaque red square at `at` (x, y,
    in box coordinates) inside the letterbox `box`."""
    layer = np.zeros((224, 224, 4), np.uint8)
    left, top, _, _ = box
    x, y = left + at[0], top + at[1]
    layer[y - 4 : y + 4, x - 4 : x + 4] = (0, 0, 255, 255)
    return png(layer)


def test_heat_map_lands_on_the_same_place_of_the_full_size_source():
    # A 400x800 (w x h) source letterboxed into 224: the image fills 112x224 at left 56.
    box = (56, 0, 112, 224)
    source = np.full((800, 400), 90, np.uint8)
    # Hot spot at 1/4 of the width and 3/4 of the height of the image part.
    image = heatmap_on_source(png(source), layer_with_hot_spot(box, (28, 168)), box)
    assert image.shape == (800, 400, 3)
    red = (image[..., 2].astype(int) - image[..., 0]) > 100
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - 100) < 5 and abs(ys.mean() - 600) < 5
    assert image[50, 50].tolist() == [90, 90, 90]  # transparent elsewhere: the source


def test_figure_uses_the_source_when_kept_else_the_unpadded_model_input():
    box = (56, 0, 112, 224)
    overlay = png(np.full((224, 224, 3), 30, np.uint8))
    layer = layer_with_hot_spot(box, (50, 50))
    on_source = report_figure(overlay, box, layer, png(np.zeros((800, 400), np.uint8)))
    assert (on_source.width, on_source.height) == (400, 800)
    assert "source image" in on_source.caption
    cropped = report_figure(overlay, box, layer, None)
    assert (cropped.width, cropped.height) == (112, 224)
    assert "padding removed" in cropped.caption
    plain = report_figure(overlay)
    assert (plain.width, plain.height) == (224, 224) and plain.png == overlay


def test_a_box_outside_the_layer_is_refused():
    with pytest.raises(ValueError, match="outside"):
        report_figure(png(np.zeros((224, 224, 3), np.uint8)), (300, 300, 10, 10))
