"""The procedural shapes dataset and the rule-based adherence checker."""

import pickle

import numpy as np
import pytest

from ldm.data.adherence import ATTRIBUTES, check_image, parse_caption, score, summarise
from ldm.data.shapes import (
    ALL_COMBINATIONS,
    HELDOUT_COMBINATIONS,
    ShapesDataset,
    canonical_caption,
    render,
    sample_attrs,
)

CHECKED_IMAGES = 2000


def semantic(attrs):
    return {name: attrs[name] for name in ATTRIBUTES}


def blur(image):
    """Separable [1, 2, 1] / 4 blur: softens edges the way a decoder would."""
    kernel = (0.25, 0.5, 0.25)
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = sum(k * padded[i : i + image.shape[0]] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + image.shape[1]] for i, k in enumerate(kernel))


@pytest.fixture(scope="module")
def ground_truth():
    """(attrs, caption, clean uint8 image) triples straight from the dataset, all combinations."""
    dataset = ShapesDataset(size=CHECKED_IMAGES, split="all", seed=123)
    samples = []
    for index in range(len(dataset)):
        item = dataset[index]
        image = np.rint((item["image"] + 1.0) * 127.5).astype(np.uint8)
        samples.append((item["attrs"], item["caption"], image))
    return samples


def test_items_are_deterministic_in_seed_and_index():
    first, again = ShapesDataset(size=10, seed=5)[7], ShapesDataset(size=10, seed=5)[7]
    assert np.array_equal(first["image"], again["image"])
    assert first["caption"] == again["caption"] and first["attrs"] == again["attrs"]

    other_seed = ShapesDataset(size=10, seed=6)[7]
    other_index = ShapesDataset(size=10, seed=5)[8]
    assert first["caption"] != other_seed["caption"] or not np.array_equal(first["image"], other_seed["image"])
    assert first["caption"] != other_index["caption"] or not np.array_equal(first["image"], other_index["image"])


def test_item_format_and_configurable_keys():
    dataset = ShapesDataset(size=3, seed=0, image_key="jpg", caption_key="txt")
    item = dataset[0]
    assert set(item) == {"jpg", "txt", "attrs"}
    image = item["jpg"]
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert len(dataset) == 3
    with pytest.raises(IndexError):
        dataset[3]
    assert ShapesDataset(size=1, resolution=32)[0]["image"].shape == (32, 32, 3)


def test_dataset_survives_pickling_for_loader_workers():
    dataset = ShapesDataset(size=20, split="heldout", seed=9)
    restored = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(restored[11]["image"], dataset[11]["image"])


def test_splits_separate_heldout_combinations():
    rng = np.random.default_rng(0)
    train = {(a["shape"], a["color"]) for a in (sample_attrs(rng, "train") for _ in range(3000))}
    heldout = {(a["shape"], a["color"]) for a in (sample_attrs(rng, "heldout") for _ in range(300))}
    everything = {(a["shape"], a["color"]) for a in (sample_attrs(rng, "all") for _ in range(3000))}
    assert train == set(ALL_COMBINATIONS) - set(HELDOUT_COMBINATIONS)
    assert heldout == set(HELDOUT_COMBINATIONS)
    assert everything == set(ALL_COMBINATIONS)
    # The dataset itself goes through the same sampler.
    dataset = ShapesDataset(size=300, split="train", seed=1)
    assert not any((dataset[i]["attrs"]["shape"], dataset[i]["attrs"]["color"]) in HELDOUT_COMBINATIONS for i in range(300))


def test_scenes_respect_their_constraints(ground_truth):
    for attrs, _, image in ground_truth:
        assert attrs["background"] != attrs["color"]
        half = attrs["diameter"] / 2
        for centre in (attrs["center_x"], attrs["center_y"]):
            assert 0 <= centre - half and centre + half <= 64
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == border[0]).all(), "the object must not touch the image edge"


def test_every_caption_parses_back_to_its_attributes(ground_truth):
    for attrs, caption, _ in ground_truth:
        assert parse_caption(caption) == semantic(attrs)
        assert parse_caption(canonical_caption(attrs)) == semantic(attrs)


def test_parser_handles_prompts_it_did_not_write():
    assert parse_caption("A big ORANGE triangle in the middle, on a purple background.") == {
        "shape": "triangle",
        "color": "orange",
        "background": "purple",
        "size": "large",
        "position": "center",
    }
    # Unmentioned attributes are left out, and score() only judges the rest.
    partial = parse_caption("a red circle")
    assert partial == {"shape": "circle", "color": "red"}
    assert set(score({"shape": "circle", "color": "blue"}, partial)) == {"shape", "color", "all"}


def test_checker_reads_clean_images(ground_truth):
    rates = summarise([score(check_image(image), attrs) for attrs, _, image in ground_truth])
    assert rates["count"] == CHECKED_IMAGES
    for name in (*ATTRIBUTES, "all"):
        assert rates[name] >= 0.98, rates


def test_checker_tolerates_noise_and_blur(ground_truth):
    rng = np.random.default_rng(0)
    scores = []
    for attrs, _, image in ground_truth:
        noisy = blur(image) + rng.normal(0.0, 12.0, image.shape)
        scores.append(score(check_image(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)), attrs))
    rates = summarise(scores)
    for name in (*ATTRIBUTES, "all"):
        assert rates[name] >= 0.95, rates


def test_checker_reports_missing_object_as_wrong():
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    prediction = check_image(blank)
    assert prediction["background"] == "black" and prediction["shape"] is None
    target = {"shape": "circle", "color": "red", "background": "black", "size": "small", "position": "left"}
    result = score(prediction, target)
    assert result["background"] and not result["all"]


def test_render_fills_in_geometry_for_parsed_prompts():
    attrs = parse_caption("a large blue square on the right on a white background")
    assert check_image(render(attrs)) == attrs
