"""Reading A1111 parameters texts back (ldm/generate/infotext.py) and `--from_png`."""
import argparse

import pytest
from PIL import Image, PngImagePlugin

from ldm.generate.errors import UserError
from ldm.generate.infotext import parse_args_with_png, parse_parameters, png_option_defaults, read_png_parameters
from ldm.generate.output import infotext

A1111_TEXT = """masterpiece, (best quality:1.2), a cat
on two lines
Negative prompt: lowres, bad anatomy
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, \
Model hash: 9aba26abdf, Model: v1-5-pruned-emaonly, Hires prompt: "a, b: c", Version: v1.9.4"""


def test_a1111_text_splits_into_prompt_negative_prompt_and_fields():
    prompt, negative, fields = parse_parameters(A1111_TEXT)
    assert prompt == "masterpiece, (best quality:1.2), a cat\non two lines"
    assert negative == "lowres, bad anatomy"
    assert fields == {"Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7",
                      "Seed": "965400086", "Size": "512x768", "Model hash": "9aba26abdf",
                      "Model": "v1-5-pruned-emaonly", "Hires prompt": "a, b: c", "Version": "v1.9.4"}


@pytest.mark.parametrize("text, expected", [
    ("a prompt only", ("a prompt only", "", {})),
    ("a prompt\nSteps: 20, Seed: 1", ("a prompt\nSteps: 20, Seed: 1", "", {})),  # under 3 pairs: prompt text
    ("Negative prompt: bad\nSteps: 5, Seed: 3, CFG scale: 7", ("", "bad", {"Steps": "5", "Seed": "3", "CFG scale": "7"})),
    ("p\nNegative prompt: n1\nn2\nSteps: 5, Seed: 3, Size: 8x16",
     ("p", "n1\nn2", {"Steps": "5", "Seed": "3", "Size": "8x16"})),
    ('p\nSteps: 5, Seed: 3, Lora hashes: "a: 1, b: 2"', ("p", "", {"Steps": "5", "Seed": "3", "Lora hashes": "a: 1, b: 2"})),
])
def test_parse_follows_a1111s_rules(text, expected):
    assert parse_parameters(text) == expected


def test_what_we_write_reads_back():
    fields = {"Steps": 12, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 3, "Size": "64x32", "Note": "x, y: z\nw"}
    prompt, negative, read = parse_parameters(infotext("a \"quoted\" prompt, ok", "neg: one", fields))
    assert (prompt, negative) == ("a \"quoted\" prompt, ok", "neg: one")
    assert read == {key: str(value) for key, value in fields.items()}


TXT2IMG_DESTS = {"prompt", "negative_prompt", "ddim_steps", "sampler", "schedule", "scale", "seed", "W", "H", "rng"}


def test_fields_become_option_defaults_and_unused_ones_are_named():
    lines = []
    values = png_option_defaults(A1111_TEXT, TXT2IMG_DESTS, log=lines.append)
    assert values == {"prompt": "masterpiece, (best quality:1.2), a cat\non two lines",
                      "negative_prompt": "lowres, bad anatomy", "ddim_steps": "20", "sampler": "DPM++ 2M",
                      "schedule": "Karras", "scale": "7", "seed": "965400086", "W": "512", "H": "768",
                      "rng": "nv"}  # no RNG field: A1111's default GPU source, an NVIDIA card's numbers
    assert lines == ["note: the PNG's Hires prompt set nothing here: no option of this script takes them"]


@pytest.mark.parametrize("rng, expected", [("CPU", "cpu"), ("NV", "nv"), ("GPU", "nv")])
def test_rng_names_map_onto_ours(rng, expected):
    text = f"p\nSteps: 5, Seed: 3, CFG scale: 7, RNG: {rng}"
    assert png_option_defaults(text, TXT2IMG_DESTS, log=lambda line: None)["rng"] == expected


def test_denoising_strength_sets_img2img_strength_or_hires_strength():
    text = "p\nSteps: 5, Seed: 3, Denoising strength: 0.4"
    assert png_option_defaults(text, {"strength"}, log=lambda line: None)["strength"] == "0.4"
    assert png_option_defaults(text, {"denoising_strength"}, log=lambda line: None)["denoising_strength"] == "0.4"


def save_png(path, text):
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def small_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", default="default prompt")
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--steps", dest="ddim_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--from_png", default=None)
    return parser


def test_from_png_sets_defaults_converted_by_each_options_type_and_flags_win(tmp_path):
    png = save_png(tmp_path / "in.png", "a fox\nSteps: 21, Seed: 7, CFG scale: 6.5, Size: 64x64")
    args = parse_args_with_png(small_parser(), ["--from_png", str(png), "--seed", "9"])
    assert (args.prompt, args.ddim_steps, args.scale, args.seed) == ("a fox", 21, 6.5, 9)


@pytest.mark.parametrize("content, message", [
    (None, "holds no A1111 parameters text"),
    (b"not a picture", "not a picture PIL can read"),
    ("missing", "no such file"),
])
def test_a_png_without_parameters_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "in.png"
    if content is None:
        save_png(path, None)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_png_parameters(path)


def test_a_picture_made_again_from_its_png_alone(tmp_path):
    """Every setting that changes the picture travels in the infotext: --from_png remakes it pixel for pixel
    (from a batch of one: in larger batches the model's arithmetic differs in the last bits)."""
    import numpy as np

    from helpers import txt2img
    from tiny_model import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    first = txt2img("--ckpt", ckpt, "--outdir", tmp_path / "first", "--prompt", "a (red:1.2) circle", "--steps", 3,
                    "--sampler", "Euler a", "--schedule", "karras", "--H", 64, "--W", 32, "--n_samples", 1,
                    "--n_iter", 2, "--seed", 11, "--scale", 3, "--rng", "nv", "--skip_grid")
    assert first.returncode == 0, first.stderr
    second_image = sorted((tmp_path / "first" / "samples").iterdir())[1]  # seed 12, the second batch's
    again = txt2img("--ckpt", ckpt, "--outdir", tmp_path / "again", "--from_png", second_image, "--n_samples", 1,
                    "--n_iter", 1, "--skip_grid")
    assert again.returncode == 0, again.stderr
    remade, = (tmp_path / "again" / "samples").iterdir()
    with Image.open(second_image) as original, Image.open(remade) as copy:
        assert np.array_equal(np.asarray(original), np.asarray(copy))
        assert parse_parameters(copy.text["parameters"])[2]["Seed"] == "12"
