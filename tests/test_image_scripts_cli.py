"""scripts/img2img.py, inpaint.py and upscale.py on tiny models: one real run each, and every bad input.

A bad input is one line on stderr, exit status 2, and no picture written. Those cases run the scripts'
main() in this process (the same code path as the command line, without a second start of Python).
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from ldm.generate.options import run_cli
from tiny_model import write_tiny_checkpoint

TINY = REPO / "configs" / "tiny"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        "text": write_tiny_checkpoint(folder, "text.safetensors"),
        "inpaint": write_tiny_checkpoint(folder, "inpaint.safetensors", config=TINY / "inpaint-tiny.yaml"),
        "upscale": write_tiny_checkpoint(folder, "upscale.safetensors", config=TINY / "upscale-tiny.yaml"),
    }


@pytest.fixture()
def files(tmp_path):
    """A 70x60 picture and a mask for it (white = repaint the middle)."""
    rng = np.random.default_rng(0)
    picture = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(picture)
    mask_array = np.zeros((60, 70), dtype=np.uint8)
    mask_array[20:40, 20:50] = 255
    mask = tmp_path / "mask.png"
    Image.fromarray(mask_array).save(mask)
    return {"picture": picture, "mask": mask}


def run_script(name, *args, timeout=240):
    env = {**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/ldm-test-cache")}
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def fields_of(path):
    with Image.open(path) as image:
        return dict(item.split(": ", 1) for item in image.text["parameters"].splitlines()[-1].split(", "))


def test_img2img_writes_pictures_at_the_input_size_with_the_strength(ckpts, files, tmp_path):
    out = tmp_path / "out"
    result = run_script("img2img", "--ckpt", ckpts["text"], "--init-img", files["picture"], "--outdir", out,
                        "--ddim_steps", 4, "--strength", 0.5, "--n_samples", 2)
    assert result.returncode == 0, result.stderr
    assert "resized picture.png from 70x60 to 72x64" in result.stdout
    samples = sorted((out / "samples").iterdir())
    assert len(samples) == 2 and (out / "grid-0000.png").is_file()
    with Image.open(samples[0]) as image:
        assert image.size == (72, 64)
    fields = fields_of(samples[0])
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "72x64" and fields["CFG scale"] == "5.0"


def test_inpaint_with_an_inpainting_checkpoint(ckpts, files, tmp_path):
    out = tmp_path / "out"
    result = run_script("inpaint", "--ckpt", ckpts["inpaint"], "--init-img", files["picture"], "--mask", files["mask"],
                        "--outdir", out, "--ddim_steps", 3, "--n_samples", 1, "--skip_grid")
    assert result.returncode == 0, result.stderr
    (sample,) = (out / "samples").iterdir()
    assert fields_of(sample)["Denoising strength"] == "1.0"


def test_upscale_makes_a_picture_four_times_as_large(ckpts, files, tmp_path):
    out = tmp_path / "out"
    result = run_script("upscale", "--ckpt", ckpts["upscale"], "--init-img", files["picture"], "--outdir", out,
                        "--ddim_steps", 2, "--skip_grid", "--noise_level", 100)
    assert result.returncode == 0, result.stderr
    (sample,) = (out / "samples").iterdir()
    with Image.open(sample) as image:
        assert image.size == (280, 240)
    assert fields_of(sample)["Noise level"] == "100"


def main_in_process(name, argv, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_status:
        run_cli(module.main)
    return exit_status.value.code, capsys.readouterr().err


BAD_INPUTS = {
    # case: (script, checkpoint, extra arguments, what stderr says)
    "img2img_missing_picture": ("img2img", "text", ["--init-img", "{tmp}/nowhere.png"], "no such file"),
    "img2img_unreadable_picture": ("img2img", "text", ["--init-img", "{tmp}/mask.txt"], "cannot be read as an image"),
    "img2img_strength_above_1": ("img2img", "text", ["--init-img", "{picture}", "--strength", "1.5"], "outside [0, 1]"),
    "img2img_upscaler_checkpoint": ("img2img", "upscale", ["--init-img", "{picture}"], "needs a text-to-image model"),
    "img2img_no_picture_option": ("img2img", "text", [], "--init-img"),
    "inpaint_missing_mask": ("inpaint", "inpaint", ["--init-img", "{picture}", "--mask", "{tmp}/nowhere.png"],
                             "no such file"),
    "inpaint_mismatched_mask": ("inpaint", "inpaint", ["--init-img", "{picture}", "--mask", "{tmp}/tall.png"],
                                "must have the picture's shape"),
    "inpaint_unreadable_mask": ("inpaint", "inpaint", ["--init-img", "{picture}", "--mask", "{tmp}/mask.txt"],
                                "cannot be read as an image"),
    "inpaint_black_mask": ("inpaint", "inpaint", ["--init-img", "{picture}", "--mask", "{tmp}/black.png"],
                           "nothing to repaint"),
    "inpaint_negative_strength": ("inpaint", "text", ["--init-img", "{picture}", "--mask", "{mask}",
                                                      "--strength", "-0.2"], "outside [0, 1]"),
    "inpaint_upscaler_checkpoint": ("inpaint", "upscale", ["--init-img", "{picture}", "--mask", "{mask}"],
                                    "needs an inpainting or text-to-image model"),
    "upscale_noise_level_too_high": ("upscale", "upscale", ["--init-img", "{picture}", "--noise_level", "351"],
                                     "outside 0..350"),
    "upscale_negative_noise_level": ("upscale", "upscale", ["--init-img", "{picture}", "--noise_level", "-1"],
                                     "outside 0..350"),
    "upscale_txt2img_checkpoint": ("upscale", "text", ["--init-img", "{picture}"], "needs an x4 upscaling model"),
    "upscale_inpainting_checkpoint": ("upscale", "inpaint", ["--init-img", "{picture}"], "use scripts/inpaint.py"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, ckpts, files, tmp_path, monkeypatch, capsys):
    script, ckpt, extra, expected = BAD_INPUTS[case]
    (tmp_path / "mask.txt").write_text("not a picture")
    Image.new("L", (30, 70), 255).save(tmp_path / "tall.png")
    Image.new("L", (70, 60), 0).save(tmp_path / "black.png")
    values = {"tmp": tmp_path, "picture": files["picture"], "mask": files["mask"]}
    out = tmp_path / "out"
    argv = ["--ckpt", ckpts[ckpt], "--outdir", out, "--ddim_steps", 2] + [arg.format(**values) for arg in extra]
    status, stderr = main_in_process(script, argv, monkeypatch, capsys)
    assert status == 2
    assert expected in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("script,ckpt,extra", [
    ("inpaint", "inpaint", ["--mask", "{mask}", "--ddim_steps", 3]),
    ("upscale", "upscale", ["--ddim_steps", 2, "--noise_level", 100]),
])
def test_low_memory_mode_makes_the_same_pictures(ckpts, files, tmp_path, monkeypatch, capsys, script, ckpt, extra):
    pictures = []
    for mode in ([], ["--lowmem"]):
        out = tmp_path / (mode[0] if mode else "normal")
        argv = ["--ckpt", ckpts[ckpt], "--init-img", files["picture"], "--outdir", out, "--n_samples", 1, "--skip_grid",
                *[str(arg).format(mask=files["mask"]) for arg in extra], *mode]
        status, err = main_in_process(script, argv, monkeypatch, capsys)
        assert status == 0, err
        (sample,) = (out / "samples").iterdir()
        pictures.append(np.asarray(Image.open(sample)))
    assert np.array_equal(*pictures)
