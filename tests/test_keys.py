"""Our configs build models whose state dicts are exactly the original checkpoints' (keys, shapes, dtypes)."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, reference_path
from ldm.checkpoint import parameters_on_meta, unused_checkpoint_keys
from ldm.util import instantiate_from_config

CASES = [
    ("v1-inference.yaml", "v1.tsv"),
    ("v2-inference.yaml", "v2v.tsv"),
    ("v2-inference-v.yaml", "v2v.tsv"),
    ("v2-inpainting-inference.yaml", "v2inpaint.tsv"),
    ("v2-midas-inference.yaml", "v2depth.tsv"),
    ("x4-upscaling.yaml", "x4up.tsv"),
]
ORIGINAL_CONFIGS = {
    "v1-inference.yaml": "compvis-v1-inference.yaml",
    "v2-inference.yaml": "stability-v2-inference.yaml",
    "v2-inference-v.yaml": "stability-v2-inference-v.yaml",
    "v2-inpainting-inference.yaml": "stability-v2-inpainting-inference.yaml",
    "v2-midas-inference.yaml": "stability-v2-midas-inference.yaml",
    "x4-upscaling.yaml": "stability-x4-upscaling.yaml",
}


def read_reference_keys(name):
    rows = {}
    for line in reference_path("keys", name).read_text().splitlines():
        key, shape, dtype, _kind = line.split("\t")
        rows[key] = (tuple(int(n) for n in shape.strip("[]").split(",") if n.strip()), dtype)
    return rows


def build_on_meta(config_path):
    config = OmegaConf.load(config_path)
    with parameters_on_meta():
        return instantiate_from_config(config.model, use_ema=False)


def state_dict_rows(model):
    return {key: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for key, t in model.state_dict().items()}


def assert_same_rows(ours, reference, not_built=()):
    # Released SD 1.x files carry the text encoder's position ids; our encoder keeps them non-persistent
    # and the loader accepts them as a harmless extra. SD 2.x's encoder does not build OpenCLIP's last block
    # and image-text head (never run): each prefix it declares names tensors of the original file.
    assert all(any(k.startswith(prefix) for k in reference) for prefix in not_built)
    reference = {k: v for k, v in reference.items() if (not k.endswith("position_ids") or k in ours)
                 and not k.startswith(not_built)}
    missing = sorted(set(reference) - set(ours))
    extra = sorted(set(ours) - set(reference))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    different = [(k, ours[k], reference[k]) for k in reference if ours[k] != reference[k]]
    assert not different, different[:5]


@pytest.mark.parametrize("config_name,keys_name", CASES)
def test_our_config_has_the_original_state_dict(config_name, keys_name):
    model = build_on_meta(REPO / "configs" / "stable-diffusion" / config_name)
    assert_same_rows(state_dict_rows(model), read_reference_keys(keys_name), unused_checkpoint_keys(model))


@pytest.mark.parametrize("config_name,keys_name", CASES)
def test_users_original_yaml_builds_the_same_model(config_name, keys_name):
    model = build_on_meta(reference_path("original-configs", ORIGINAL_CONFIGS[config_name]))
    assert_same_rows(state_dict_rows(model), read_reference_keys(keys_name), unused_checkpoint_keys(model))


def test_meta_build_leaves_schedules_real_and_exact():
    model = build_on_meta(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    assert all(p.device.type == "meta" for p in model.parameters())
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert model.betas.device.type == "cpu"
    torch.testing.assert_close(model.betas, betas.float(), rtol=0, atol=0)
    torch.testing.assert_close(model.alphas_cumprod, torch.cumprod(1 - betas, 0).float(), rtol=0, atol=0)


def test_meta_build_skips_initialisation_only_inside(monkeypatch):
    calls = []
    original = torch.nn.init.kaiming_uniform_

    def counted(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counted)
    with parameters_on_meta():
        inside = torch.nn.Conv2d(4, 8, 3)
    assert inside.weight.device.type == "meta" and calls == []
    torch.manual_seed(0)
    after = torch.nn.Conv2d(4, 8, 3)
    assert calls == [(8, 4, 3, 3)]  # initialised as usual once the context is left
    monkeypatch.undo()
    torch.manual_seed(0)
    assert torch.equal(after.weight, torch.nn.Conv2d(4, 8, 3).weight) and after.weight.abs().sum() > 0
    norm = torch.nn.GroupNorm(2, 8)
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))


def test_sd1_inpainting_config_is_sd1_with_a_nine_channel_unet_input():
    reference = read_reference_keys("v1.tsv")
    first_convolution = "model.diffusion_model.input_blocks.0.0.weight"
    reference[first_convolution] = ((320, 9, 3, 3), reference[first_convolution][1])
    model = build_on_meta(REPO / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml")
    assert_same_rows(state_dict_rows(model), reference)
