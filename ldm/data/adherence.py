"""Rule-based prompt-adherence checker for the shapes dataset.

``check_image`` reads the five attributes of ``ldm.data.shapes`` back from the
pixels alone, so a generated image can be scored against the attributes of
its prompt (``parse_caption`` recovers those from the prompt text):

    background  the most common palette colour on the image border
    object      the largest 4-connected region of pixels whose nearest
                palette colour is not the background (isolated speckles of a
                generated image form their own small regions and lose)
    color       nearest palette colour (other than the background) to the
                median of the object's interior pixels; the interior skips
                the blended edge pixels, which on a small shape are many
    size        the longer side of the object's bounding box, against a
                threshold halfway between the small and large ranges
    position    the bounding-box centre: "center" when it is near the image
                centre, otherwise the direction of its larger offset
    shape       the ideal circle, square and triangle inscribed in the same
                bounding box; the one with the best overlap (IoU) wins

Every threshold is a fraction of the image side, so any resolution works.
Classifying each pixel by its nearest palette colour, rather than by a
distance threshold, is what makes the checker tolerate noisy colours: the
palette colours are >= 115 apart in RGB, far beyond the noise of a decent
generation.
"""

import re

import numpy as np

from ldm.data.shapes import (
    CANVAS,
    COLORS,
    DIAMETER_RANGE,
    PALETTE,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZE_WORDS,
    shape_coverage,
)

ATTRIBUTES = ("shape", "color", "background", "size", "position")

_PALETTE_RGB = np.asarray([PALETTE[name] for name in COLORS], dtype=np.float32)
_PALETTE_SQUARED_NORMS = (_PALETTE_RGB**2).sum(axis=-1)
# Halfway between the largest small shape (18 px) and the smallest large one (30 px).
LARGE_EXTENT = (DIAMETER_RANGE["small"][1] + DIAMETER_RANGE["large"][0]) / 2 / CANVAS
# Centred scenes are jittered by <= 3 px; off-centre ones sit >= 13 px away.
CENTER_TOLERANCE = 8.0 / CANVAS
BORDER_WIDTH = 2.0 / CANVAS
BUMP_RATIO = 0.25  # see _trimmed_span


def nearest_palette_index(rgb):
    """Index into COLORS of the nearest palette colour, for any (..., 3) array."""
    rgb = np.asarray(rgb, dtype=np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2, and |x|^2 does not change which p is
    # nearest: one matrix product instead of a (..., 8, 3) difference array.
    return (_PALETTE_SQUARED_NORMS - 2.0 * rgb @ _PALETTE_RGB.T).argmin(axis=-1)


def _border_pixels(labels):
    width = max(1, round(BORDER_WIDTH * labels.shape[0]))
    return np.concatenate(
        [
            labels[:width].ravel(),
            labels[-width:].ravel(),
            labels[width:-width, :width].ravel(),
            labels[width:-width, -width:].ravel(),
        ]
    )


def largest_component(mask):
    """Boolean mask of the largest 4-connected region of ``mask`` (empty stays empty).

    Each pixel starts labelled with its own flat index and repeatedly takes
    the smallest label among itself and its neighbours; looking labels up
    through the pixel they name ("pointer jumping") spreads them in a
    logarithmic rather than linear number of rounds.
    """
    if not mask.any():
        return mask.copy()
    height, width = mask.shape
    outside = height * width  # label of non-mask pixels; larger than any pixel index
    labels = np.where(mask, np.arange(outside).reshape(height, width), outside)
    padded = np.full((height + 2, width + 2), outside)
    while True:
        padded[1:-1, 1:-1] = labels
        smallest = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        flat = np.append(smallest.ravel(), outside)
        jumped = np.where(mask, flat[smallest], outside)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    counts = np.bincount(labels[mask])
    return labels == counts.argmax()


def _trimmed_span(counts):
    """[start, end) of the non-empty part of ``counts`` (pixels per row or column), bumps trimmed.

    A noise bump on a straight edge is a row with a pixel or two next to a
    full row; left in, one bump widens a small square's box by a pixel and
    makes it look like a circle.  A true edge narrows gradually instead
    (a triangle's apex rows hold 1, 2, 3... pixels, a circle's top row about
    half the next one), so only rows holding under BUMP_RATIO of their inner
    neighbour are trimmed.
    """
    occupied = np.nonzero(counts)[0]
    start, end = int(occupied[0]), int(occupied[-1]) + 1
    while end - start > 2 and counts[start] < BUMP_RATIO * counts[start + 1]:
        start += 1
    while end - start > 2 and counts[end - 1] < BUMP_RATIO * counts[end - 2]:
        end -= 1
    return start, end


def _bounding_box(component):
    """(left, top, right, bottom) of ``component`` in pixel coordinates, noise bumps trimmed."""
    left, right = _trimmed_span(component.sum(axis=0))
    top, bottom = _trimmed_span(component.sum(axis=1))
    return left, top, right, bottom


def _interior(mask):
    """Pixels whose four neighbours are all in ``mask`` (the mask itself if none are)."""
    padded = np.pad(mask, 1)
    interior = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return interior if interior.any() else mask


def _best_shape(component, box):
    """The shape whose ideal template inscribed in ``box`` overlaps ``component`` most.

    ``box`` is the component's bounding box, so the overlap is computed on
    that crop only; no template reaches outside it, and the noise bumps
    trimmed off the box should not count against any shape.
    """
    left, top, right, bottom = (int(edge) for edge in box)
    crop = component[top:bottom, left:right]
    crop_box = (0.0, 0.0, float(right - left), float(bottom - top))

    def overlap(shape):
        # One sample per pixel: a pixel belongs to the template when its centre does.
        template = shape_coverage(shape, crop_box, *crop.shape, supersample=1) > 0
        return (template & crop).sum() / (template | crop).sum()

    return max(SHAPES, key=overlap)


def _position(box, height, width):
    left, top, right, bottom = box
    offset_x = (left + right) / 2 / width - 0.5
    offset_y = (top + bottom) / 2 / height - 0.5
    if max(abs(offset_x), abs(offset_y)) <= CENTER_TOLERANCE:
        return "center"
    if abs(offset_x) >= abs(offset_y):
        return "left" if offset_x < 0 else "right"
    return "top" if offset_y < 0 else "bottom"


def object_mask(image):
    """(the object's pixels: the largest region not of the background's palette colour, an HxW bool array;
    the background's index into COLORS: the commonest palette colour of the border) of an HxWx3 RGB image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    labels = nearest_palette_index(image)
    background_index = int(np.bincount(_border_pixels(labels), minlength=len(COLORS)).argmax())
    return largest_component(labels != background_index), background_index


def check_image(image):
    """Predict {shape, color, background, size, position} of a uint8 HWC RGB image.

    Object attributes are None when no object is found (the whole image is
    background), so they score as wrong.
    """
    image = np.asarray(image)
    component, background_index = object_mask(image)
    prediction = dict.fromkeys(ATTRIBUTES)
    prediction["background"] = COLORS[background_index]
    if not component.any():
        return prediction

    median_rgb = np.median(image[_interior(component)].astype(np.float32), axis=0)
    distances = ((median_rgb - _PALETTE_RGB) ** 2).sum(axis=-1)
    distances[background_index] = np.inf  # the object never matches its background
    prediction["color"] = COLORS[int(distances.argmin())]

    box = _bounding_box(component)
    height, width = component.shape
    extent = max((box[2] - box[0]) / width, (box[3] - box[1]) / height)
    prediction["size"] = "large" if extent > LARGE_EXTENT else "small"
    prediction["position"] = _position(box, height, width)
    prediction["shape"] = _best_shape(component, box)
    return prediction


def score(predicted, target):
    """Per-attribute correctness, plus "all".

    Only attributes present in ``target`` are scored, so a prompt that does
    not mention, say, the size is judged on the rest.
    """
    result = {name: predicted.get(name) == target[name] for name in ATTRIBUTES if name in target}
    result["all"] = all(result.values())
    return result


def summarise(scores):
    """Rate of correctness per key over a list of ``score`` results (keys never scored are left out)."""
    keys = [*ATTRIBUTES, "all"]
    rates = {}
    for key in keys:
        values = [s[key] for s in scores if key in s]
        if values:
            rates[key] = float(np.mean(values))
    rates["count"] = len(scores)
    return rates


# ---------------------------------------------------------------------------
# Caption parsing: the inverse of the grammar in ldm.data.shapes.

_SIZE_BY_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}
# The last word of each position phrase names the position ("the top of the
# image" is the exception, hence the explicit list), plus spelling variants.
_POSITION_BY_WORD = {position: position for position in POSITIONS}
_POSITION_BY_WORD.update({"centre": "center", "middle": "center", "centered": "center", "centred": "center"})
assert all(
    any(_POSITION_BY_WORD.get(word) == position for word in phrase.split())
    for position, phrases in POSITION_PHRASES.items()
    for phrase in phrases
), "every position phrase of the grammar must contain a word the parser knows"


def _unique(values):
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def parse_caption(caption):
    """Attributes named by ``caption``, e.g. 'a small red circle on the left on a blue background'.

    The background is the colour word right before "background"; the object
    colour is the other colour word.  An attribute that is missing or
    ambiguous (two different values) is left out of the result.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    background_at = {i - 1 for i, word in enumerate(words) if word == "background" and i > 0}
    found = {
        "shape": [w for w in words if w in SHAPES],
        "color": [w for i, w in enumerate(words) if w in PALETTE and i not in background_at],
        "background": [words[i] for i in background_at if words[i] in PALETTE],
        "size": [_SIZE_BY_WORD[w] for w in words if w in _SIZE_BY_WORD],
        "position": [_POSITION_BY_WORD[w] for w in words if w in _POSITION_BY_WORD],
    }
    attrs = {}
    for name, values in found.items():
        value = _unique(values)
        if value is not None:
            attrs[name] = value
    return attrs
