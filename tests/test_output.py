"""Output helpers: watermark, A1111 infotext, grids, model hash."""
import hashlib

import numpy as np

from ldm.generate.output import Watermarker, infotext, make_grid, model_hash


def test_watermark_is_embedded_invisibly_on_a_headless_machine():
    yy, xx = np.mgrid[0:256, 0:320]
    image = np.stack([xx * 0.5 + 40, yy * 0.6 + 30, (xx + yy) * 0.3 + 20], axis=-1).astype(np.uint8)  # smooth, like a photo
    marked = Watermarker("StableDiffusionV1").apply(image)
    assert marked.shape == image.shape and not np.array_equal(marked, image)
    assert np.abs(marked.astype(int) - image.astype(int)).mean() < 1  # invisible
    assert np.array_equal(Watermarker("StableDiffusionV1").apply(image), marked)
    assert not np.array_equal(Watermarker("SDV2").apply(image), marked)


def test_small_images_and_no_watermark_are_left_alone():
    image = np.full((64, 64, 3), 128, np.uint8)
    assert np.array_equal(Watermarker("SDV2").apply(image), image)
    big = np.full((256, 256, 3), 128, np.uint8)
    assert np.array_equal(Watermarker(None).apply(big), big)


def test_infotext_follows_the_a1111_format():
    text = infotext("a cat, sitting", "", {"Steps": 20, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 1,
                                           "Size": "512x512", "Model hash": "abc", "Model": "v1: pruned", "Eta": None})
    assert text == 'a cat, sitting\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: abc, Model: "v1: pruned"'
    assert infotext("p", "ugly", {"Steps": 1}).splitlines()[1] == "Negative prompt: ugly"


def test_grid_layout_matches_torchvision_make_grid():
    images = [np.full((4, 6, 3), i * 40, np.uint8) for i in range(1, 6)]
    grid = make_grid(images, n_rows=2)
    assert grid.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    assert (grid[2:6, 2:8] == 40).all() and (grid[8:12, 10:16] == 160).all()
    assert (grid[14:18, 10:16] == 0).all()  # the empty last cell stays black


def test_model_hash_is_the_sha256_prefix_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "m.ckpt"
    f.write_bytes(b"weights" * 1000)
    assert model_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    assert (tmp_path / "cache" / "ldm" / "model-hashes.json").is_file()
    assert model_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
