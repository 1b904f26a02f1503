"""ControlNet: the network, its files in every format, the refusals, and the numbers against diffusers.

Fast tests use configs/tiny/controlnet-tiny.yaml (a ControlNet over the tiny UNet). The original ControlNet
repository's YAMLs (tests/data/original-configs/lllyasviel-cldm_v*.yaml) must build our classes with the
original key names, which diffusers' own conversion must turn into exactly its ControlNetModel's keys.
The slow test compares, with full-size random SD 1.x weights in one original-format (1.0) file, our
residuals and our controlled UNet with diffusers' ControlNetModel and UNet2DConditionModel loaded from
that file by diffusers' single-file conversion (configs built locally, no network).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import REPO, reference_path  # noqa: E402
from helpers import diffusers_models, random_state_dict, relative_error, seeded  # noqa: E402
from ldm.checkpoint import load_model, parameters_on_meta  # noqa: E402
from ldm.controlnet_file import ControlNetError, find_controlnet, list_controlnets, load_controlnet  # noqa: E402
from ldm.models.controlnet import ControlLDM, ControlNet  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from ldm.util import check_config_targets, instantiate_from_config, read_config  # noqa: E402

TINY_CONTROL_CONFIG = REPO / "configs" / "tiny" / "controlnet-tiny.yaml"
SD15_CONTROL_CONFIG = REPO / "configs" / "controlnet" / "cldm_v15.yaml"
PREFIX = "control_model."
MAX_RELATIVE_ERROR = 1e-4


def tiny_unet_config(context_dim=None):
    config = OmegaConf.load(TINY_CONTROL_CONFIG).model.params.unet_config
    if context_dim is not None:
        config.params.context_dim = context_dim
    return config


def tiny_control_ldm(seed=0, context_dim=None) -> ControlLDM:
    """The tiny ControlLDM with every weight random and non-zero (zero convolutions would compare zeros)."""
    config = OmegaConf.load(TINY_CONTROL_CONFIG)
    if context_dim is not None:
        for part in ("unet_config", "control_stage_config"):
            config.model.params[part].params.context_dim = context_dim
        config.model.params.cond_stage_config.params.n_embed = context_dim
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("model.", PREFIX)):
                p.normal_(0, 1 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny ControlNet in every format: {format: path}, and its weights (no prefix)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    folder = tmp_path_factory.mktemp("controlnets")
    whole = {k: v.contiguous() for k, v in tiny_control_ldm().state_dict().items()}
    control = {k[len(PREFIX):]: v for k, v in whole.items() if k.startswith(PREFIX)}
    files = {"1.0": folder / "control_tiny_whole.pth", "1.1": folder / "control_v11_tiny.pth",
             "1.1 prefixed": folder / "control_v11_tiny_prefixed.pth",
             "fp16 safetensors": folder / "control_v11_tiny_fp16.safetensors",
             "diffusers folder": folder / "controlnet-tiny-diffusers",
             "diffusers file": folder / "diffusion_pytorch_model.safetensors"}
    torch.save({"state_dict": whole, "global_step": 1}, files["1.0"])
    torch.save(control, files["1.1"])
    torch.save({PREFIX + k: v for k, v in control.items()}, files["1.1 prefixed"])
    save_file({k: v.half() for k, v in control.items()}, str(files["fp16 safetensors"]))
    # diffusers' own conversion and save_pretrained, as a diffusers ControlNet is published
    converted = convert_controlnet_checkpoint(whole, {"layers_per_block": 1})
    with init_empty_weights():
        reference = ControlNetModel(**diffusers_tiny_config())
    reference.load_state_dict(converted, strict=True, assign=True)
    reference.save_pretrained(files["diffusers folder"])
    save_file({k: v.contiguous() for k, v in converted.items()}, str(files["diffusers file"]))
    return files, control


def diffusers_tiny_config() -> dict:
    return dict(in_channels=4, conditioning_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                attention_head_dim=(2, 4), use_linear_projection=True)


def diffusers_controlnet_config(original_config: dict, checkpoint: dict) -> dict:
    """What diffusers' create_controlnet_diffusers_config_from_ldm makes of an original config (in 0.42 it
    calls the UNet's config function without the checkpoint and fails): the UNet's, with the hint's channels."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    unet = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    shared = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    hint_channels = original_config["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    return {"conditioning_channels": hint_channels, **{key: unet[key] for key in shared if key in unet}}


def state_of(loaded) -> dict:
    return {k: v.float() for k, v in loaded.model.state_dict().items()}


# --- the network and the original configs -------------------------------------------------------------------------
@pytest.mark.parametrize("version, params_m", [("v15", 361.28), ("v21", 364.23)])
def test_original_cldm_yamls_build_our_classes_with_the_original_keys(version, params_m):
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    path = reference_path("original-configs", f"lllyasviel-cldm_{version}.yaml")
    config = read_config(path)
    check_config_targets(config.model, "model", path)  # cldm.cldm.* resolve to ours, nothing else is imported
    with parameters_on_meta():
        model = instantiate_from_config(config.model, use_ema=False)
    assert type(model) is ControlLDM and type(model.control_model) is ControlNet
    assert type(model.model.diffusion_model) is UNetModel
    control = {k[len(PREFIX):]: v for k, v in model.state_dict().items() if k.startswith(PREFIX)}
    assert len(control) == 340 and round(sum(v.numel() for v in control.values()) / 1e6, 2) == params_m
    assert {"input_hint_block.14.weight", "zero_convs.11.0.weight", "middle_block_out.0.bias"} <= set(control)
    assert model.control_model.residual_count == len(model.control_scales) == 13
    # diffusers' conversion of these keys gives exactly its ControlNetModel's keys and shapes
    original = OmegaConf.to_container(config, resolve=True)
    whole = {PREFIX + k: v for k, v in control.items()}
    diffusers_config = diffusers_controlnet_config(original, whole)
    with init_empty_weights():
        theirs = ControlNetModel(**diffusers_config).state_dict()
    converted = convert_controlnet_checkpoint(whole, diffusers_config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_our_configs_equal_the_originals_but_for_the_targets():
    for version in ("v15", "v21"):
        ours = OmegaConf.load(REPO / "configs" / "controlnet" / f"cldm_{version}.yaml")
        original = OmegaConf.load(reference_path("original-configs", f"lllyasviel-cldm_{version}.yaml"))
        sections = [OmegaConf.to_container(config.model) for config in (ours, original)]
        for section in sections:
            for part in (section, section["params"]["control_stage_config"], section["params"]["unet_config"]):
                part.pop("target")
        assert sections[0] == sections[1]


def test_controlled_unet_adds_the_residuals_and_a_fresh_controlnet_changes_nothing():
    model = tiny_control_ldm()
    x, hint = torch.randn(2, 4, 8, 8, generator=seeded(1)), torch.rand(2, 3, 64, 64, generator=seeded(2))
    t, context = torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=seeded(3))
    unet = model.model.diffusion_model
    with torch.no_grad():
        residuals = model.control_model(x, hint, t, context)
        assert [r.shape[1] for r in residuals] == [32, 32, 32, 64, 64]
        plain = unet(x, t, context=context)
        assert torch.equal(model.apply_model(x, t, {"c_crossattn": [context], "c_concat": None}), plain)
        controlled = model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]})
        assert torch.allclose(controlled, unet(x, t, context=context, control=residuals))
        assert relative_error(controlled, plain) > 1e-2
        model.control_scales = [0.5] * 5
        half = model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]})
        assert torch.allclose(half, unet(x, t, context=context, control=[r * 0.5 for r in residuals]), atol=1e-6)
        fresh = instantiate_from_config(OmegaConf.load(TINY_CONTROL_CONFIG).model.params.control_stage_config)
        assert all(not r.any() for r in fresh(x, hint, t, context))  # zero convolutions: the UNet is unchanged
        with pytest.raises(ValueError, match="8x the latent"):
            model.control_model(x, hint[..., :32, :32], t, context)


def test_training_updates_the_control_model_only():
    model = tiny_control_ldm().train()
    batch = {"image": torch.rand(2, 64, 64, 3) * 2 - 1, "caption": ["a red circle", "a blue square"],
             "hint": torch.rand(2, 64, 64, 3)}
    loss, _ = model.training_loss(batch)
    loss.backward()
    trained = {id(p) for p in model.trainable_parameters()}
    assert trained == {id(p) for p in model.control_model.parameters()}
    assert all(p.grad is None for p in model.model.parameters())
    assert all(p.grad is not None for p in model.control_model.parameters())


# --- files ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["1.0", "1.1", "1.1 prefixed", "fp16 safetensors", "diffusers folder", "diffusers file"])
def test_every_format_loads_the_same_weights(tiny_files, form):
    files, control = tiny_files
    loaded = load_controlnet(files[form], tiny_unet_config(), device="cpu", dtype=torch.float32)
    ours = state_of(loaded)
    assert sorted(ours) == sorted(control)
    rounded = form == "fp16 safetensors"
    assert all(torch.equal(ours[k], control[k].half().float() if rounded else control[k]) for k in control)
    assert loaded.family == "a model with 32-wide text conditioning" and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_loaded_in_the_run_dtype_and_shaped_by_the_shipped_config_without_a_base(tiny_files, tmp_path):
    files, control = tiny_files
    loaded = load_controlnet(files["1.1"], tiny_unet_config(), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ControlNetError, match="for which no ControlNet config is shipped"):
        load_controlnet(files["1.1"], None)


def test_a_whole_1_0_file_loads_as_a_control_ldm(tiny_files):
    files, control = tiny_files
    loaded = load_model(files["1.0"], TINY_CONTROL_CONFIG, dtype=torch.float32, log=lambda line: None)
    assert isinstance(loaded.model, ControlLDM)
    assert all(torch.equal(v, control[k]) for k, v in loaded.model.control_model.state_dict().items())


def test_the_shuffle_yaml_beside_a_file_turns_on_global_average_pooling(tiny_files, tmp_path):
    files, _ = tiny_files
    path = tmp_path / "control_v11e_tiny_shuffle.pth"
    path.write_bytes(files["1.1"].read_bytes())
    path.with_suffix(".yaml").write_text("model:\n  target: cldm.cldm.ControlLDM\n  params:\n    control_stage_config:\n"
                                         "      target: cldm.cldm.ControlNet\n      params:\n"
                                         "        global_average_pooling: True\n")
    loaded = load_controlnet(path, tiny_unet_config(), dtype=torch.float32)
    residuals = loaded.model(torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64), torch.tensor([5]), torch.randn(1, 7, 32))
    assert all(r.shape[-2:] == (1, 1) for r in residuals)


def test_names_resolve_in_the_search_folders(tiny_files, tmp_path):
    files, _ = tiny_files
    folder = tmp_path / "ControlNet"
    folder.mkdir()
    for suffix in (".pth", ".safetensors"):
        (folder / f"control_v11p_tiny_canny{suffix}").write_bytes(files["fp16 safetensors" if suffix == ".safetensors"
                                                                          else "1.1"].read_bytes())
    (folder / "notes.txt").write_text("not a model")
    assert find_controlnet("control_v11p_tiny_canny", [folder]) == folder / "control_v11p_tiny_canny.safetensors"
    assert find_controlnet("control_v11p_tiny_canny [d14c016b]", [folder]).suffix == ".safetensors"
    assert find_controlnet("control_v11p_tiny_canny.pth", [folder]) == folder / "control_v11p_tiny_canny.pth"
    assert find_controlnet(files["diffusers folder"].name, [files["diffusers folder"].parent]) == files["diffusers folder"]
    listed = [path.name for path in list_controlnets([folder])]
    assert "control_v11p_tiny_canny.pth" in listed and "notes.txt" not in listed
    with pytest.raises(ControlNetError) as refused:
        find_controlnet("control_v11p_sd15_depth", [folder])
    assert "not found" in str(refused.value) and "control_v11p_tiny_canny.pth" in str(refused.value)


# --- refusals: one line each ----------------------------------------------------------------------------------------
def refusal(path, base=None) -> str:
    with pytest.raises(ControlNetError) as refused:
        load_controlnet(path, tiny_unet_config() if base is None else base, dtype=torch.float32)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    return message


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_controlnet_for_another_base_model_is_refused_naming_both(tmp_path):
    path = tmp_path / "control_sd15_tiny.pth"
    torch.save({k: v for k, v in tiny_control_ldm(context_dim=768).state_dict().items() if k.startswith(PREFIX)}, path)
    message = refusal(path, tiny_unet_config(context_dim=1024))
    assert "is for SD 1.x (text width 768)" in message and "the model is SD 2.x (text width 1024)" in message
    assert "a model with 32-wide text conditioning" in refusal(path)


def test_damaged_foreign_and_code_carrying_files_are_refused(tiny_files, tmp_path):
    files, control = tiny_files
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(files["1.1"].read_bytes()[:4000])
    assert "truncated or corrupt" in refusal(truncated)

    evil = tmp_path / "evil.pth"
    torch.save({"input_hint_block.0.weight": torch.zeros(1), "payload": RunsCode()}, evil)
    assert "refusing to load" in refusal(evil)

    unet_only = tmp_path / "a_unet.safetensors"
    unet = tiny_control_ldm().model.diffusion_model
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(unet_only))
    assert "is not a ControlNet" in refusal(unet_only)

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in control.items() if k != "zero_convs.2.0.weight"}, missing)
    assert "1 missing (zero_convs.2.0.weight)" in refusal(missing)

    broken = tmp_path / "nan.pth"
    torch.save({**control, "middle_block_out.0.bias": torch.full_like(control["middle_block_out.0.bias"], float("nan"))},
               broken)
    assert "NaN or infinite values in tensor middle_block_out.0.bias" in refusal(broken)

    not_controlnet = tmp_path / "vae-diffusers"
    not_controlnet.mkdir()
    (not_controlnet / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    assert "not ControlNetModel" in refusal(not_controlnet)
    assert pickle.dumps(RunsCode())  # the payload is a real one: only weights_only kept it from running


# --- the numbers: full-size SD 1.x against diffusers -----------------------------------------------------------------
@pytest.mark.slow
def test_full_size_residuals_and_controlled_unet_equal_diffusers(tmp_path):
    """Random SD 1.x + ControlNet weights in one original-format (1.0) file: our control model (loaded alone
    by load_controlnet and as part of the whole ControlLDM by load_model) and controlled UNet against
    diffusers' ControlNetModel and UNet2DConditionModel with down/mid additional residuals."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    original_config_path = reference_path("original-configs", "lllyasviel-cldm_v15.yaml")
    config = read_config(SD15_CONTROL_CONFIG)
    with parameters_on_meta():
        template = instantiate_from_config(config.model, use_ema=False).state_dict()
    path = tmp_path / "control_sd15_random.pth"
    torch.save({"state_dict": random_state_dict(template, seed=0)}, path)
    del template
    checkpoint = torch.load(path, mmap=True, weights_only=True)["state_dict"]

    original_config = OmegaConf.to_container(OmegaConf.load(original_config_path), resolve=True)
    controlnet_config = diffusers_controlnet_config(original_config, checkpoint)
    with init_empty_weights():
        their_controlnet = ControlNetModel(**controlnet_config)
    converted = convert_controlnet_checkpoint(checkpoint, controlnet_config)
    their_controlnet.load_state_dict(converted, strict=True, assign=True)
    their_unet, _vae = diffusers_models(original_config_path, checkpoint)
    del _vae

    x = torch.randn(2, 4, 16, 16, generator=seeded(1))
    hint = torch.rand(2, 3, 128, 128, generator=seeded(2))
    t = torch.tensor([999, 301])
    context = torch.randn(2, 77, 768, generator=seeded(3))
    with torch.no_grad():
        down, mid = their_controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        expected = their_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
        plain = their_unet(x, t, encoder_hidden_states=context).sample
        del their_controlnet, their_unet, checkpoint

        alone = load_controlnet(path, config.model.params.unet_config, dtype=torch.float32)
        residuals = alone.model(x, hint, t, context)
        errors = [relative_error(ours, theirs) for ours, theirs in zip(residuals, [*down, mid])]
        assert len(residuals) == 13 and max(errors) < MAX_RELATIVE_ERROR, errors
        del alone

        whole = load_model(path, SD15_CONTROL_CONFIG, dtype=torch.float32, log=lambda line: None).model
        assert all(relative_error(a, b) < MAX_RELATIVE_ERROR for a, b in
                   zip(whole.control_model(x, hint, t, context), residuals))
        controlled = whole.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]})
    error = relative_error(controlled, expected)
    assert error < MAX_RELATIVE_ERROR, error
    assert relative_error(plain, expected) > 100 * MAX_RELATIVE_ERROR  # the control changes the output
