"""Procedural "shapes" dataset: flat-coloured geometric scenes with English captions.

Every scene is one shape of one colour on a plain background of another colour.
Five attributes describe it completely, and every caption names all five, so a
rule-based checker (``ldm.data.adherence``) can tell from the pixels alone
whether a generated image follows its prompt:

    shape       circle | square | triangle (isosceles, apex up)
    color       one of PALETTE            (the object)
    background  one of PALETTE, != color
    size        small (14-18 px across) | large (30-36 px across)
    position    left | right | top | bottom | center

Geometry is defined on a 64x64 canvas (pixel i covers [i, i+1), so the image
centre is (32, 32)) and scaled for other resolutions.  All three shapes fill
the same square box of side ``diameter`` centred on (center_x, center_y); the
position is the box centre, jittered a little around its nominal point and
pulled inwards where needed so the box keeps a one-pixel margin.

Some (shape, colour) combinations are HELD OUT: ``split="train"`` never draws
them, ``split="heldout"`` draws only them, so a model trained on the train
split can be tested on compositions it has never seen (e.g. a purple circle,
although it has seen purple squares and circles of other colours).

Every sample is a pure function of (seed, split, index): no state is kept
between items, so the dataset pickles into DataLoader workers and any item can
be regenerated exactly.
"""

import re

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")

# Saturated colours spread through RGB space; the closest pair (orange/yellow)
# is still 115 apart, far more than the noise of a generated image.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 180, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 140, 0),
    "purple": (128, 0, 160),
}
COLORS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# One held-out combination per shape (plus a second circle), each a different
# colour, and every held-out colour still appears on the other shapes in
# training, so the model has seen each word; only the pairing is new.
HELDOUT_COMBINATIONS = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "white"),
    ("circle", "green"),
)
ALL_COMBINATIONS = tuple((shape, color) for shape in SHAPES for color in COLORS)
TRAIN_COMBINATIONS = tuple(c for c in ALL_COMBINATIONS if c not in HELDOUT_COMBINATIONS)
SPLITS = ("train", "heldout", "all")

CANVAS = 64  # geometry below is in pixels of a 64x64 image
DIAMETER_RANGE = {"small": (14.0, 18.0), "large": (30.0, 36.0)}
NOMINAL_CENTER = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
POSITION_JITTER = 3.0
EDGE_MARGIN = 1.0  # keeps the outermost pixel ring pure background

# ---------------------------------------------------------------------------
# Caption grammar.  The parser in ldm.data.adherence inverts it, so every word
# that carries an attribute must come from these tables.

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the middle", "at the center"),
}
CAPTION_TEMPLATES = (
    "{size} {color} {shape} {position} on a {background} background",
    "{size} {color} {shape} {position}, {background} background",
    "{size} {color} {shape} {position} against a {background} background",
    "{size} {color} {shape} on a {background} background, {position}",
    "a {background} background with a {size} {color} {shape} {position}",
)
CANONICAL_TEMPLATE = "a {size} {color} {shape} {position} on a {background} background"
ARTICLE_PROBABILITY = 0.7  # templates starting with the size word get "a " this often


def _fix_articles(text):
    """'a orange' -> 'an orange' (orange is the only vowel-initial word)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def canonical_caption(attrs):
    """The one fixed phrasing, e.g. 'a small red circle on the left on a blue background'."""
    return _fix_articles(
        CANONICAL_TEMPLATE.format(
            size=attrs["size"],
            color=attrs["color"],
            shape=attrs["shape"],
            position=POSITION_PHRASES[attrs["position"]][0],
            background=attrs["background"],
        )
    )


def caption_for(attrs, rng):
    """A caption with randomly chosen phrasing (template, synonyms, article) from ``rng``."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    if template.startswith("{size}") and rng.random() < ARTICLE_PROBABILITY:
        template = "a " + template
    size_words = SIZE_WORDS[attrs["size"]]
    position_phrases = POSITION_PHRASES[attrs["position"]]
    return _fix_articles(
        template.format(
            size=size_words[rng.integers(len(size_words))],
            color=attrs["color"],
            shape=attrs["shape"],
            position=position_phrases[rng.integers(len(position_phrases))],
            background=attrs["background"],
        )
    )


# ---------------------------------------------------------------------------
# Attributes and geometry.


def sample_attrs(rng, split="train"):
    """Draw one scene description: the five attributes plus the exact geometry.

    (shape, color) is uniform over the combinations the split allows, the
    other attributes are uniform and independent.  Geometry (in 64-canvas
    pixels) is ``center_x``, ``center_y`` (box centre) and ``diameter`` (box side).
    """
    if split == "train":
        combinations = TRAIN_COMBINATIONS
    elif split == "heldout":
        combinations = HELDOUT_COMBINATIONS
    elif split == "all":
        combinations = ALL_COMBINATIONS
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shape, color = combinations[rng.integers(len(combinations))]
    backgrounds = [c for c in COLORS if c != color]
    background = backgrounds[rng.integers(len(backgrounds))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]

    diameter = float(rng.uniform(*DIAMETER_RANGE[size]))
    nominal_x, nominal_y = NOMINAL_CENTER[position]
    jitter_x, jitter_y = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    # A large shape cannot sit at x=16: pull its centre in until it fits.
    lowest = diameter / 2 + EDGE_MARGIN
    highest = CANVAS - lowest
    center_x = float(np.clip(nominal_x + jitter_x, lowest, highest))
    center_y = float(np.clip(nominal_y + jitter_y, lowest, highest))
    return {
        "shape": shape,
        "color": color,
        "background": background,
        "size": size,
        "position": position,
        "center_x": center_x,
        "center_y": center_y,
        "diameter": diameter,
    }


def geometry_of(attrs):
    """(center_x, center_y, diameter) in canvas pixels; nominal values when absent.

    Lets ``render`` draw attribute dicts that carry no geometry, such as the
    output of ``parse_caption``.
    """
    nominal_x, nominal_y = NOMINAL_CENTER[attrs["position"]]
    low, high = DIAMETER_RANGE[attrs["size"]]
    diameter = attrs.get("diameter", (low + high) / 2)
    return attrs.get("center_x", nominal_x), attrs.get("center_y", nominal_y), diameter


def shape_coverage(shape, box, height, width, supersample=4):
    """Fraction of each pixel covered by ``shape`` inscribed in ``box``.

    ``box`` is (left, top, right, bottom) in pixel coordinates (pixel i spans
    [i, i+1)).  Coverage is estimated on a ``supersample`` x ``supersample``
    grid per pixel, which gives antialiased edges; only the pixels under the
    box are evaluated, which keeps rendering fast.  The checker reuses this
    to build the ideal template of each shape for a detected bounding box,
    and the box may be non-square there (the circle becomes an ellipse).
    """
    left, top, right, bottom = box
    coverage = np.zeros((height, width), dtype=np.float32)
    x0, y0 = max(int(np.floor(left)), 0), max(int(np.floor(top)), 0)
    x1, y1 = min(int(np.ceil(right)), width), min(int(np.ceil(bottom)), height)
    if x1 <= x0 or y1 <= y0:
        return coverage

    offsets = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel()
    # Unit coordinates: the box maps to [-1, 1]^2, v grows downwards.
    u = (xs[None, :] - (left + right) / 2) / ((right - left) / 2)
    v = (ys[:, None] - (top + bottom) / 2) / ((bottom - top) / 2)
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    elif shape == "triangle":
        # Apex at the top centre (v=-1), base along the bottom edge (v=1).
        inside = (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    block = inside.reshape(y1 - y0, supersample, x1 - x0, supersample)
    coverage[y0:y1, x0:x1] = block.mean(axis=(1, 3))
    return coverage


def render(attrs, resolution=64):
    """Draw a scene: uint8 array of shape (resolution, resolution, 3)."""
    center_x, center_y, diameter = geometry_of(attrs)
    scale = resolution / CANVAS
    half = diameter / 2
    box = tuple(scale * c for c in (center_x - half, center_y - half, center_x + half, center_y + half))
    alpha = shape_coverage(attrs["shape"], box, resolution, resolution)[..., None]
    foreground = np.asarray(PALETTE[attrs["color"]], dtype=np.float32)
    background = np.asarray(PALETTE[attrs["background"]], dtype=np.float32)
    image = background + alpha * (foreground - background)
    return np.rint(image).astype(np.uint8)


# ---------------------------------------------------------------------------


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` virtual samples of the shapes scenes, generated on the fly.

    Item ``i`` is a pure function of (seed, split, i).  It is a dict with
    ``image_key``: float32 HWC array in [-1, 1] (CompVis convention; the
    model's ``get_input`` permutes to BCHW), ``caption_key``: str, and
    ``"attrs"``: the scene description from ``sample_attrs``.

    Variants, for training a LoRA or an embedding that changes or adds a meaning (all default to none):
    ``drawn_as`` {shape: shape}: the caption names the first, the picture shows the second (``attrs``
    describe the picture); ``caption_words`` {word: new word}: captions write the new word for that
    attribute value (a colour word for an embedding, say); ``require`` {attribute: value}: only scenes
    with these attributes (drawn again from the item's generator until one fits).
    """

    MAX_DRAWS = 1000  # for ``require``: a fitting scene comes within a few dozen draws when one can

    def __init__(
        self,
        size=50000,
        split="train",
        seed=0,
        resolution=64,
        image_key="image",
        caption_key="caption",
        drawn_as=None,
        caption_words=None,
        require=None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.drawn_as = dict(drawn_as or {})
        self.caption_words = dict(caption_words or {})
        self.require = dict(require or {})
        for shape in (*self.drawn_as, *self.drawn_as.values()):
            if shape not in SHAPES:
                raise ValueError(f"drawn_as: {shape!r} is not one of the shapes {SHAPES}")
        vocabulary = {"shape": SHAPES, "color": COLORS, "background": COLORS, "size": SIZES, "position": POSITIONS}
        for name, value in self.require.items():
            if value not in vocabulary.get(name, ()):
                raise ValueError(f"require: {name}={value!r} is not an attribute value ({', '.join(vocabulary)})")
        self.size = size
        self.split = split
        self.seed = seed
        self.resolution = resolution
        self.image_key = image_key
        self.caption_key = caption_key

    def __len__(self):
        return self.size

    def rng_for(self, index):
        # The split is part of the seed so "train" and "all" items with the
        # same index are independent draws rather than near-copies.
        return np.random.default_rng((self.seed, SPLITS.index(self.split), index))

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = self.rng_for(index)
        attrs = self.draw(rng)
        caption = caption_for(attrs, rng)
        for word, new_word in self.caption_words.items():
            caption = _fix_articles(re.sub(rf"\b{re.escape(word)}\b", new_word, caption))
        attrs = {**attrs, "shape": self.drawn_as.get(attrs["shape"], attrs["shape"])}
        image = render(attrs, self.resolution).astype(np.float32) / 127.5 - 1.0
        return {self.image_key: image, self.caption_key: caption, "attrs": attrs}

    def draw(self, rng):
        for _ in range(self.MAX_DRAWS):
            attrs = sample_attrs(rng, self.split)
            if all(attrs[name] == value for name, value in self.require.items()):
                return attrs
        raise ValueError(f"no scene of the {self.split!r} split has {self.require} (held-out combination?)")
