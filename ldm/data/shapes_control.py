"""The shapes scenes with a control map, for training and checking a ControlNet on the shapes model.

Each item is (picture, caption, control map): the map is the picture's canny edge map, the control image that
A1111's canny preprocessor would make of it. The shape may sit anywhere in the frame at any size in
FREE_DIAMETER_RANGE, which the caption grammar cannot say: the caption names the nearest size and position
words (``words_for``), so only the control map tells where the shape is and how large.
"""
import cv2
import numpy as np

from ldm.data.shapes import CANVAS, DIAMETER_RANGE, EDGE_MARGIN, NOMINAL_CENTER, ShapesDataset

FREE_DIAMETER_RANGE = (10.0, 48.0)  # in 64-canvas pixels; the grammar's sizes are 14-18 and 30-36
# A1111's canny preprocessor's default thresholds; every pair of palette colours gives an edge well above them.
CANNY_LOW, CANNY_HIGH = 100, 200


def canny_map(picture: np.ndarray, low=CANNY_LOW, high=CANNY_HIGH) -> np.ndarray:
    """HWC uint8 RGB -> HWC float32 in {0, 1}, the edges in all three channels (a control image)."""
    edges = cv2.Canny(np.ascontiguousarray(picture), low, high)
    return np.repeat((edges > 0).astype(np.float32)[..., None], 3, axis=-1)


def words_for(diameter: float, center_x: float, center_y: float) -> tuple[str, str]:
    """(size, position): the grammar's words nearest to a free geometry."""
    midpoint = (DIAMETER_RANGE["small"][1] + DIAMETER_RANGE["large"][0]) / 2
    size = "small" if diameter < midpoint else "large"
    position = min(NOMINAL_CENTER, key=lambda name: (NOMINAL_CENTER[name][0] - center_x) ** 2
                   + (NOMINAL_CENTER[name][1] - center_y) ** 2)
    return size, position


def free_geometry(rng) -> dict:
    """A box of any size in FREE_DIAMETER_RANGE anywhere in the frame (one pixel of margin kept)."""
    diameter = float(rng.uniform(*FREE_DIAMETER_RANGE))
    lowest = diameter / 2 + EDGE_MARGIN
    center_x, center_y = (float(value) for value in rng.uniform(lowest, CANVAS - lowest, size=2))
    size, position = words_for(diameter, center_x, center_y)
    return {"diameter": diameter, "center_x": center_x, "center_y": center_y, "size": size, "position": position}


class ShapesControlDataset(ShapesDataset):
    """ShapesDataset items with free geometry and ``hint_key``: the picture's canny map (HWC float32 in [0, 1]).

    Shape, colours and the caption's phrasing are drawn as ShapesDataset draws them (same split rules); the
    size and position words then follow the free geometry, so that the caption still describes the picture.
    """

    def __init__(self, hint_key="hint", **params):
        super().__init__(**params)
        self.hint_key = hint_key

    def draw(self, rng):
        return {**super().draw(rng), **free_geometry(rng)}

    def __getitem__(self, index):
        item = super().__getitem__(index)
        picture = np.rint((item[self.image_key] + 1.0) * 127.5).astype(np.uint8)
        return {**item, self.hint_key: canny_map(picture)}
