"""Every argument checked before the model is loaded, sizes that cannot fit refused, bad input files one line.

Most cases run a script's main() in this process with the model loader replaced by one that fails the
test, which proves the refusal comes before loading; a few run the script for real."""
import importlib.util
import io
import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image

from conftest import REPO
from ldm.generate import images, loading, memory, options, run
from ldm.generate.errors import UserError
from ldm.generate.output import OutputFolder
from ldm.generate.prompts import prompt_batches
from tiny_model import TINY_CONFIG, write_tiny_checkpoint

GIB = 1024 ** 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "picture.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def script(name):
    spec = importlib.util.spec_from_file_location(f"checked_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused_before_loading(name, argv, monkeypatch, capsys):
    """Run scripts/<name>.py's main(argv) with a loader that fails the test; (exit status, stderr)."""
    def load_from_args(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were refused")

    monkeypatch.setattr(loading, "load_from_args", load_from_args)
    main = script(name).main
    with pytest.raises(SystemExit) as exit_status:
        options.run_cli(lambda: main([str(arg) for arg in argv]))
    return exit_status.value.code, capsys.readouterr().err


def assert_one_line(status, stderr, expected):
    assert status == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert expected in stderr, stderr


BAD_SAMPLING = [
    (["--seed", 2 ** 64], "--seed 18446744073709551616 is outside 0..18446744073709551615"),
    (["--seed", -2], "--seed -2 is outside 0..18446744073709551615 (or -1 for a random one)"),  # -1: random (A1111)
    (["--ddim_steps", 100000], "--ddim_steps 100000 is more than the 1000 timesteps"),
    (["--ddim_steps", 0], "--ddim_steps must be at least 1"),
    (["--scale", "nan"], "--scale must be a finite number (got nan)"),
    (["--scale", "inf"], "--scale must be a finite number (got inf)"),
    (["--ddim_eta", "nan"], "--ddim_eta must be a finite number"),
    (["--ddim_eta=-inf"], "--ddim_eta must be a finite number"),
    (["--plms", "--dpm_solver"], "--plms and --dpm_solver ask for two samplers: give one of them"),
    (["--dpm", "--plms"], "--dpm_solver and --plms ask for two samplers"),
    (["--n_samples", 10 ** 9], "--n_samples 1000000000 asks for more than the 100000 images"),
    (["--n_iter", 10 ** 6], "--n_iter 1000000 asks for more than the 100000 images"),
    (["--n_iter", 1000, "--n_samples", 1000], "is 1000000 images, more than the 100000"),
    (["--n_rows", -1], "--n_rows must be 0"),
    (["--clip_skip", 0], "--clip_skip must be at least 1 (1 = the last layer; got 0)"),
    (["--H", 0], "--H 0 is not a positive multiple of 8: use 8 or more"),
    (["--H", -8], "--H -8 is not a positive multiple of 8: use 8 or more"),
    (["--W", 100], "--W 100 is not a positive multiple of 8: use 96 or 104"),
]


@pytest.mark.parametrize("extra, expected", BAD_SAMPLING, ids=[" ".join(map(str, e)) for e, _ in BAD_SAMPLING])
def test_txt2img_refuses_bad_sampling_arguments_before_loading(ckpt, tmp_path, monkeypatch, capsys, extra, expected):
    argv = ["--ckpt", ckpt, "--outdir", tmp_path / "out", "--H", 64, "--W", 64, *extra]
    assert_one_line(*refused_before_loading("txt2img", argv, monkeypatch, capsys), expected)
    assert not (tmp_path / "out" / "samples").exists()


BAD_IMAGE_ARGUMENTS = [
    ("img2img", ["--strength", "nan"], "--strength nan is outside [0, 1]"),
    ("img2img", ["--strength", "inf"], "--strength inf is outside [0, 1]"),
    ("inpaint", ["--seed", 2 ** 70], "--seed 1180591620717411303424 is outside"),
    ("upscale", ["--plms", "--dpm_solver"], "--plms and --dpm_solver ask for two samplers"),
    ("depth2img", ["--ddim_steps", 5000], "--ddim_steps 5000 is more than the 1000 timesteps"),
    ("img2img", ["--max_init_pixels", 0], "--max_init_pixels must be at least 64"),
]


@pytest.mark.parametrize("name, extra, expected", BAD_IMAGE_ARGUMENTS, ids=[f"{n} {e[0]}" for n, e, _ in BAD_IMAGE_ARGUMENTS])
def test_image_scripts_refuse_bad_arguments_before_loading(ckpt, picture, tmp_path, monkeypatch, capsys, name,
                                                            extra, expected):
    argv = ["--ckpt", ckpt, "--outdir", tmp_path / "out", "--init-img", picture, *extra]
    if name == "inpaint":
        Image.new("L", (64, 48), 255).save(tmp_path / "mask.png")
        argv += ["--mask", tmp_path / "mask.png"]
    assert_one_line(*refused_before_loading(name, argv, monkeypatch, capsys), expected)


def test_steps_beyond_the_models_own_schedule_are_refused(tmp_path, monkeypatch, capsys):
    config = tmp_path / "short.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("timesteps: 1000", "timesteps: 100"))
    short = write_tiny_checkpoint(tmp_path / "model", "short.safetensors", config=config)
    argv = ["--ckpt", short, "--outdir", tmp_path / "out", "--H", 64, "--W", 64, "--ddim_steps", 200]
    # Before loading, from the config beside the checkpoint...
    assert_one_line(*refused_before_loading("txt2img", argv, monkeypatch, capsys),
                    "--ddim_steps 200 is more than the 100 timesteps of short.safetensors's schedule: use 1..100")
    # ...and after, from the model itself.
    args = script("txt2img").parse_args([str(arg) for arg in argv])
    loaded = loading.load(short, None, "cpu", "full", log=lambda line: None)
    with pytest.raises(UserError, match="more than the 100 timesteps of short.safetensors's schedule"):
        options.job_for_model(args, "ddim", [["a prompt"]], loaded, 64, 64)


def test_arguments_are_checked_before_a_checkpoint_is_even_read(tmp_path):
    """For real: a checkpoint that would fail to load is never reached, and nothing says 'loaded'."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "txt2img.py"), "--ckpt", str(broken), "--outdir",
                             str(tmp_path / "out"), "--seed", str(2 ** 64), "--plms"],
                            capture_output=True, text=True, timeout=120)
    assert_one_line(result.returncode, result.stderr, "--seed 18446744073709551616 is outside")
    assert "loaded" not in result.stdout and not (tmp_path / "out").exists()


# --- memory ------------------------------------------------------------------------------------------------------
def test_a_run_too_large_is_refused_before_loading_with_what_would_fit(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device: GIB)
    monkeypatch.delenv(memory.SKIP_CHECK_ENV, raising=False)
    argv = ["--ckpt", ckpt, "--outdir", tmp_path / "out", "--H", 2048, "--W", 1024, "--n_samples", 8]
    status, stderr = refused_before_loading("txt2img", argv, monkeypatch, capsys)
    assert_one_line(status, stderr, "but cpu has 1.0 GiB available: use --n_samples ")
    suggested_batch = int(stderr.split("--n_samples ")[1].split()[0])
    assert 1 <= suggested_batch < 8
    architecture = memory.Architecture.from_config(options.config_before_loading(None, ckpt))
    fits = memory.Run(architecture, memory.Weights.of_file(ckpt, 4), suggested_batch, 2048, 1024, 4)
    assert memory.estimate_peak(fits)["peak"] <= GIB < memory.estimate_peak(fits.with_(batch=8))["peak"]
    assert "--n_samples 1 --H " in stderr and memory.SKIP_CHECK_ENV in stderr

    monkeypatch.setenv(memory.SKIP_CHECK_ENV, "1")  # the override: then the run goes on to loading
    with pytest.raises(AssertionError, match="the model was loaded"):
        refused_before_loading("txt2img", argv, monkeypatch, capsys)


def test_an_image_too_large_to_process_names_the_init_image_options(tmp_path, monkeypatch, ckpt, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device: GIB // 4)
    path = tmp_path / "large.png"
    Image.new("RGB", (1024, 1024)).save(path)
    argv = ["--ckpt", ckpt, "--outdir", tmp_path / "out", "--init-img", path, "--n_samples", 1]
    status, stderr = refused_before_loading("img2img", argv, monkeypatch, capsys)
    assert_one_line(status, stderr, "use --downscale_init --max_init_pixels ")


def test_lowmem_is_suggested_when_it_makes_the_weights_fit():
    weights = memory.Weights(unet=2 * GIB, autoencoder=GIB // 4, other=3 * GIB // 2)
    run = memory.Run(memory.Architecture(), weights, 1, 512, 512, 2)
    needed = memory.estimate_peak(run)["peak"]
    with pytest.raises(UserError, match="use --lowmem") as refusal:
        memory.check_fits(run, torch.device("cpu"), lambda h, w: f"--H {h} --W {w}", available=int(needed / 1.3))
    assert "--n_samples" not in str(refusal.value)
    memory.check_fits(run, torch.device("cpu"), None, available=needed)  # fits: nothing said


def test_weights_counted_from_the_safetensors_header_match_the_model(ckpt):
    from tiny_model import tiny_model
    from_file, from_model = memory.Weights.of_file(ckpt, 2), memory.Weights.of_model(tiny_model(), 2)
    assert (from_file.unet, from_file.autoencoder) == (from_model.unet, from_model.autoencoder)
    assert memory.Weights.of_file(ckpt.with_suffix(".missing"), 4).total == 0


MEASURE_DECODE = """
import sys
sys.path.insert(0, {tests!r})
import torch
from tiny_model import tiny_model
model = tiny_model()
z = torch.randn(2, 4, 64, 64)
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
with torch.inference_mode():
    model.decode_first_stage(z[:, :, :8, :8])  # the framework's one-time buffers, not the decode's
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    model.decode_first_stage(z)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_the_decode_estimate_is_within_half_and_double_of_a_measured_decode():
    from tiny_model import tiny_model
    result = subprocess.run([sys.executable, "-c", MEASURE_DECODE.format(tests=str(REPO / "tests"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = int(result.stdout.split()[-1])
    run = memory.Run(memory.Architecture.from_config(options.config_before_loading(TINY_CONFIG, None)),
                     memory.Weights.of_model(tiny_model(), 4), 2, 512, 512, 4, weights_loaded=True)
    estimated = memory.estimate_peak(run)["decoder"]
    assert measured / 2 <= estimated <= measured * 2, (estimated, measured)


# --- input pictures ------------------------------------------------------------------------------------------------
def png_declaring(path, width, height):
    """A valid 1x1 PNG whose header declares width x height: a decompression bomb of a few bytes."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # the IHDR chunk's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("downscale", [False, True])
def test_a_decompression_bomb_is_refused_in_one_line(ckpt, tmp_path, monkeypatch, capsys, downscale):
    bomb = png_declaring(tmp_path / "bomb.png", 200_000, 200_000)
    argv = ["--ckpt", ckpt, "--outdir", tmp_path / "out", "--init-img", bomb] + (["--downscale_init"] if downscale else [])
    status, stderr = refused_before_loading("img2img", argv, monkeypatch, capsys)
    expected = "declares 200000x200000 pixels" if downscale else "is 200000x200000 = 40000000000 pixels, over the limit"
    assert_one_line(status, stderr, expected)
    assert Image.MAX_IMAGE_PIXELS == images.BOMB_PIXELS  # PIL's own limit is back as it was


def test_a_large_picture_is_refused_or_shrunk_when_asked(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("RGB", (1200, 600), (10, 200, 10)).save(path)
    with pytest.raises(UserError, match=r"wide.jpg is 1200x600 = 720000 pixels, over the limit of 100000: pass "
                                        r"--downscale_init"):
        images.load_image(path, limits=images.Limits(100_000))
    lines = []
    pixels = images.load_image(path, log=lines.append, limits=images.Limits(100_000, downscale=True))
    height, width = pixels.shape[-2:]
    assert height * width <= 100_000 * 1.02 and abs(width / height - 2) < 0.05
    assert any("shrunk --init-img wide.jpg from 1200x600" in line for line in lines)


# --- prompt files --------------------------------------------------------------------------------------------------
def large_sparse_file(path):
    with open(path, "wb") as file:
        file.truncate(17 * 1024 ** 2)
    return path


PROMPT_FILES = {
    "device": (lambda tmp: "/dev/zero", "is a device, not a text file"),
    "directory": (lambda tmp: tmp, "is a directory"),
    "binary": (lambda tmp: (tmp / "b.bin").write_bytes(b"abc\x00\x01\x02") and tmp / "b.bin", "holds binary data"),
    "latin-1": (lambda tmp: (tmp / "l.txt").write_bytes("caf\xe9\n".encode("latin-1")) and tmp / "l.txt",
                "is not UTF-8 text (byte 3)"),
    "too large": (large_sparse_file, "is larger than 16 MiB"),
}


@pytest.mark.parametrize("kind", PROMPT_FILES)
def test_unreadable_prompt_files_are_one_line(ckpt, tmp_path, monkeypatch, capsys, kind):
    make, expected = PROMPT_FILES[kind]
    target = make(tmp_path / "big.txt") if kind == "too large" else make(tmp_path)
    argv = ["--ckpt", ckpt, "--outdir", tmp_path / "out", "--H", 64, "--W", 64, "--from-file", target]
    assert_one_line(*refused_before_loading("txt2img", argv, monkeypatch, capsys), expected)


def test_too_many_prompts_with_repeat_are_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(UserError, match="2 prompts x --repeat 60000 is more than the 100000 images"):
        prompt_batches("", path, 4, repeat=60_000)


def test_a_byte_order_mark_is_dropped_from_the_prompt_and_its_metadata(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufefffirst prompt\nsecond prompt\n".encode("utf-8"))
    out = tmp_path / "out"
    main = script("txt2img").main
    status = main([str(arg) for arg in ("--ckpt", ckpt, "--outdir", out, "--H", 64, "--W", 64, "--ddim_steps", 1,
                                        "--n_samples", 2, "--n_iter", 1, "--from-file", prompts, "--skip_grid")])
    assert status == 0, capsys.readouterr().err
    texts = []
    for sample in sorted((out / "samples").iterdir()):
        with Image.open(sample) as image:
            texts.append(image.text["parameters"])
    assert [text.splitlines()[0] for text in texts] == ["first prompt", "second prompt"]
    assert not any("\ufeff" in text for text in texts)


# --- messages ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, multiple, expected", [
    (0, 8, "use 8 or more"), (-8, 8, "use 8 or more"), (3, 8, "use 8 or more"), (100, 8, "use 96 or 104"),
    (520, 64, "use 512 or 576"),
])
def test_dimension_suggestions_are_positive_multiples(value, multiple, expected):
    with pytest.raises(UserError) as refusal:
        options.check_dimension("--H", value, multiple)
    assert str(refusal.value) == f"--H {value} is not a positive multiple of {multiple}: {expected}"
    options.check_dimension("--H", multiple, multiple)


@pytest.mark.parametrize("precision, advised", [("full", False), ("bf16", True)])
def test_nan_advice_fits_the_dtype_used(ckpt, tmp_path, precision, advised):
    loaded = loading.load(ckpt, None, "cpu", precision, log=lambda line: None)
    loaded.model.decode_first_stage = lambda z: torch.full((z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8), float("nan"))

    class Noise(run.Task):
        def start(self, batch):
            return run.Start(batch.noise.randn(batch.latent_shape), batch.cond, batch.uncond)

    lines = []
    job = run.Job(batches=[["a prompt"]], steps=1, height=64, width=64, save_grid=False, watermark=False)
    report = run.run(job, Noise(), loaded, OutputFolder(tmp_path / "out"), log=lines.append)
    nan_lines = [line for line in lines if "came out NaN" in line]
    assert len(report.failed) == 1 and len(nan_lines) == 1
    assert ("--precision full" in nan_lines[0]) == advised, nan_lines
    assert advised or "fp32 already" in nan_lines[0]
