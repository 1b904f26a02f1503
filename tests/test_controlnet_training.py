"""Training a ControlNet on the shapes model: the f=4 hint block, the canny-map dataset, starting from a trained
base, a few training steps, the exported file, and the checker's scores.

Training runs on configs/tiny/controlnet-tiny.yaml (random weights); the shapes ControlNet's config is built
over the shipped shapes model only to check that the control model starts as a copy of its UNet's encoder.
"""
import importlib.util

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from ldm.controlnet_file import load_controlnet
from ldm.data.adherence import parse_caption
from ldm.data.shapes import DIAMETER_RANGE, NOMINAL_CENTER, ShapesDataset
from ldm.data.shapes_control import FREE_DIAMETER_RANGE, ShapesControlDataset, canny_map, words_for
from ldm.generate import preprocessors
from ldm.generate.errors import UserError
from ldm.models.controlnet import ControlNet
from ldm.util import instantiate_from_config, read_config

TINY_CONTROL_CONFIG = REPO / "configs" / "tiny" / "controlnet-tiny.yaml"
SHAPES_CONTROL_CONFIG = REPO / "configs" / "controlnet" / "shapes-controlnet.yaml"
SHAPES_MODEL = REPO / "models" / "ldm" / "shapes-ldm" / "model.ckpt"
CONTROL_PARAMS = dict(in_channels=4, hint_channels=3, model_channels=32, attention_resolutions=[1], num_res_blocks=1,
                      channel_mult=[1, 2], num_head_channels=16, context_dim=32, use_linear_in_transformer=True,
                      legacy=False)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def neighbourhood(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in all eight directions."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.logical_or.reduce([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)])


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a neighbour outside it."""
    return mask & neighbourhood(~mask)


# --- the hint block for an f=4 autoencoder ----------------------------------------------------------------------
def test_hint_downsample_4_reads_a_control_image_4x_the_latent_with_the_original_keys():
    torch.manual_seed(0)
    original, ours = ControlNet(**CONTROL_PARAMS), ControlNet(**CONTROL_PARAMS, hint_downsample=4)
    assert {k: v.shape for k, v in original.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    strides = [layer.stride[0] for layer in ours.input_hint_block if isinstance(layer, torch.nn.Conv2d)]
    assert strides == [1, 1, 2, 1, 2, 1, 1, 1]  # the original's last halving convolution keeps the size
    ours.load_state_dict(original.state_dict())
    x, context, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32), torch.tensor([10])
    residuals = ours(x, torch.rand(1, 3, 32, 32), t, context)
    assert [tuple(r.shape[-2:]) for r in residuals] == [tuple(r.shape[-2:]) for r in original(x, torch.rand(1, 3, 64, 64), t, context)]
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\] \(4x the latent's size\)"):
        ours(x, torch.rand(1, 3, 64, 64), t, context)


def test_hint_downsample_refuses_a_factor_without_a_hint_block():
    with pytest.raises(ValueError, match="hint_downsample must be 1, 2, 4 or 8, not 3"):
        ControlNet(**CONTROL_PARAMS, hint_downsample=3)


# --- the dataset ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    dataset = ShapesControlDataset(size=40, seed=5)
    return [dataset[i] for i in range(len(dataset))]


def test_the_edge_maps_outline_the_shapes(scenes):
    for item in scenes:
        picture = np.rint((item["image"] + 1) * 127.5).astype(np.uint8)
        edges = item["hint"][..., 0] > 0
        assert item["hint"].shape == (64, 64, 3) and set(np.unique(item["hint"])) <= {0.0, 1.0}
        shape = np.abs(picture.astype(int) - picture[0, 0].astype(int)).sum(axis=-1) > 96  # nearer the shape's colour
        boundary = outline(shape) | outline(~shape)
        assert (edges <= neighbourhood(boundary)).all(), item["caption"]  # no edge away from the outline
        assert (neighbourhood(edges)[outline(shape)]).mean() > 0.95, item["caption"]  # the outline all found


def test_shapes_sit_anywhere_at_any_size_and_the_caption_names_the_nearest_words(scenes):
    diameters = np.array([item["attrs"]["diameter"] for item in scenes])
    assert diameters.min() >= FREE_DIAMETER_RANGE[0] and diameters.max() <= FREE_DIAMETER_RANGE[1]
    outside_grammar = [d for d in diameters if not any(low <= d <= high for low, high in DIAMETER_RANGE.values())]
    assert len(outside_grammar) > len(scenes) / 2
    off_nominal = [item for item in scenes if min(np.hypot(x - item["attrs"]["center_x"], y - item["attrs"]["center_y"])
                                                 for x, y in NOMINAL_CENTER.values()) > 6]
    assert len(off_nominal) > len(scenes) / 2
    for item in scenes:
        attrs = item["attrs"]
        words = parse_caption(item["caption"])
        assert (words["size"], words["position"]) == words_for(attrs["diameter"], attrs["center_x"], attrs["center_y"])
        assert {name: words[name] for name in ("shape", "color", "background")} == \
            {name: attrs[name] for name in ("shape", "color", "background")}


def test_the_dataset_keeps_the_shapes_datasets_split_and_is_reproducible():
    heldout = ShapesControlDataset(size=30, split="heldout", seed=3)
    plain = ShapesDataset(size=30, split="heldout", seed=3)
    assert [heldout[i]["attrs"]["color"] for i in range(30)] == [plain[i]["attrs"]["color"] for i in range(30)]
    again = ShapesControlDataset(size=30, split="heldout", seed=3)
    assert np.array_equal(heldout[7]["hint"], again[7]["hint"]) and heldout[7]["caption"] == again[7]["caption"]


def test_the_maps_are_what_the_canny_preprocessor_makes_at_the_pictures_size(scenes):
    for item in scenes[:10]:
        picture = np.rint((item["image"] + 1) * 127.5).astype(np.uint8)
        detected = preprocessors.detect("canny", picture, resolution=picture.shape[0])
        assert np.array_equal(detected.astype(np.float32) / 255, canny_map(picture))


# --- starting from the trained base -----------------------------------------------------------------------------
def test_the_shapes_control_model_starts_as_a_copy_of_the_shapes_unets_encoder():
    from ldm.checkpoint import read_checkpoint

    model = instantiate_from_config(read_config(SHAPES_CONTROL_CONFIG).model)
    state_dict, _ = read_checkpoint(SHAPES_MODEL)
    model.load_base_model(state_dict)
    unet, control = model.model.diffusion_model.state_dict(), model.control_model.state_dict()
    for key, value in control.items():
        if key.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
            continue
        assert torch.equal(value, unet[key]), key
    assert all(not p.any() for p in model.control_model.zero_convs.parameters())
    trained = {id(p) for p in model.trainable_parameters()}
    assert trained == {id(p) for p in model.control_model.parameters()}
    assert not any(p.requires_grad for p in model.model.parameters())
    model.eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 20])
    text = model.get_learned_conditioning(["a small red circle on the left on a blue background", ""])
    hint = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # zero convolutions: a fresh ControlNet leaves the model's output as it was
        assert torch.equal(model.apply_model(x, t, {"c_crossattn": [text], "c_concat": [hint]}),
                           model.apply_model(x, t, {"c_crossattn": [text]}))


def test_weights_of_another_model_are_refused_in_one_line():
    model = instantiate_from_config(read_config(TINY_CONTROL_CONFIG).model)
    state_dict = {key: value for key, value in model.state_dict().items() if not key.startswith("control_model.")}
    state_dict["model.diffusion_model.extra.weight"] = torch.zeros(1)
    del state_dict["model.diffusion_model.out.2.bias"]
    with pytest.raises(ValueError, match=r"1 missing \(model.diffusion_model.out.2.bias\), 1 unexpected"):
        model.load_base_model(state_dict)


# --- training ---------------------------------------------------------------------------------------------------
def tiny_model_with_a_trained_base(seed=1):
    """The tiny ControlLDM with its UNet's weights random (a fresh UNet's zero output layer would pass no
    gradient to the control model); the control model as ControlLDM makes it."""
    torch.manual_seed(seed)
    model = instantiate_from_config(read_config(TINY_CONTROL_CONFIG).model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    return model


def tiny_batch(size=4, seed=0):
    dataset = ShapesControlDataset(size=size, seed=seed)
    items = [dataset[i] for i in range(size)]
    return {"image": torch.from_numpy(np.stack([item["image"] for item in items])),
            "hint": torch.from_numpy(np.stack([item["hint"] for item in items])),
            "caption": [item["caption"] for item in items]}


def test_training_steps_lower_the_loss_and_change_only_the_control_model():
    model = tiny_model_with_a_trained_base()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = tiny_batch()
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(model.get_input(batch, "image")))
        cond = {"c_crossattn": [model.get_learned_conditioning(batch["caption"])],
                **model.image_conditioning(batch, z)}
    t, noise = torch.tensor([100, 300, 600, 900]), torch.randn_like(z)

    def loss():
        return model.p_losses(z, cond, t, noise)[0]

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    first = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.97 * first
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("control_model.") for name in changed)
    assert any(name.startswith("control_model.zero_convs.") for name in changed)


def write_base_checkpoint(path):
    """A trained base model stand-in: the tiny ControlLDM's base weights (its control model's left out)."""
    model = tiny_model_with_a_trained_base()
    state_dict = {key: value for key, value in model.state_dict().items() if not key.startswith("control_model.")}
    torch.save({"state_dict": state_dict}, path)
    return state_dict


def training_config(tmp_path, base_ckpt) -> str:
    config = OmegaConf.load(TINY_CONTROL_CONFIG)
    config.model.base_learning_rate = 1e-3
    config.data = {"target": "ldm.training.DataModuleFromConfig",
                   "params": {"batch_size": 2, "num_workers": 0,
                              "train": {"target": "ldm.data.shapes_control.ShapesControlDataset",
                                        "params": {"size": 64, "seed": 4}}}}
    config.training = {"base_ckpt": str(base_ckpt), "sample_every_n_steps": 0, "sample_prompts": [],
                       "checkpoint_every_n_steps": 100, "print_every_n_steps": 100}
    path = tmp_path / "tiny-control.yaml"
    OmegaConf.save(config, path)
    return str(path)


def test_train_py_starts_from_the_base_and_exports_the_control_model_alone(tmp_path):
    main = load_script("train").main
    base = write_base_checkpoint(tmp_path / "base.ckpt")
    export = tmp_path / "models" / "tiny-canny.safetensors"
    _, trainer = main(["--base", training_config(tmp_path, tmp_path / "base.ckpt"), "--max_steps", "3", "--threads", "1",
                       "--logdir", str(tmp_path / "logs"), "--export", str(export)])
    assert trainer.global_step == 3
    model = trainer.lightning_module.model
    for key, value in base.items():  # the frozen base is the checkpoint's, unchanged by training
        assert torch.equal(model.state_dict()[key], value), key
    assert model.control_model.zero_convs[0][0].weight.any()  # trained
    assert OmegaConf.load(export.with_suffix(".yaml")).model.params.control_stage_config.params.hint_channels == 3
    loaded = load_controlnet(export, OmegaConf.load(TINY_CONTROL_CONFIG).model.params.unet_config, dtype=torch.float32)
    for key, value in model.control_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value.half().float()), key


def test_base_ckpt_for_a_model_without_a_control_model_is_one_line(tmp_path):
    main = load_script("train").main
    config = OmegaConf.load(REPO / "configs" / "tiny" / "txt2img-tiny.yaml")
    config.data = {"target": "ldm.training.DataModuleFromConfig",
                   "params": {"batch_size": 2, "train": {"target": "ldm.data.shapes.ShapesDataset"}}}
    config.training = {"base_ckpt": str(SHAPES_MODEL)}
    OmegaConf.save(config, tmp_path / "plain.yaml")
    with pytest.raises(UserError, match="training.base_ckpt is for ControlNet configs"):
        main(["--base", str(tmp_path / "plain.yaml"), "--max_steps", "1", "--logdir", str(tmp_path / "logs")])
    assert not (tmp_path / "logs").exists()


def test_hint_downsample_travels_in_the_yaml_beside_the_file(tmp_path):
    from ldm.controlnet_file import save_controlnet

    config = read_config(SHAPES_CONTROL_CONFIG).model
    model = instantiate_from_config(config.params.control_stage_config)
    save_controlnet(model, config, tmp_path / "shapes.safetensors")
    loaded = load_controlnet(tmp_path / "shapes.safetensors", config.params.unet_config, dtype=torch.float32)
    assert loaded.model.hint_downsample == 4
    (tmp_path / "shapes.yaml").unlink()  # without it, the original's factor
    assert load_controlnet(tmp_path / "shapes.safetensors", config.params.unet_config).model.hint_downsample == 8


# --- the checker ------------------------------------------------------------------------------------------------
def test_the_checkers_scores_of_the_scene_itself_are_perfect_and_of_a_moved_shape_low(scenes):
    scores_of = load_script("evaluate_control").scores_of
    for item in scenes[:10]:
        picture = np.rint((item["image"] + 1) * 127.5).astype(np.uint8)
        assert scores_of(picture, item["attrs"]) == {"iou": pytest.approx(1.0, abs=0.05), "color": 1.0,
                                                     "background": 1.0, "shape": 1.0}
        moved = np.roll(picture, 20, axis=1)
        assert scores_of(moved, item["attrs"])["iou"] < 0.6
