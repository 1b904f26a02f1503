"""ControlNet units in the generation layer (ldm.generate.control): weights, start/end, several units, the
control modes against A1111's extension's formulas and diffusers' guess mode, the preprocessors, the resize
modes, the infotext and --from_png, A1111's API units, the command line end to end, and bad input.

The tiny model (configs/tiny/txt2img-tiny.yaml) with a tiny ControlNet of its shape (configs/tiny/controlnet-
tiny.yaml) whose weights, zero convolutions included, are random, so that every residual is non-zero.
"""
import base64
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO
from helpers import txt2img
from ldm.checkpoint import find_config, guess_config
from ldm.controlnet_file import find_controlnet
from ldm.generate import control, preprocessors
from ldm.generate.control import ActiveUnit, ControlPass, ControlUnit, RunControl
from ldm.generate.errors import UserError
from ldm.generate.infotext import png_option_defaults
from ldm.generate.loading import LoadedModel
from ldm.pipeline import Pipeline
from ldm.util import instantiate_from_config
from tiny_model import TINY_CONFIG, tiny_model, write_tiny_checkpoint

CONTROL_CONFIG = REPO / "configs" / "tiny" / "controlnet-tiny.yaml"
STEPS = 4
QUIET = {"num_inference_steps": STEPS, "height": 64, "width": 64, "seed": 3}


def write_tiny_controlnet(path: Path, seed: int = 1, context_dim: int | None = None) -> Path:
    """A 1.1-style file (control_model.* keys) of the tiny ControlNet, every weight random."""
    config = OmegaConf.load(CONTROL_CONFIG).model.params.control_stage_config
    if context_dim is not None:
        config.params.context_dim = context_dim
    torch.manual_seed(seed)
    network = instantiate_from_config(config)
    with torch.no_grad():
        for p in network.parameters():
            if p.abs().sum() == 0:  # the zero convolutions: a fresh ControlNet would add nothing
                p.normal_(0, 0.05)
    save_file({"control_model." + k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


def square_picture(height=80, width=64) -> np.ndarray:
    picture = np.zeros((height, width, 3), np.uint8)
    picture[20:50, 10:40] = 255
    return picture


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control")
    ckpt = write_tiny_checkpoint(folder / "models")
    picture = folder / "square.png"
    Image.fromarray(square_picture()).save(picture)
    return {"ckpt": ckpt, "control": write_tiny_controlnet(folder / "models" / "control_tiny.safetensors"),
            "other": write_tiny_controlnet(folder / "control_other.safetensors", seed=2),
            "wide": write_tiny_controlnet(folder / "control_wide.safetensors", context_dim=64),
            "picture": picture, "folder": folder}


@pytest.fixture(scope="module")
def pipe(files):
    return Pipeline.from_pretrained(files["ckpt"], device="cpu", precision="full", log=lambda *_: None)


def loaded_tiny_with_config(config: Path = TINY_CONFIG) -> LoadedModel:
    model = tiny_model(config=config)
    return LoadedModel(model, OmegaConf.load(config), config, torch.device("cpu"), torch.float32,
                       latent_channels=model.channels, downsampling_factor=8, native_size=64)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int64)


# --- the run -------------------------------------------------------------------------------------------------
def test_zero_weight_unit_is_no_control_and_weight_one_is_not(pipe, files):
    plain = pixels(pipe("a red square", **QUIET))
    zero = pixels(pipe("a red square", control=[ControlUnit(files["control"], files["picture"], weight=0)], **QUIET))
    one = pixels(pipe("a red square", control=[ControlUnit(files["control"], files["picture"])], **QUIET))
    assert np.array_equal(plain, zero)
    assert np.abs(plain - one).max() > 0


def count_control_calls(pipe, unit, monkeypatch) -> list:
    """The batch sizes the ControlNet ran on, in order, for a run with `unit`."""
    calls = []
    original = control.ActiveUnit.residuals

    def recording(self, x, t, context, uncond_rows):
        result = original(self, x, t, context, uncond_rows)
        calls.append((int(t[0]), x.shape[0] - (uncond_rows if self.unit.mode == "control" else 0)))
        return result

    monkeypatch.setattr(control.ActiveUnit, "residuals", recording)
    pipe("a red square", control=[unit], **QUIET)
    return calls


def test_start_and_end_choose_the_steps(pipe, files, monkeypatch):
    # DDIM, 4 steps: step i has fraction i / 4; start 0.5 and end 0.75 take steps 2 and 3 (the last two)
    calls = count_control_calls(pipe, ControlUnit(files["control"], files["picture"], start=0.5, end=0.75), monkeypatch)
    timesteps = [t for t, _ in calls]
    assert len(calls) == 2 and timesteps == sorted(timesteps, reverse=True)
    assert all(rows == 2 for _, rows in calls)  # guided: the unconditional and the conditional row


def test_control_mode_runs_the_controlnet_on_the_conditional_rows_only(pipe, files, monkeypatch):
    calls = count_control_calls(pipe, ControlUnit(files["control"], files["picture"], mode="control"), monkeypatch)
    assert len(calls) == STEPS and all(rows == 1 for _, rows in calls)


def test_low_memory_gives_the_same_picture_and_hires_fix_controls_both_passes(pipe, files, monkeypatch):
    unit = ControlUnit(files["control"], files["picture"], preprocessor="canny")
    releases, hint_sizes = [], []
    original_release, original_hint = RunControl.release, ActiveUnit.hint
    monkeypatch.setattr(RunControl, "release", lambda self: releases.append(1) or original_release(self))
    monkeypatch.setattr(ActiveUnit, "hint", lambda self, h, w, *a: hint_sizes.append((h, w)) or original_hint(self, h, w, *a))
    low_memory = Pipeline.from_pretrained(files["ckpt"], device="cpu", precision="full", low_memory=True,
                                          log=lambda *_: None)
    assert np.array_equal(pixels(low_memory("a red square", control=[unit], **QUIET)),
                          pixels(pipe("a red square", control=[unit], **QUIET)))
    assert len(releases) == 2  # after the files were checked, and after the pass: one more component
    hint_sizes.clear()
    result = pipe("a red square", control=[unit], hr_scale=2.0, denoising_strength=0.5, **QUIET)
    assert result.images[0].size == (128, 128)
    assert set(hint_sizes) == {(8, 8), (16, 16)}  # the map fitted to each pass's size


@pytest.fixture(scope="module")
def two_units(files):
    loaded = loaded_tiny_with_config()
    units = [ControlUnit(files["control"], square_picture(), weight=0.7),
             ControlUnit(files["other"], square_picture(), weight=1.3, preprocessor="invert", resize="just_resize")]
    return loaded, RunControl(units, loaded, log=lambda *_: None)


def call_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    return x, torch.tensor([500, 500]), context


def test_several_units_sum_their_weighted_residuals(two_units):
    _, run_control = two_units
    x, t, context = call_inputs()
    both = ControlPass(run_control.units, STEPS)(x, t, context, uncond_rows=1)["control"]
    expected = None
    for active in run_control.units:
        hint = active.hint(8, 8, x.device, x.dtype).expand(2, -1, -1, -1)
        raw = active.network.model(x, hint, t, context)
        scaled = [r * active.unit.weight for r in raw]
        expected = scaled if expected is None else [a + b for a, b in zip(expected, scaled)]
    assert len(both) == len(expected) == 5  # the tiny UNet: 4 input blocks and the middle block
    for ours, reference in zip(both, expected):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_modes_follow_the_extensions_formulas(two_units):
    _, run_control = two_units
    active = run_control.units[0]
    x, t, context = call_inputs(1)
    hint = active.hint(8, 8, x.device, x.dtype)
    raw = active.network.model(x, hint.expand(2, -1, -1, -1), t, context)
    raw_cond_only = active.network.model(x[1:], hint, t[1:], context[1:])
    weight = active.unit.weight
    for mode in ("balanced", "prompt", "control"):
        unit = ActiveUnit(ControlUnit(active.unit.model, None, weight=weight, mode=mode), "", active.path,
                          active.detected, active.network, active.hints)
        residuals = unit.residuals(x, t, context, uncond_rows=1)
        for i, (ours, reference, cond_only) in enumerate(zip(residuals, raw, raw_cond_only)):
            scale = weight if mode == "balanced" else weight * 0.825 ** (len(raw) - 1 - i)
            if mode == "control":  # cfg injection: the unguided row gets nothing
                assert torch.count_nonzero(ours[:1]) == 0
                torch.testing.assert_close(ours[1:], cond_only * scale, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(ours, reference * scale, rtol=1e-5, atol=1e-6)


def test_control_mode_is_diffusers_guess_mode_for_sd():
    """diffusers' guess mode scales SD's 13 residuals by torch.logspace(-1, 0, 13) (StableDiffusionControlNet-
    Pipeline / ControlNetModel.forward with guess_mode) and gives the unconditional half none; the extension's
    0.825 ** (12 - i) is within 0.6 % of it."""
    ours = torch.tensor(control.residual_scales(13, 1.0, "control"), dtype=torch.float64)
    theirs = torch.logspace(-1, 0, 13, dtype=torch.float64)
    assert torch.allclose(ours, theirs, rtol=6e-3)
    assert control.residual_scales(13, 0.5, "balanced") == [0.5] * 13


# --- pictures ----------------------------------------------------------------------------------------------
def test_preprocessors_on_a_synthetic_picture():
    picture = square_picture(64, 64)
    edges = preprocessors.detect("canny", picture, resolution=64)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    inside, outside = edges[25:45, 15:35], np.concatenate([edges[:15].ravel(), edges[55:].ravel()])
    assert inside.max() == 0 and outside.max() == 0 and edges[20:50, 10:40].max() == 255  # edges at the border only
    assert np.array_equal(preprocessors.detect("invert", picture), 255 - picture)
    assert np.array_equal(preprocessors.detect("none", picture), picture)
    grey = np.full((64, 64, 3), 200, np.uint8)
    grey[:, :32] = 40
    binary = preprocessors.detect("binary", grey, threshold_a=100, resolution=64)
    assert binary[:, :32].min() == 255 and binary[:, 32:].max() == 0  # dark parts white, as the extension
    assert np.array_equal(preprocessors.detect("binary", grey, resolution=64), binary)  # 0: Otsu's
    assert preprocessors.detect("canny", picture, resolution=128).shape == (128, 128, 3)
    with pytest.raises(UserError, match="--midas"):
        preprocessors.detect("depth_midas", picture)
    with pytest.raises(UserError, match="unknown ControlNet preprocessor"):
        preprocessors.resolve_preprocessor("openpose")
    assert preprocessors.resolve_preprocessor("Depth") == "depth_midas"


@pytest.mark.slow
def test_depth_midas_with_weights_from_a_file(tmp_path):
    """depth_midas with a MiDaS release file (full-size random weights): bright = near, 0..255, the picture's size."""
    from ldm.modules.midas.api import MiDaSInference

    torch.manual_seed(0)
    network = MiDaSInference()
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.normal_(0, 0.1 if p.ndim == 1 else p[0].numel() ** -0.5)
    path = tmp_path / "dpt_hybrid-midas-501f0c75.pt"
    torch.save(network.model.state_dict(), path)
    del network
    estimator = preprocessors.DepthEstimator(path)
    depth = preprocessors.detect("depth_midas", square_picture(96, 128), resolution=96, depth=estimator)
    assert depth.shape == (96, 128, 3) and depth.min() == 0 and depth.max() == 255
    assert np.array_equal(depth[:, :, 0], depth[:, :, 2])


def test_resize_modes():
    picture = np.zeros((40, 80, 3), np.uint8)
    picture[:, :40] = 255  # left half white
    picture[0] = picture[-1] = 100  # borders whose median fills
    picture[:, 0] = picture[:, -1] = 100
    stretched = control.fit(picture, 64, 64, "just_resize")
    cropped = control.fit(picture, 64, 64, "crop_and_resize")
    filled = control.fit(picture, 64, 64, "resize_and_fill")
    assert stretched.shape == cropped.shape == filled.shape == (64, 64, 3)
    assert cropped[32, 0, 0] == 255 and cropped[32, 63, 0] == 0  # the centre, 64 of the 128 scaled columns
    assert (filled[:14] == 100).all() and (filled[-14:] == 100).all()  # 32 rows of picture, centred
    assert filled[32, 10, 0] == 255 and filled[32, 50, 0] == 0


def test_hint_size_follows_the_latent_and_hint_downsample(two_units):
    _, run_control = two_units
    active = run_control.units[0]
    assert active.hint(8, 6, "cpu", torch.float32).shape == (1, 3, 64, 48)
    assert active.hint(8, 6, "cpu", torch.float32).max() <= 1.0


# --- infotext, --from_png and A1111's API ----------------------------------------------------------------------
def test_infotext_as_the_extension_writes_it_and_from_png_reads_it(pipe, files):
    unit = ControlUnit(files["control"], files["picture"], weight=0.5, start=0.1, end=0.9, mode="prompt",
                       resize="resize_and_fill", preprocessor="canny", threshold_a=50, threshold_b=150)
    text = pipe("a red square", control=[unit], **QUIET).infotexts[0]
    name = f"control_tiny [{control.short_hash(files['control'])}]"
    assert ('ControlNet 0: "Module: canny, Model: ' + name + ', Weight: 0.5, Resize Mode: Resize and Fill, '
            'Low Vram: False, Processor Res: 512, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.1, '
            'Guidance End: 0.9, Pixel Perfect: False, Control Mode: My prompt is more important, Hr Option: Both, '
            'Save Detected Map: True"') in text
    notes = []
    defaults = png_option_defaults(text, {"prompt", "control_from_png"}, log=notes.append)
    assert not any("ControlNet" in note for note in notes)
    restored = defaults["control_from_png"]
    assert restored == [{"model": name, "preprocessor": "canny", "weight": 0.5, "start": 0.1, "end": 0.9,
                         "threshold_a": 50.0, "threshold_b": 150.0, "processor_res": 512,
                         "resize": "Resize and Fill", "mode": "My prompt is more important", "pixel_perfect": False}]
    unit = ControlUnit(**restored[0], image=files["picture"]).checked("--control 0")
    assert (unit.mode, unit.resize, unit.preprocessor) == ("prompt", "resize_and_fill", "canny")
    assert find_controlnet(unit.model, [files["control"].parent]) == files["control"]


def test_pixel_perfect_runs_the_preprocessor_at_the_pictures_fitted_size(pipe, files):
    picture = square_picture()  # 80 x 64 (height x width), fitted to 128 x 128
    quiet = {**QUIET, "height": 128, "width": 128}
    for resize, expected in (("crop_and_resize", 128), ("resize_and_fill", 102)):  # x 2 to cover, x 1.6 to fit
        assert control.pixel_perfect_resolution(80, 64, 128, 128, resize) == expected
        unit = ControlUnit(files["control"], files["picture"], preprocessor="canny", resize=resize, pixel_perfect=True)
        assert np.array_equal(control.detect_for(unit, picture, (128, 128)),
                              preprocessors.detect("canny", picture, resolution=expected))
        text = pipe("a red square", control=[unit], **quiet).infotexts[0]
        assert f"Processor Res: {expected}," in text and "Pixel Perfect: True" in text
        restored = png_option_defaults(text, {"prompt", "control_from_png"}, log=print)["control_from_png"][0]
        assert (restored["pixel_perfect"], restored["processor_res"]) == (True, expected)
    plain = ControlUnit(files["control"], files["picture"], preprocessor="canny")
    assert np.array_equal(control.detect_for(plain, picture, (128, 128)), preprocessors.detect("canny", picture))
    parser = __import__("argparse").ArgumentParser()
    control.add_arguments(parser)
    given = ["--control", "a", "--control_image", "x.png", "--control", "b", "--control_image", "y.png"]
    args = parser.parse_args(given + ["--control_pixel_perfect", "yes", "--control_pixel_perfect", "no"])
    assert [unit.pixel_perfect for unit in control.units_from_args(args)] == [True, False]
    with pytest.raises(SystemExit):
        parser.parse_args(given[:4] + ["--control_pixel_perfect", "maybe"])


def test_controlnet_weights_count_in_the_memory_estimate(files):
    from ldm.controlnet_file import read_controlnet
    from ldm.generate import memory

    weights, _ = read_controlnet(files["control"])
    one = sum(tensor.numel() for tensor in weights.values()) * 2
    units = [ControlUnit("control_tiny", files["picture"]), ControlUnit(files["control"], files["picture"]),
             ControlUnit("no such controlnet", files["picture"])]  # refused later, by the loader, with its reason
    assert control.weights_bytes(units, [files["control"].parent], itemsize=2) == 2 * one
    run = memory.Run(memory.Architecture(), memory.Weights(3000, 1000, 500), 1, 512, 512, 2)
    for lowmem, resident in ((False, 4500 + 2 * one), (True, 3000 + 2 * one)):
        plain, controlled = run.with_(lowmem=lowmem), run.with_(lowmem=lowmem, control=2 * one)
        assert memory.estimate_peak(controlled)["weights"] == resident
        assert memory.estimate_peak(controlled)["peak"] - memory.estimate_peak(plain)["peak"] == 2 * one


def test_a1111_api_units(files):
    encoded = base64.b64encode(files["picture"].read_bytes()).decode()
    units = control.units_from_a1111([
        {"input_image": encoded, "module": "canny", "model": "control_tiny [abcdef12]", "weight": 0.8,
         "resize_mode": "Just Resize", "processor_res": 256, "threshold_a": 60, "threshold_b": -1,
         "guidance_start": 0.2, "guidance_end": 0.8, "control_mode": 2, "pixel_perfect": False},
        {"input_image": encoded, "model": "x", "enabled": False}])
    assert len(units) == 1
    unit = units[0]
    assert (unit.model, unit.weight, unit.resize, unit.mode, unit.preprocessor) == \
        ("control_tiny [abcdef12]", 0.8, "just_resize", "control", "canny")
    assert (unit.threshold_a, unit.threshold_b, unit.processor_res, unit.start, unit.end) == (60.0, None, 256, 0.2, 0.8)
    assert np.asarray(unit.image).shape == (80, 64, 3)
    with pytest.raises(UserError, match="no input_image"):
        control.units_from_a1111([{"model": "control_tiny"}])
    with pytest.raises(UserError, match="base64"):
        control.units_from_a1111([{"input_image": "bm90IGEgcGljdHVyZQ==", "model": "control_tiny"}])
    assert control.model_list([files["control"].parent])[0] == f"control_tiny [{control.short_hash(files['control'])}]"
    assert "canny" in control.module_list() and "none" in control.module_list()


def test_guess_config_picks_the_controlnet_configs():
    text = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    whole = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3), text: torch.empty(1, 1),
             "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, 768)}
    assert guess_config(whole) == "cldm_v15.yaml"
    assert find_config(Path("/nonexistent/control_sd15_canny.pth"), whole) == REPO / "configs/controlnet/cldm_v15.yaml"
    whole["control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.empty(320, 1024)
    assert guess_config(whole) == "cldm_v21.yaml"


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_units_are_one_line_user_errors(files):
    loaded = loaded_tiny_with_config()
    with pytest.raises(UserError, match=r"--control 0: ControlNet .*control_wide.*text width 64.*text width 32"):
        RunControl([ControlUnit(files["wide"], square_picture())], loaded)
    with pytest.raises(UserError, match="no such file"):
        RunControl([ControlUnit(files["control"], files["folder"] / "missing.png")], loaded)
    upscaler = loaded_tiny_with_config(REPO / "configs" / "tiny" / "upscale-tiny.yaml")
    with pytest.raises(UserError, match="upscale-tiny.yaml is a model for x4 upscaling, which takes no ControlNet"):
        RunControl([ControlUnit(files["control"], square_picture())], upscaler)
    with pytest.raises(UserError, match="start 0.8 is after its end 0.2"):
        ControlUnit(files["control"], "x.png", start=0.8, end=0.2).checked("--control 0")
    with pytest.raises(UserError, match="weight 3 is outside 0..2"):
        ControlUnit(files["control"], "x.png", weight=3).checked("--control 0")
    with pytest.raises(UserError, match="unknown mode 'loud'"):
        ControlUnit(files["control"], "x.png", mode="loud").checked("--control 0")


# --- the command line --------------------------------------------------------------------------------------------
def test_txt2img_with_two_units_end_to_end(files, tmp_path):
    outdir = tmp_path / "out"
    (outdir).mkdir()
    Image.new("RGB", (8, 8)).save(outdir / "control-0001.png")  # an earlier map: kept, never overwritten
    result = txt2img("--ckpt", files["ckpt"], "--device", "cpu", "--precision", "full", "--prompt", "a red square",
                     "--H", 64, "--W", 64, "--ddim_steps", 2, "--n_samples", 1, "--n_iter", 1, "--skip_grid",
                     "--outdir", outdir, "--controlnet_dir", files["control"].parent,
                     "--control", "control_tiny", "--control_image", files["picture"],
                     "--control_preprocessor", "canny", "--canny_low", 50, "--canny_high", 150,
                     "--control", files["other"], "--control_image", files["picture"],
                     "--control_preprocessor", "invert", "--canny_low", 100, "--canny_high", 200,
                     "--control_weight", 0.5, "--control_weight", 1.0, "--control_mode", "balanced",
                     "--control_mode", "control", "--save_control_maps")
    assert result.returncode == 0, result.stderr
    text = Image.open(outdir / "samples" / "00000.png").info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control_tiny [' in text and "Threshold A: 50.0" in text
    assert 'ControlNet 1: "Module: invert (from white bg & black line), Model: control_other [' in text
    assert "Control Mode: ControlNet is more important" in text
    maps = [np.asarray(Image.open(outdir / f"control-{n:04}.png")) for n in (2, 3)]
    assert Image.open(outdir / "control-0001.png").size == (8, 8)
    assert maps[0].shape == (64, 64, 3) and set(np.unique(maps[0])) <= {0, 255}  # canny's edges, fitted
    assert maps[1].shape == (64, 64, 3) and maps[1].max() == 255


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mismatched_option_counts_are_refused_before_loading(files, tmp_path, monkeypatch):
    """run_cli prints a UserError as its one line and exits 2 (tests/test_argument_checks.py runs that path)."""
    monkeypatch.setattr("ldm.generate.loading.load", lambda *a, **k: pytest.fail("loaded the model"))
    img2img = script_module("img2img")
    common = ["--ckpt", str(files["ckpt"]), "--init-img", str(files["picture"]), "--outdir", str(tmp_path)]
    twice = ["--control", str(files["control"]), "--control", str(files["other"]),
             "--control_image", str(files["picture"]), "--control_image", str(files["picture"])]
    with pytest.raises(UserError) as refused:
        img2img.main(common + twice + ["--control_weight", "0.5"])
    assert str(refused.value) == ("--control_weight is given 1 times for 2 --control: give it once per --control "
                                  "(the i-th for the i-th), or never for the defaults")
    with pytest.raises(UserError, match="--control_preprocessor is given without --control"):
        img2img.main(common + ["--control_preprocessor", "canny"])
    with pytest.raises(UserError, match="--control needs a control picture"):
        img2img.main(common + ["--control", str(files["control"])])
    assert not any(tmp_path.iterdir())
