"""Loading checkpoints: every file format and dtype gives the same weights; bad files fail in one line.

Mostly on the tiny config (a few-channel model with the classes of SD 1.x), so each load takes a fraction
of a second. Where a full-size layout matters (which config a checkpoint fits), the state dicts are built
on the meta device from the reference key lists: the right shapes, no memory. Peak memory is measured on
a wider variant of the tiny model (200 MB of weights), each load in a fresh process.
"""
import json
import os
import pickle
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO, reference_path
from ldm.checkpoint import (
    CheckpointError,
    find_config,
    is_v_prediction,
    load_model,
    load_state_dict_strictly,
    parameters_on_meta,
    read_checkpoint,
)
from ldm.modules.ema import ema_name
from ldm.placement import mapped_ranges
from ldm.util import instantiate_from_config

TINY_CONFIG = REPO / "configs" / "tiny" / "txt2img-tiny.yaml"
CONFIG_DIR = REPO / "configs" / "stable-diffusion"
FILE_FORMATS = ["ckpt", "ckpt-flat", "safetensors"]
FILE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POSITION_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def quiet(message):
    pass


def build_on_meta(config_path):
    with parameters_on_meta():
        return instantiate_from_config(OmegaConf.load(config_path).model, use_ema=False)


def random_weights(template: dict, generator: torch.Generator) -> dict:
    """Random values for the parameters (meta tensors) of a state dict; the real buffers are kept."""
    return {key: torch.randn(tensor.shape, generator=generator) * 0.1 if tensor.device.type == "meta" else tensor.clone()
            for key, tensor in template.items()}


@pytest.fixture(scope="module")
def tiny_weights() -> dict:
    """The tiny model's state dict with seeded random weights, as a training run would save it."""
    return random_weights(build_on_meta(TINY_CONFIG).state_dict(), torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_ema_weights() -> dict:
    """EMA copies of the tiny UNet's parameters under the original checkpoints' names; other values."""
    unet_parameters = {name: p for name, p in build_on_meta(TINY_CONFIG).model.named_parameters()}
    ema = random_weights({"model_ema." + ema_name(name): p for name, p in unet_parameters.items()},
                         torch.Generator().manual_seed(1))
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    return ema


def in_dtype(state_dict: dict, dtype: torch.dtype) -> dict:
    """The state dict as a file of that dtype holds it: every floating tensor converted, integers kept."""
    return {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}


def write_checkpoint(path, state_dict: dict, file_format: str):
    if file_format == "safetensors":
        safetensors.torch.save_file(state_dict, path)
    elif file_format == "ckpt":
        torch.save({"state_dict": state_dict, "global_step": 7}, path)
    elif file_format == "ckpt-flat":
        torch.save(state_dict, path)
    else:
        raise ValueError(file_format)
    return path


def checkpoint_path(tmp_path, file_format: str, name="model"):
    return tmp_path / f"{name}.{'safetensors' if file_format == 'safetensors' else 'ckpt'}"


def load_tiny(path, **options):
    return load_model(path, config_path=TINY_CONFIG, log=quiet, **options).model


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str):
    message = str(error.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def assert_parameters_equal(model: nn.Module, expected: dict):
    for name, parameter in model.named_parameters():
        assert parameter.dtype == expected[name].dtype, name
        assert torch.equal(parameter, expected[name]), name


# --- formats and dtypes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_ema", [False, True], ids=["plain", "with-ema"])
@pytest.mark.parametrize("file_dtype", FILE_DTYPES, ids=lambda dtype: str(dtype).replace("torch.", ""))
@pytest.mark.parametrize("file_format", FILE_FORMATS)
def test_every_format_and_dtype_loads_the_same_weights(tmp_path, tiny_weights, tiny_ema_weights,
                                                       file_format, file_dtype, with_ema):
    saved = in_dtype({**tiny_weights, **(tiny_ema_weights if with_ema else {})}, file_dtype)
    model = load_tiny(write_checkpoint(checkpoint_path(tmp_path, file_format), saved, file_format))
    # On a CPU the model is fp32 whatever the file holds; 16-bit files give their rounded weights.
    assert_parameters_equal(model, {key: tensor.float() for key, tensor in saved.items()})


def test_wrapped_ckpt_reports_its_training_step(tmp_path, tiny_weights):
    _state_dict, metadata = read_checkpoint(write_checkpoint(tmp_path / "model.ckpt", tiny_weights, "ckpt"))
    assert metadata["global_step"] == 7


@pytest.mark.parametrize("file_dtype", FILE_DTYPES, ids=lambda dtype: str(dtype).replace("torch.", ""))
def test_noise_schedule_comes_from_the_config_in_fp32(tmp_path, tiny_weights, file_dtype):
    """A 16-bit file stores a rounded schedule; the samplers need the exact fp32 one that the config defines."""
    path = write_checkpoint(tmp_path / "model.safetensors", in_dtype(tiny_weights, file_dtype), "safetensors")
    model = load_tiny(path, dtype=torch.bfloat16)
    exact = build_on_meta(TINY_CONFIG)
    for name, schedule in exact.named_buffers(recurse=False):
        assert getattr(model, name).dtype == torch.float32, name
        assert torch.equal(getattr(model, name), schedule), name


def test_a_schedule_that_disagrees_with_the_config_is_refused(tmp_path, tiny_weights):
    """A checkpoint trained with another noise schedule needs its own config, not a silently wrong one."""
    other_schedule = dict(tiny_weights, alphas_cumprod=tiny_weights["alphas_cumprod"] ** 1.1)
    with pytest.raises(CheckpointError) as error:
        load_tiny(write_checkpoint(tmp_path / "model.ckpt", other_schedule, "ckpt"))
    assert_one_line_error(error, "alphas_cumprod", "txt2img-tiny.yaml", "--config")


def test_a_checkpoint_without_schedule_buffers_loads(tmp_path, tiny_weights):
    """Files converted back from the diffusers layout carry only the networks' weights."""
    schedule_names = {name for name, _ in build_on_meta(TINY_CONFIG).named_buffers(recurse=False)}
    networks_only = {key: tensor for key, tensor in tiny_weights.items() if key not in schedule_names}
    model = load_tiny(write_checkpoint(tmp_path / "model.safetensors", networks_only, "safetensors"))
    assert torch.equal(model.alphas_cumprod, tiny_weights["alphas_cumprod"])
    assert_parameters_equal(model, tiny_weights)


# --- dtypes --------------------------------------------------------------------------------------------------
def test_bf16_when_asked(tmp_path, tiny_weights):
    model = load_tiny(write_checkpoint(tmp_path / "model.safetensors", tiny_weights, "safetensors"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_parameters_equal(model, {key: tensor.to(torch.bfloat16) for key, tensor in tiny_weights.items()})


def test_use_fp16_in_the_config_does_not_make_a_cpu_model_fp16(tmp_path, tiny_weights):
    """The SD 2.x configs set use_fp16: True, which made the originals crash on a CPU."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.use_fp16 = True
    config_path = tmp_path / "fp16-config.yaml"
    OmegaConf.save(config, config_path)
    path = write_checkpoint(tmp_path / "model.safetensors", in_dtype(tiny_weights, torch.float16), "safetensors")
    model = load_model(path, config_path=config_path, log=quiet).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert model.apply_model(x, torch.tensor([10]), context).dtype == torch.float32


def test_users_original_configs_ask_for_fp16():
    """The premise of the test above: the users' SD 2.x YAML files really do set use_fp16."""
    config = OmegaConf.load(reference_path("original-configs", "stability-v2-inference.yaml"))
    assert config.model.params.unet_config.params.use_fp16 is True


# --- EMA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_format", ["ckpt", "safetensors"])
def test_use_ema_loads_the_averaged_weights(tmp_path, tiny_weights, tiny_ema_weights, file_format):
    path = write_checkpoint(checkpoint_path(tmp_path, file_format), {**tiny_weights, **tiny_ema_weights}, file_format)
    model = load_tiny(path, use_ema=True)
    expected = dict(tiny_weights)
    for name, _ in model.model.named_parameters():
        expected["model." + name] = tiny_ema_weights["model_ema." + ema_name(name)]
    assert_parameters_equal(model, expected)
    assert not torch.equal(model.model.diffusion_model.out[2].weight, tiny_weights["model.diffusion_model.out.2.weight"])


def test_use_ema_without_ema_weights_says_so(tmp_path, tiny_weights):
    with pytest.raises(CheckpointError) as error:
        load_tiny(write_checkpoint(tmp_path / "model.ckpt", tiny_weights, "ckpt"), use_ema=True)
    assert_one_line_error(error, "EMA", "model_ema.", "without --use_ema")


# --- extras and mismatches -----------------------------------------------------------------------------------
def test_known_harmless_extras_are_accepted(tmp_path, tiny_weights):
    extras = {
        POSITION_IDS_KEY: torch.arange(77)[None],  # released SD 1.x files carry it
        "model_ema.decay": torch.tensor(0.9999),  # EMA bookkeeping without the averaged weights
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
    }
    model = load_tiny(write_checkpoint(tmp_path / "model.safetensors", {**tiny_weights, **extras}, "safetensors"))
    assert_parameters_equal(model, tiny_weights)


def test_unknown_extra_keys_are_refused(tmp_path, tiny_weights):
    extra = dict(tiny_weights, **{"model.diffusion_model.extra_layer.weight": torch.ones(3)})
    with pytest.raises(CheckpointError) as error:
        load_tiny(write_checkpoint(tmp_path / "model.ckpt", extra, "ckpt"))
    assert_one_line_error(error, "1 unexpected", "extra_layer", "txt2img-tiny.yaml", "--config")


def test_a_missing_key_is_named(tmp_path, tiny_weights):
    removed = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    incomplete = {key: tensor for key, tensor in tiny_weights.items() if key != removed}
    with pytest.raises(CheckpointError) as error:
        load_tiny(write_checkpoint(tmp_path / "model.ckpt", incomplete, "ckpt"))
    assert_one_line_error(error, "1 missing", removed, "txt2img-tiny.yaml", "--config")


def test_a_wrong_shape_is_named(tmp_path, tiny_weights):
    changed = "first_stage_model.decoder.conv_in.weight"
    reshaped = dict(tiny_weights, **{changed: torch.zeros(64, 4, 3, 3)})
    with pytest.raises(CheckpointError) as error:
        load_tiny(write_checkpoint(tmp_path / "model.safetensors", reshaped, "safetensors"))
    assert_one_line_error(error, "1 wrong shape", changed, "--config")


def test_tiny_checkpoint_with_the_sd1_config_is_refused(tmp_path, tiny_weights):
    path = write_checkpoint(tmp_path / "tiny.ckpt", tiny_weights, "ckpt")
    with pytest.raises(CheckpointError) as error:
        load_model(path, config_path=CONFIG_DIR / "v1-inference.yaml", log=quiet)
    assert_one_line_error(error, "does not fit config v1-inference.yaml", "missing", "unexpected", "--config")


def reference_state_dict_on_meta(keys_file: str) -> dict:
    """A full-size state dict with the keys and shapes of a real checkpoint, on the meta device."""
    state_dict = {}
    for line in reference_path("keys", keys_file).read_text().splitlines():
        key, shape, dtype, _kind = line.split("\t")
        shape = [int(n) for n in shape.strip("[]").split(",") if n.strip()]
        state_dict[key] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    return state_dict


def with_unet_input_channels(state_dict: dict, channels: int) -> dict:
    """The same layout with an n-channel UNet input (SD 1.x inpainting has 9)."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out_channels, _, height, width = state_dict[key].shape
    return dict(state_dict, **{key: torch.empty(out_channels, channels, height, width, device="meta")})


FULL_SIZE_MISMATCHES = [
    # (reference layout, the UNet's input channels or None, the config given, the config that fits)
    ("v2v.tsv", None, "v1-inference.yaml", "v2-inference.yaml"),
    ("v1.tsv", None, "v2-inference.yaml", "v1-inference.yaml"),
    ("v1.tsv", 9, "v1-inference.yaml", "v1-inpainting-inference.yaml"),
    ("v2inpaint.tsv", None, "v2-inference.yaml", "v2-inpainting-inference.yaml"),
    ("v2depth.tsv", None, "v2-inference.yaml", "v2-midas-inference.yaml"),
    ("x4up.tsv", None, "v2-inference.yaml", "x4-upscaling.yaml"),
]


@pytest.mark.parametrize("keys_file,channels,given,fitting", FULL_SIZE_MISMATCHES)
def test_a_mismatched_checkpoint_names_the_config_that_fits(keys_file, channels, given, fitting):
    state_dict = reference_state_dict_on_meta(keys_file)
    if channels:
        state_dict = with_unet_input_channels(state_dict, channels)
    model = build_on_meta(CONFIG_DIR / given)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strictly(model, state_dict, "model.ckpt", CONFIG_DIR / given)
    assert_one_line_error(error, f"does not fit config {given}", f"it fits {fitting}", "--config")


# --- config auto-detection -------------------------------------------------------------------------------------
def test_the_yaml_beside_the_checkpoint_wins(tmp_path):
    sd1 = reference_state_dict_on_meta("v1.tsv")
    ckpt = tmp_path / "my-model.safetensors"
    assert find_config(ckpt, sd1) == CONFIG_DIR / "v1-inference.yaml"
    beside = tmp_path / "my-model.yaml"
    beside.write_text((CONFIG_DIR / "v2-inference.yaml").read_text())
    assert find_config(ckpt, sd1) == beside


def test_an_sd1_inpainting_checkpoint_finds_its_shipped_config(tmp_path):
    # Its keys and shapes against that config: tests/test_keys.py.
    sd15_inpainting = with_unet_input_channels(reference_state_dict_on_meta("v1.tsv"), 9)
    config = find_config(tmp_path / "sd-v1-5-inpainting.ckpt", sd15_inpainting)
    assert config == CONFIG_DIR / "v1-inpainting-inference.yaml"
    model = build_on_meta(config)
    assert type(model).__name__ == "LatentInpaintDiffusion" and model.model.conditioning_key == "hybrid"


def test_the_yaml_beside_a_checkpoint_is_used_to_load_it(tmp_path, tiny_weights):
    path = write_checkpoint(tmp_path / "tiny.ckpt", tiny_weights, "ckpt")
    with pytest.raises(CheckpointError) as error:
        load_model(path, log=quiet)
    assert_one_line_error(error, "--config")
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG.read_text())
    loaded = load_model(path, log=quiet)
    model, config = loaded.model, loaded.config
    assert config == OmegaConf.load(TINY_CONFIG)
    assert_parameters_equal(model, tiny_weights)


class PredictsLike(nn.Module):
    """A tiny UNet whose output is shaped into what a trained model gives at t = 999 on a flat input.

    At t = 999 the input is almost pure noise: an eps model returns about its input; a v model returns
    about minus the clean image it sees (v = sqrt(a) eps - sqrt(1 - a) x0, with sqrt(a) = 0.07), which
    for a flat grey input sits well below it.
    """

    def __init__(self, unet: nn.Module, parameterization: str):
        super().__init__()
        self.unet, self.parameterization = unet, parameterization
        self.in_channels = unet.in_channels
        self.seen_timesteps = []

    def forward(self, x, timesteps, context=None):
        self.seen_timesteps += timesteps.tolist()
        wiggle = 0.1 * torch.tanh(self.unet(x, timesteps, context=context))
        return (x if self.parameterization == "eps" else -1.0 - x) + wiggle


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_v_prediction_probe(parameterization):
    config = OmegaConf.load(TINY_CONFIG).model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(config)
    for p in unet.parameters():  # the output convolutions start at zero: give the UNet a say
        nn.init.normal_(p, std=0.1)
    probed = PredictsLike(unet.eval(), parameterization)
    assert is_v_prediction(probed, context_dim=config.params.context_dim) == (parameterization == "v")
    assert probed.seen_timesteps == [999]


# --- unsafe and damaged files ----------------------------------------------------------------------------------
class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, tiny_weights, container):
    marker = tmp_path / "MARKER"
    payload = {"state_dict": dict(tiny_weights), "callback": RunsCodeWhenUnpickled(marker)}
    path = tmp_path / "malicious.ckpt"
    if container == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as error:
        load_tiny(path)
    assert not marker.exists(), "the pickle's code ran"
    assert_one_line_error(error, "safetensors")


def test_an_old_lightning_checkpoint_loads(tmp_path, tiny_weights):
    """Released SD 1.x .ckpt files hold Lightning's ModelCheckpoint class as a dictionary key."""
    model_checkpoint = pytest.importorskip("pytorch_lightning.callbacks.model_checkpoint").ModelCheckpoint
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tiny_weights, "global_step": 470000,
                "callbacks": {model_checkpoint: {"best_model_score": None}}}, path)
    assert_parameters_equal(load_tiny(path), tiny_weights)


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGED_FILES = {
    # name: (how to damage a written checkpoint, its format, what the message must say)
    "ckpt cut in half": (cut_in_half, "ckpt", ["truncated", "download or copy it again"]),
    "safetensors cut in half": (cut_in_half, "safetensors", ["truncated", "download or copy it again"]),
    "safetensors cut in its header": (lambda path: path.write_bytes(path.read_bytes()[:20]), "safetensors",
                                      ["truncated", "download or copy it again"]),
    "empty": (lambda path: path.write_bytes(b""), "ckpt", ["empty", "download or copy it again"]),
    "a PNG": (lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200)), "ckpt",
              ["not a checkpoint", ".safetensors"]),
    "a text file": (lambda path: path.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"),
                    "safetensors", ["not a checkpoint", ".safetensors"]),
    "missing": (lambda path: path.unlink(), "ckpt", ["not found", "--ckpt"]),
}


@pytest.mark.parametrize("damage", list(DAMAGED_FILES))
def test_a_damaged_file_gives_one_line_that_names_the_fix(tmp_path, tiny_weights, damage):
    make_damage, file_format, fragments = DAMAGED_FILES[damage]
    path = write_checkpoint(checkpoint_path(tmp_path, file_format), tiny_weights, file_format)
    make_damage(path)
    with pytest.raises(CheckpointError) as error:
        load_tiny(path)
    assert_one_line_error(error, *fragments)


# --- memory: no needless copy, and no file pages held beside the copies ------------------------------------------
def convolution_kernels(model: nn.Module) -> set:
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def lies_in(tensor: torch.Tensor, ranges) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("file_format", ["safetensors", "ckpt"])
def test_no_weight_is_left_a_view_of_the_file_mapping(tmp_path, tiny_weights, file_format):
    """Even fp32 weights of an fp32 file, which need no conversion, are copied out of the file's memory map,
    so that a file truncated or rewritten in place cannot kill the run (tests/test_changed_checkpoint.py);
    the convolution kernels are stored channels-last (oneDNN's fast layout)."""
    path = write_checkpoint(checkpoint_path(tmp_path, file_format), tiny_weights, file_format)
    state_dict, _ = read_checkpoint(path)
    ranges = mapped_ranges(path)
    assert ranges and all(lies_in(t, ranges) for t in state_dict.values()), f"{path} is not memory-mapped"
    model = load_tiny(path)
    in_file = [name for name, t in model.state_dict().items() if lies_in(t, mapped_ranges(path))]
    assert not in_file, f"{len(in_file)} tensors are views of the file, e.g. {in_file[:3]}"
    assert_parameters_equal(model, tiny_weights)
    kernels = convolution_kernels(model)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for name, p in model.named_parameters() if name in kernels)


MEASURE_A_LOAD = """
import json, sys
from ldm.checkpoint import load_model
from ldm.placement import mapped_ranges
from ldm.modules.encoders import modules  # noqa: F401  (imports are not the loader's memory)

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))

with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS:")
model = load_model(sys.argv[1], config_path=sys.argv[2], log=lambda message: None).model
ranges = mapped_ranges(sys.argv[1])
sizes = [(p.numel() * p.element_size(), any(start <= p.data_ptr() < end for start, end in ranges))
         for p in model.parameters()]
print(json.dumps({"peak_growth": status("VmHWM:") - before, "weights": sum(size for size, _ in sizes),
                  "copied": sum(size for size, in_file in sizes if not in_file)}))
"""


@pytest.fixture(scope="module")
def medium_config(tmp_path_factory) -> str:
    """The tiny model with a wider UNet: 200 MB of fp32 weights, enough for memory to be measured."""
    config = OmegaConf.load(TINY_CONFIG)
    unet = config.model.params.unet_config.params
    unet.model_channels, unet.channel_mult, unet.num_res_blocks, unet.attention_resolutions = 96, [1, 2, 4], 2, [4]
    path = tmp_path_factory.mktemp("medium") / "medium.yaml"
    OmegaConf.save(config, path)
    return path


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_loading_holds_no_file_pages_beside_the_copies(tmp_path, medium_config, file_dtype):
    """Peak memory: the copies the loader has to make (fp16 -> fp32, channels-last kernels), not those plus the
    file's pages under them (about 1.5x the weights for an fp16 file); in a fresh process, so that the peak
    is this load's."""
    weights = random_weights(build_on_meta(medium_config).state_dict(), torch.Generator().manual_seed(2))
    path = write_checkpoint(tmp_path / "medium.safetensors", in_dtype(weights, file_dtype), "safetensors")
    del weights
    child = subprocess.run([sys.executable, "-c", MEASURE_A_LOAD, str(path), str(medium_config)],
                           capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert child.returncode == 0, child.stderr[-2000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    # The slack covers the model's construction and one tensor's pages in flight.
    allowed = measured["copied"] + 0.3 * measured["weights"]
    assert measured["peak_growth"] < allowed, f"{measured}: the load peaked above {allowed / 1e6:.0f} MB"


def test_a_legacy_non_zip_torch_save_loads_safely(tmp_path, tiny_weights):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": tiny_weights}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    assert_parameters_equal(load_tiny(path), tiny_weights)
