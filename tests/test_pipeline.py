"""ldm.pipeline, the Python API, on the tiny model: the scripts' pictures pixel for pixel, infotexts kept in
saved PNGs, seeds and generators, per-step callbacks, the scripts' options as keywords, one clear error."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_script
from ldm.pipeline import Pipeline
from tiny_model import write_tiny_checkpoint

QUICK = dict(num_inference_steps=3, height=64, width=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt, device="cpu", log=lambda line: None)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def script_samples(outdir) -> list:
    paths = sorted((outdir / "samples").iterdir())
    return [(pixels(Image.open(path)), Image.open(path).text["parameters"]) for path in paths]


def test_txt2img_makes_the_scripts_pictures_and_infotexts(pipe, ckpt, tmp_path):
    run = run_script("txt2img", "--ckpt", ckpt, "--outdir", tmp_path, "--ddim_steps", 3, "--H", 64, "--W", 64,
                     "--prompt", "a red circle", "--negative_prompt", "blurry", "--n_samples", 2,
                     "--n_iter", 1, "--seed", 11, "--sampler", "Euler a", "--scale", 6, "--subseed_strength", 0.3,
                     "--subseed", 5, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    result = pipe("a red circle", negative_prompt="blurry", num_inference_steps=3, height=64, width=64,
                  num_images_per_prompt=2, seed=11, sampler="Euler a", guidance_scale=6, subseed_strength=0.3,
                  subseed=5)
    expected = script_samples(tmp_path)
    assert len(result.images) == 2
    for image, text, (script_pixels, script_text) in zip(result.images, result.infotexts, expected):
        assert np.array_equal(pixels(image), script_pixels)
        assert text == script_text
    assert result.seeds == [11, 11]  # A1111's: with a variation seed, the images differ by their subseeds
    assert "Variation seed: 5," in result.infotexts[0] and "Variation seed: 6," in result.infotexts[1]


def test_img2img_makes_the_scripts_pictures(pipe, ckpt, tmp_path):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    run = run_script("img2img", "--ckpt", ckpt, "--outdir", tmp_path / "out", "--ddim_steps", 4, "--strength", 0.5,
                     "--init-img", tmp_path / "init.png", "--prompt", "a square", "--n_samples", 1, "--seed", 3,
                     "--sampler", "DPM++ 2M Karras", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    result = pipe.img2img("a square", image=Image.open(tmp_path / "init.png"), strength=0.5, num_inference_steps=4,
                          seed=3, sampler="DPM++ 2M Karras")
    [(script_pixels, script_text)] = script_samples(tmp_path / "out")
    assert np.array_equal(pixels(result.images[0]), script_pixels)
    assert result.infotexts[0] == script_text and "Denoising strength: 0.5" in script_text


def test_inpaint_keeps_what_the_mask_keeps(pipe):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:16, :16] = 255
    result = pipe.inpaint("a circle", image=image, mask_image=Image.fromarray(mask), num_inference_steps=3, seed=1,
                          watermark=False)
    out = pixels(result.images[0])
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[40:, 40:], np.asarray(image)[40:, 40:])  # far from the mask: the input's own
    assert not np.array_equal(out[:16, :16], np.asarray(image)[:16, :16])


def test_saved_png_and_result_save_keep_the_infotext(pipe, tmp_path):
    result = pipe("a circle", **QUICK, seed=2)
    result.images[0].save(tmp_path / "mine.png")
    with Image.open(tmp_path / "mine.png") as saved:
        assert saved.text["parameters"] == result.infotexts[0]
        assert np.array_equal(pixels(saved), pixels(result.images[0]))
    (tmp_path / "out" / "samples").mkdir(parents=True)
    (tmp_path / "out" / "samples" / "00004.png").write_bytes(b"a user's file")
    paths = result.save(tmp_path / "out")
    assert [path.name for path in paths] == ["00005.png"]
    assert (tmp_path / "out" / "samples" / "00004.png").read_bytes() == b"a user's file"
    with Image.open(paths[0]) as saved:
        assert saved.text["parameters"] == result.infotexts[0]


def test_generator_seed_and_random_seed(pipe):
    from_generator = pipe("a circle", **QUICK, generator=torch.Generator().manual_seed(9))
    from_seed = pipe("a circle", **QUICK, seed=9)
    assert from_generator.seeds == from_seed.seeds == [9]
    assert np.array_equal(pixels(from_generator.images[0]), pixels(from_seed.images[0]))
    random = pipe("a circle", **QUICK)  # no seed: a random one, written to the infotext, which makes it again
    again = pipe("a circle", **QUICK, seed=random.seeds[0])
    assert np.array_equal(pixels(random.images[0]), pixels(again.images[0]))


def test_prompt_lists_and_callback(pipe):
    steps = []
    result = pipe(["a circle", "a square"], **QUICK, num_images_per_prompt=2, seed=4,
                  callback=lambda info: steps.append((info["i"], info["total"], tuple(info["x"].shape))))
    assert [text.splitlines()[0] for text in result.infotexts] == ["a circle"] * 2 + ["a square"] * 2
    assert result.seeds == [4, 5, 6, 7]
    assert steps == [(i, 3, (2, 4, 8, 8)) for i in range(3)] * 2


def test_hires_option_by_its_script_name(pipe):
    result = pipe("a circle", **QUICK, seed=1, hr_scale=2, hr_second_pass_steps=2)
    assert result.images[0].size == (128, 128)
    assert "Hires upscale: 2" in result.infotexts[0]


@pytest.mark.parametrize("call, error, words", [
    (lambda pipe: pipe("x", num_inference_steps=0), ValueError, "num_inference_steps must be at least 1"),
    (lambda pipe: pipe("x", height=60), ValueError, "height 60 is not a positive multiple of 8"),
    (lambda pipe: pipe("x", seed=1, generator=torch.Generator()), ValueError, "pass one of them"),
    (lambda pipe: pipe("x", sampler="no such"), ValueError, "sampler"),
    (lambda pipe: pipe("x", outdir="somewhere"), TypeError, "unexpected keyword argument 'outdir'"),
    (lambda pipe: pipe("x", lora=[("missing.safetensors", 1.0)]), ValueError, "missing.safetensors"),
    (lambda pipe: pipe.upscale("x", image=Image.new("RGB", (16, 16))), ValueError,
     "is a model for text-to-image, which pipe.upscale cannot use: call pipe(...) or pipe.img2img or pipe.inpaint"),
    (lambda pipe: pipe.img2img("x", image=Image.new("RGB", (64, 64)), strength=2), ValueError,
     "strength 2 is outside [0, 1]"),
])
def test_bad_input_is_one_clear_error(pipe, call, error, words):
    with pytest.raises(error) as raised:
        call(pipe)
    assert words in str(raised.value) and "--" not in str(raised.value)


def test_bad_model_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such|not found|does not exist"):
        Pipeline.from_pretrained(tmp_path / "missing.safetensors", device="cpu", log=lambda line: None)
    with pytest.raises(ValueError, match="CUDA only"):
        Pipeline.from_pretrained(None, device="cpu", dtype=torch.float16)
