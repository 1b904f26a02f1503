"""SD 2.1 unCLIP (image variations): the original configs, the CLIP image encoders, the noise augmentation of the
image embedding, the variations task, script and Python API; with full-size random weights (slow), the image
embedding, the noise augmentation and the UNet with its vector condition against diffusers'
StableUnCLIPImg2ImgPipeline components built from the same weights."""
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO
from helpers import loaded_in_memory, random_state_dict, relative_error, run_script
from ldm.checkpoint import guess_config, parameters_on_meta
from ldm.generate.errors import UserError
from ldm.generate.run import BatchInputs, Job, SeededNoise
from ldm.generate.variations import ImageVariations, check_noise_level
from ldm.modules.encoders.image_encoders import FrozenOpenCLIPImageEmbedder, ClipImageEmbedder, resize_antialiased
from ldm.modules.encoders.noise_augmentation import CLIPEmbeddingNoiseAugmentation
from ldm.pipeline import Pipeline
from ldm.util import ConfigError, instantiate_from_config
from tiny_model import tiny_model, write_tiny_checkpoint

CONFIGS = REPO / "configs" / "stable-diffusion"
UNCLIP_H, UNCLIP_L = CONFIGS / "v2-1-stable-unclip-h-inference.yaml", CONFIGS / "v2-1-stable-unclip-l-inference.yaml"
UNCLIP_TINY = REPO / "configs" / "tiny" / "unclip-tiny.yaml"
# (image tower width, layers, embedding size, UNet's adm_in_channels) of the released models
RELEASED = {"h": (1280, 32, 1024, 2048), "l": (1024, 24, 768, 1536)}


def write_stats(path, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.randn(dim, generator=generator), 0.5 + torch.rand(dim, generator=generator)
    torch.save((mean, std), path)
    return mean, std


def unclip_config(which: str, stats_path=None):
    config = OmegaConf.load(UNCLIP_H if which == "h" else UNCLIP_L)
    if stats_path is not None:
        config.model.params.noise_aug_config.params.clip_stats_path = str(stats_path)
    return config


def meta_model(config):
    with parameters_on_meta():
        return instantiate_from_config(config.model, use_ema=False)


@pytest.fixture(scope="module")
def tiny_unclip():
    return tiny_model(config=UNCLIP_TINY)


def test_original_configs_build_with_the_checkpoints_layout(tmp_path):
    stats = tmp_path / "ViT-L-14_stats.th"
    write_stats(stats, 768)
    for which in ("h", "l"):
        model = meta_model(unclip_config(which, stats if which == "l" else None))
        width, layers, dim, adm = RELEASED[which]
        shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
        assert shapes["embedder.model.visual.conv1.weight"] == (width, 3, 14, 14)
        assert shapes["embedder.model.visual.positional_embedding"] == (257, width)
        assert shapes["embedder.model.visual.proj"] == (width, dim)
        last_block = f"embedder.model.visual.transformer.resblocks.{layers - 1}."
        assert shapes[last_block + "attn.in_proj_weight"] == (3 * width, width)
        assert f"embedder.model.visual.transformer.resblocks.{layers}.ln_1.weight" not in shapes
        assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, adm)
        assert shapes["noise_augmentor.betas"] == (1000,)
        assert model.embedder.unused_checkpoint_keys()[0] == "model.transformer."  # the text tower's, left unread
        assert model.noise_augmentor.data_std.shape == (1, dim) and model.parameterization == "v"
        activation = type(model.embedder.model.visual.transformer.resblocks[0].mlp.gelu).__name__
        assert activation == ("GELU" if which == "h" else "QuickGELU")
    torch.testing.assert_close(model.noise_augmentor.data_mean[0], torch.load(stats)[0])


def test_the_l_config_without_its_statistics_file_is_one_line_naming_it(tmp_path, monkeypatch, tiny_unclip):
    monkeypatch.chdir(tmp_path)
    problem = r"clip_stats_path checkpoints/karlo_models/ViT-L-14_stats.th: no such file"
    augmentor = meta_model(unclip_config("l")).noise_augmentor  # it builds; using it is refused
    with pytest.raises(ConfigError, match=problem):
        augmentor(torch.zeros(1, 768), torch.tensor([0]), torch.zeros(1, 768))
    tiny_unclip.noise_augmentor.stats_problem = augmentor.stats_problem
    try:
        with pytest.raises(UserError, match=problem):
            ImageVariations(torch.zeros(1, 3, 8, 8)).prepare(Job(batches=[["a"]]), loaded_in_memory(
                tiny_unclip, UNCLIP_TINY), print)
    finally:
        tiny_unclip.noise_augmentor.stats_problem = None
    torch.save({"mean": torch.zeros(3)}, tmp_path / "bad.th")
    with pytest.raises(ConfigError, match="not a pair"):
        meta_model(unclip_config("l", tmp_path / "bad.th"))


def test_a_checkpoint_with_the_originals_text_tower_loads_without_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from ldm.checkpoint import load_model

    ckpt = write_tiny_checkpoint(tmp_path, "unclip.safetensors", config=UNCLIP_TINY)
    weights = load_file(ckpt)
    text_tower = {"embedder.model.token_embedding.weight": torch.zeros(8, 4),
                  "embedder.model.positional_embedding": torch.zeros(77, 4),
                  "embedder.model.transformer.resblocks.0.ln_1.weight": torch.ones(4),
                  "embedder.model.ln_final.bias": torch.zeros(4), "embedder.model.text_projection": torch.zeros(4, 4),
                  "embedder.model.logit_scale": torch.tensor(4.6)}
    save_file({**weights, **text_tower}, ckpt)
    lines = []
    model = load_model(ckpt, log=lines.append).model
    assert "(6 extra ignored)" in lines[0]
    assert not any(name.startswith("embedder.model.t") for name, _ in model.named_parameters())
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value)
    save_file({**weights, "embedder.model.visual.stray": torch.zeros(1)}, ckpt)
    with pytest.raises(Exception, match="1 unexpected"):  # only the text tower is left unread
        load_model(ckpt, log=lines.append)


def test_the_config_is_chosen_from_the_image_towers_width():
    def keys(width):
        return {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3, device="meta"),
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight":
                    torch.empty(3072, 1024, device="meta"),
                "embedder.model.visual.transformer.resblocks.0.attn.in_proj_weight":
                    torch.empty(3 * width, width, device="meta")}

    assert guess_config(keys(1280)) == UNCLIP_H.name
    assert guess_config(keys(1024)) == UNCLIP_L.name


def test_resize_is_kornias_antialiased_bicubic():
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    pictures = torch.rand(2, 3, 300, 451, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(resize_antialiased(pictures, (224, 224)),
                               _resize_with_antialiasing(pictures, (224, 224)), atol=1e-5, rtol=1e-5)
    small = pictures[..., :100, :100]  # enlarged: no blur, plain bicubic
    torch.testing.assert_close(resize_antialiased(small, (224, 224)),
                               torch.nn.functional.interpolate(small, (224, 224), mode="bicubic", align_corners=True))


def diffusers_noised_embeddings(embedding, level, noise, mean, std):
    """StableUnCLIPImg2ImgPipeline.noise_image_embeddings, run on its own normaliser and noising scheduler."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embedding.shape[1])
    normalizer.load_state_dict({"mean": mean[None], "std": std[None]})
    pipeline = types.SimpleNamespace(image_normalizer=normalizer, image_noising_scheduler=DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
    return StableUnCLIPImg2ImgPipeline.noise_image_embeddings(pipeline, embedding, level, noise=noise)


@pytest.mark.parametrize("level", [0, 250, 999])
def test_noise_augmentation_is_diffusers(tmp_path, level):
    dim = 1024
    mean, std = write_stats(tmp_path / "stats.th", dim, seed=level)
    augmentor = CLIPEmbeddingNoiseAugmentation(clip_stats_path=tmp_path / "stats.th", timestep_dim=dim,
                                               noise_schedule_config={"timesteps": 1000,
                                                                      "beta_schedule": "squaredcos_cap_v2"})
    generator = torch.Generator().manual_seed(1)
    embedding, noise = torch.randn(2, dim, generator=generator), torch.randn(2, dim, generator=generator)
    noised, level_embedding = augmentor(embedding, torch.full((2,), level), noise)
    ours = torch.cat((noised, level_embedding), dim=1)
    theirs = diffusers_noised_embeddings(embedding, level, noise, mean, std)
    assert relative_error(ours, theirs) < 1e-5
    assert (relative_error(noised, embedding) < 0.05) == (level == 0)


def test_the_task_draws_start_then_augmentation_noise_and_guides_with_zeros(tiny_unclip):
    loaded = loaded_in_memory(tiny_unclip, UNCLIP_TINY)
    job = Job(batches=[["a", "a"]], height=64, width=64, seed=7)
    pixels = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(2)) * 2 - 1
    task = ImageVariations(pixels, noise_level=300)
    task.prepare(job, loaded, print)
    cond, uncond = torch.randn(2, 77, 32), torch.zeros(2, 77, 32)
    start = task.start(BatchInputs(["a", "a"], cond, uncond, SeededNoise(7, rng="cpu"), job, loaded))
    generator = torch.Generator().manual_seed(7)
    torch.testing.assert_close(start.latents, torch.randn(2, 4, 8, 8, generator=generator))
    noise = torch.randn(2, 16, generator=generator)
    embedding = tiny_unclip.image_embedding(pixels).expand(2, -1)
    expected = tiny_unclip.adm_conditioning(embedding, torch.tensor([300, 300]), noise)
    torch.testing.assert_close(start.cond["c_adm"], expected)
    assert start.cond["c_crossattn"][0] is cond and start.uncond["c_crossattn"][0] is uncond
    assert torch.equal(start.uncond["c_adm"], torch.zeros_like(expected))
    assert task.fields(job) == {"Noise level": 300}


def test_noise_levels_outside_the_models_are_refused():
    for level in (-1, 1000, 2.5):
        with pytest.raises(UserError, match=r"--noise_level .* is outside 0\.\.999"):
            check_noise_level(level)
    check_noise_level(999)


def test_script_makes_variations_with_their_infotext(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, "unclip.safetensors", config=UNCLIP_TINY)
    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(picture)
    result = run_script("variations", "--ckpt", ckpt, "--init-img", picture, "--steps", 2, "--noise_level", 100,
                        "--sampler", "euler_a", "--seed", 5, "--outdir", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    saved = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(saved) == 2
    text = Image.open(saved[0]).info["parameters"]
    assert "Noise level: 100" in text and "Sampler: Euler a" in text and "Seed: 5" in text

    # the Python API makes the same pictures from the same settings
    pipe = Pipeline.from_pretrained(ckpt, device="cpu", log=lambda line: None)
    result = pipe.variations(picture, noise_level=100, num_inference_steps=2, guidance_scale=10.0, seed=5,
                             sampler="euler_a", num_images_per_prompt=2)
    for image, path in zip(result.images, saved, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))
    with pytest.raises(ValueError, match="noise_level 1000 is outside"):
        pipe.variations(picture, noise_level=1000, num_inference_steps=1)
    with pytest.raises(ValueError, match="image variations, which pipe.inpaint cannot use"):
        pipe.inpaint("x", picture, picture)


# --- full-size random weights against diffusers' components (slow; run under `flock /tmp/bigmem.lock`) ---------
def hf_vision_state_dict(visual: dict, layers: int) -> dict:
    """Our (the original checkpoints') image-tower tensors as transformers' CLIPVisionModelWithProjection's."""
    mapped = {"vision_model.embeddings.class_embedding": visual["class_embedding"],
              "vision_model.embeddings.patch_embedding.weight": visual["conv1.weight"],
              "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
              "visual_projection.weight": visual["proj"].t()}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            mapped[f"vision_model.{theirs}.{kind}"] = visual[f"{ours}.{kind}"]
    for index in range(layers):
        ours, theirs = f"transformer.resblocks.{index}.", f"vision_model.encoder.layers.{index}."
        for kind in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), visual[ours + f"attn.in_proj_{kind}"].chunk(3)):
                mapped[theirs + f"self_attn.{name}.{kind}"] = part
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                mapped[theirs + f"{b}.{kind}"] = visual[ours + f"{a}.{kind}"]
    return mapped


def hf_vision_model(visual: dict, which: str):
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    width, layers, dim, _ = RELEASED[which]
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=16, patch_size=14, image_size=224, projection_dim=dim,
                              hidden_act="gelu" if which == "h" else "quick_gelu", layer_norm_eps=1e-5)
    with init_empty_weights():
        model = CLIPVisionModelWithProjection(config)
    model.load_state_dict(hf_vision_state_dict(visual, layers), strict=False, assign=True)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["h", "l"])
def test_image_embedding_is_transformers_clip_vision_with_projection(which):
    embedder_class = FrozenOpenCLIPImageEmbedder if which == "h" else ClipImageEmbedder
    with parameters_on_meta():
        embedder = embedder_class()
    weights = random_state_dict(embedder.state_dict(), seed=11)
    embedder.load_state_dict(weights, assign=True)
    embedder.eval()
    visual = {key.removeprefix("model.visual."): value for key, value in weights.items()}
    reference = hf_vision_model(visual, which)
    pictures = torch.rand(2, 3, 320, 288, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ours = embedder(pictures)
        theirs = reference(pixel_values=embedder.preprocess(pictures)).image_embeds
    assert relative_error(ours, theirs) < 1e-4


@pytest.mark.slow
def test_unet_with_noise_augmented_embedding_is_diffusers(tmp_path):
    from helpers import diffusers_models

    model = meta_model(unclip_config("h"))
    weights = random_state_dict({"model.diffusion_model." + key: value for key, value
                                 in model.model.diffusion_model.state_dict().items()}, seed=5)
    model.model.diffusion_model.load_state_dict({k.removeprefix("model.diffusion_model."): v
                                                 for k, v in weights.items()}, assign=True)
    unet = diffusers_models(UNCLIP_H, {**weights, **_zero_autoencoder(model)})[0]
    generator = torch.Generator().manual_seed(4)
    embedding, noise = torch.randn(1, 1024, generator=generator), torch.randn(1, 1024, generator=generator)
    c_adm = model.adm_conditioning(embedding, torch.tensor([200]), noise)
    theirs_adm = diffusers_noised_embeddings(embedding, 200, noise, torch.zeros(1024), torch.ones(1024))
    assert relative_error(c_adm, theirs_adm) < 1e-5
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 1024, generator=generator)
    t = torch.tensor([500])
    with torch.no_grad():
        ours = model.apply_model(x, t, {"c_crossattn": [context], "c_adm": c_adm})
        theirs = unet(x, t, encoder_hidden_states=context, class_labels=theirs_adm).sample
    assert relative_error(ours, theirs) < 1e-4


def _zero_autoencoder(model) -> dict:
    """The autoencoder's tensors, real (zeros): diffusers' conversion builds the VAE too, which this test ignores."""
    return {"first_stage_model." + key: torch.zeros(value.shape)
            for key, value in model.first_stage_model.state_dict().items()}
