"""What several test modules share, so that no test module imports another: numeric comparison, seeded
generators, a LoadedModel around an in-memory model, the scripts run as users run them, the random
full-size weights and diffusers models that the parity tests compare with, full-size text encoders with
random weights and transformers' CLIP on them, and the k-diffusion package with what the k-sampler tests
run through it.

Tiny models and checkpoints themselves stay in tiny_model.py (one job per module); shared fixtures are in
conftest.py.
"""
import contextlib
import importlib.util
import json
import inspect
import math
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from conftest import REPO
from ldm.checkpoint import parameters_on_meta
from ldm.diffusers_folder import CLIP_PREFIX
from ldm.generate.loading import LoadedModel
from ldm.models.diffusion import samplers
from ldm.models.diffusion.k_sampling import ModelSigmas
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.encoders.modules import VIT_L_14_TEXT_CONFIG
from ldm.util import instantiate_from_config
from tiny_model import TINY_CONFIG, tiny_model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """|ours - reference| / |reference| (Frobenius norms), computed in float64."""
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loaded_in_memory(model: torch.nn.Module, config: Path = TINY_CONFIG, downsampling_factor: int = 8,
                     dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A LoadedModel around an in-memory model (no checkpoint file: the config stands in for its path)."""
    return LoadedModel(model, None, config, torch.device("cpu"), dtype, latent_channels=model.channels,
                       downsampling_factor=downsampling_factor, native_size=model.image_size * downsampling_factor)


def loaded_tiny(config: Path = TINY_CONFIG, downsampling_factor: int = 8) -> LoadedModel:
    return loaded_in_memory(tiny_model(config=config), config, downsampling_factor)


# --- scripts ---------------------------------------------------------------------------------------------------
def script_environment(**extra) -> dict:
    """The environment scripts run in under test: a model-hash cache of their own, plus `extra`."""
    return {**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/ldm-test-cache"), **extra}


def run_script(name: str, *args, timeout=120) -> subprocess.CompletedProcess:
    """scripts/<name>.py with these arguments, its output captured as text."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=script_environment())


def txt2img(*args, timeout=120) -> subprocess.CompletedProcess:
    return run_script("txt2img", *args, timeout=timeout)


# --- full-size random weights, and diffusers' models on them ------------------------------------------------------
POOL_SLACK = 1.5  # each pool of noise is this much longer than its largest tensor, so all offsets vary


def random_state_dict(template: dict, seed: int) -> dict:
    """Seeded random weights for every parameter of `template` (a meta-built model's state dict).

    Scaled so that activations stay O(1) through the whole network: matrices and kernels with standard
    deviation 1/sqrt(fan_in), norm scales near 1, small biases. Every tensor is random, including the
    output convolutions that the networks initialise to zero: with those at zero, whole branches (and the
    UNet's output) would be zero on both sides and the comparison would check nothing.
    Buffers (the noise schedule) are real already and are kept.

    To keep the checkpoint small, the tensors of one scale are windows, at seeded random offsets, into one
    shared pool of noise of that scale: torch.save writes a shared storage once, so the file holds about
    1 GB instead of 4 to 5, and drawing, writing and paging it in cost a quarter as much. Windows overlap
    only at shifted positions, which no comparison of two implementations could take for agreement.
    """
    generator = torch.Generator().manual_seed(seed)
    scales = {key: scale_of(key, tensor) for key, tensor in template.items() if tensor.device.type == "meta"}
    largest = {}
    for key, scale in scales.items():
        largest[scale] = max(largest.get(scale, 0), template[key].numel())
    pools = {}
    for (std, mean), count in largest.items():
        pool = torch.empty(int(count * POOL_SLACK)).uniform_(-math.sqrt(3), math.sqrt(3), generator=generator)
        pools[std, mean] = pool.mul_(std).add_(mean)  # a uniform variable on [-a, a] has variance a^2 / 3

    weights = {}
    for key, template_tensor in template.items():
        if key not in scales:
            weights[key] = template_tensor.clone()
            continue
        pool, count = pools[scales[key]], template_tensor.numel()
        offset = int(torch.randint(0, pool.numel() - count + 1, (1,), generator=generator))
        weights[key] = pool[offset:offset + count].view(template_tensor.shape)
    return weights


def scale_of(key: str, tensor: torch.Tensor) -> tuple:
    """(standard deviation, mean) of a parameter's random values."""
    if tensor.ndim >= 2:
        return 1 / math.sqrt(tensor[0].numel()), 0.0  # 1 / sqrt(fan_in)
    if key.endswith("weight"):  # the 1-D weights are the norm layers' scales
        return 0.1, 1.0
    return 0.1, 0.0


def meta_state_dict(config_path) -> dict:
    config = OmegaConf.load(config_path)
    with parameters_on_meta():
        return instantiate_from_config(config.model, use_ema=False).state_dict()


def build_full_size_random(config_name, seed):
    """A full-size SD model whose UNet has seeded random weights (PyTorch's default initialisation)."""
    with parameters_on_meta():
        model = instantiate_from_config(OmegaConf.load(REPO / "configs" / "stable-diffusion" / config_name).model,
                                        use_ema=False)
    network = model.model.to_empty(device="cpu")
    torch.manual_seed(seed)
    for layer in network.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return model.eval().requires_grad_(False)


def diffusers_models(original_config_path, checkpoint: dict):
    """diffusers' UNet and VAE, configured from the original YAML and loaded strictly from `checkpoint`."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    original_config = OmegaConf.to_container(OmegaConf.load(original_config_path), resolve=True)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True, assign=True)
    return unet.eval(), vae.eval()


# --- full-size text encoders with random weights, and transformers' CLIP on them ----------------------------------
def randomise_(module: nn.Module, seed: int) -> None:
    """Seeded random weights: LayerNorm weights (the only 1-D weights) near 1, the rest small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.02 * noise)


def build_random(encoder_class, seed: int, **kwargs) -> nn.Module:
    """Full-size encoder with seeded random weights, skipping the default initialisation (slow)."""
    with torch.device("meta"):
        encoder = encoder_class(**kwargs)
    encoder.to_empty(device="cpu")
    randomise_(encoder, seed)
    return encoder


def build_reference_clip(checkpoint_text_model: dict, **config) -> nn.Module:
    """transformers' CLIPTextModel with the given weights (keys as diffusers' conversion gives them)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)
    with init_empty_weights():  # parameters on meta, buffers (position_ids) real
        model = CLIPTextModel(config)
    if not hasattr(model, "text_model"):  # transformers >= 5.6: flat, no "text_model." level
        checkpoint_text_model = {k.removeprefix("text_model."): v for k, v in checkpoint_text_model.items()}
    model.load_state_dict(checkpoint_text_model, strict=True, assign=True)
    return model.eval()


# --- the k-diffusion package, loaded by path ----------------------------------------------------------------------
# k-diffusion's package __init__ imports torchvision and friends; only its sampling.py and external.py are needed,
# so they are loaded by path, with the modules they import but the tests never reach stood in for.
def _exact_quad(function, low, high, **_):
    """Gauss-Legendre with 8 nodes: exact for the cubic Lagrange polynomials k-diffusion's LMS integrates."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    taus = (high - low) / 2 * nodes + (high + low) / 2
    return (high - low) / 2 * sum(w * function(tau) for w, tau in zip(weights, taus)), 0.0


def _stand_ins() -> dict:
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, ndim: x[(...,) + (None,) * (ndim - x.ndim)]
    scipy, integrate = types.ModuleType("scipy"), types.ModuleType("scipy.integrate")
    integrate.quad, scipy.integrate = _exact_quad, integrate
    torchdiffeq = types.ModuleType("torchdiffeq")
    torchdiffeq.odeint = None
    return {"k_diffusion.utils": utils, "scipy": scipy, "scipy.integrate": integrate, "torchdiffeq": torchdiffeq,
            "torchsde": types.ModuleType("torchsde")}


def load_kdiffusion() -> tuple:
    """(k_diffusion.sampling, k_diffusion.external), loaded by path; skips the test where k-diffusion is absent."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion (the test extra has it)")
    folder = spec.submodule_search_locations[0]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [folder]
    saved = {name: sys.modules.get(name) for name in ("k_diffusion", *_stand_ins())}
    sys.modules.update(_stand_ins(), k_diffusion=package)
    loaded = []
    try:  # the modules bind what they import while loading: the stand-ins leave sys.modules right after
        for name in ("sampling", "external"):
            module_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", f"{folder}/{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            setattr(package, name, module)
            loaded.append(module)
    finally:
        for name in ("k_diffusion.sampling", "k_diffusion.external"):
            sys.modules.pop(name, None)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return tuple(loaded)


# --- the k-samplers: names, the SD schedule, noise, an exact denoiser, runs of ours and theirs --------------------
K_SAMPLERS = [key for key, info in samplers.REGISTRY.items() if info.is_k_sampler]
NOT_IN_K_DIFFUSION = {"lcm"}  # A1111's own sample_lcm (sd_samplers_lcm.py): test_more_samplers checks its rule
K_DIFFUSION_SAMPLERS = [key for key in K_SAMPLERS if key not in NOT_IN_K_DIFFUSION]
SD_ALPHAS_CUMPROD = np.cumprod(1.0 - make_beta_schedule("linear", 1000, 0.00085, 0.012))


class NoiseFrom:
    """A noise source over a torch.Generator, as the run's: randn(shape)."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape):
        return torch.randn(list(shape), generator=self.generator)


def k_noise_sampler(seed, shape):
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(list(shape), generator=generator)


class GaussianVEDenoiser:
    """The exact denoiser (x, sigma) -> E[x0 | x] for data N(mu, diag(s²)), x = x0 + sigma·noise. The ODE keeps
    z = (x - mu) / sqrt(s² + sigma²) constant: its exact solution at sigma is mu + sqrt(s² + sigma²)·z."""

    def __init__(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        shape = (1, 4, 8, 8)
        self.mu = 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
        self.s = 0.3 + 1.2 * torch.rand(shape, generator=generator, dtype=torch.float64)
        self.z = torch.randn(shape, generator=generator, dtype=torch.float64)

    def __call__(self, x, sigma):
        sigma = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def at(self, sigma):
        return self.mu + (self.s**2 + sigma**2).sqrt() * self.z


def karras_grid(steps):
    model_sigmas = ModelSigmas(torch.tensor(SD_ALPHAS_CUMPROD))
    return samplers.sigma_grid("euler", "karras", steps, model_sigmas)


def run_ours(name, model, x, sigmas, seed=5):
    info = samplers.REGISTRY[name]
    return info.function(model, x, sigmas, noise=NoiseFrom(seed), callback=None, **info.options)


def run_theirs(kd_sampling, name, model, x, sigmas, seed=5, **extra):
    function = getattr(kd_sampling, samplers.REGISTRY[name].function.__name__)
    options = {"noise_sampler": k_noise_sampler(seed, x.shape)} if samplers.REGISTRY[name].stochastic else {}
    parameters = inspect.signature(function).parameters
    if "sigma_min" in parameters:  # DPM fast / adaptive: the grid's ends and length, and eta, as A1111 hands them
        options.update(sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]), eta=1.0)
        if "n" in parameters:
            options["n"] = len(sigmas) - 1
        return function(model, x, disable=True, **options, **extra)
    return function(model, x, sigmas, disable=True, **options, **extra)


# --- diffusers pipeline folders, as diffusers writes them -----------------------------------------------------------
CLIP_CONFIG = {k: v for k, v in VIT_L_14_TEXT_CONFIG.items() if k not in ("vocab_size", "max_position_embeddings")}


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_pipeline_files(folder, pipeline="StableDiffusionPipeline", prediction_type="epsilon"):
    write_json(folder / "model_index.json", {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"]})
    write_json(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": "PNDMScheduler", "prediction_type": prediction_type})


def write_folder(folder, config_path, original: dict, text_encoder=True, variant=None, vae_pickled=False):
    """The diffusers folder of `original` as diffusers writes it: its own conversion, then save_pretrained."""
    unet, vae = diffusers_models(config_path, original)
    if variant == "fp16":
        unet, vae = unet.half(), vae.half()
    unet.save_pretrained(folder / "unet", variant=variant)
    vae.save_pretrained(folder / "vae", variant=variant, safe_serialization=not vae_pickled)
    if text_encoder:
        clip = {k.removeprefix(CLIP_PREFIX): v for k, v in original.items()
                if k.startswith(CLIP_PREFIX) and not k.endswith("position_ids")}
        clip_model = build_reference_clip(clip, **CLIP_CONFIG)
        (clip_model.half() if variant == "fp16" else clip_model).save_pretrained(folder / "text_encoder", variant=variant)
    write_pipeline_files(folder)
    return folder


def assert_same_weights(ours: dict, original: dict, prefixes):
    """Every tensor of `original` under `prefixes` is in `ours` with the same dtype and bits, and no other."""
    expected = {k: v for k, v in original.items() if k.startswith(prefixes) and not k.endswith("position_ids")}
    got = {k: v for k, v in ours.items() if k.startswith(prefixes)}
    assert sorted(got) == sorted(expected)
    different = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert different == []


def build_clip_tiny(folder):
    """A tiny UNet and VAE with SD 1.x's CLIP text encoder (so that a whole pipeline folder loads): (its
    diffusers folder, its config path, its original weights)."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.context_dim = 768
    config.model.params.cond_stage_config = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    config_path = folder / "clip-tiny.yaml"
    OmegaConf.save(config, config_path)
    original = random_weights(config_path, seed=4)
    return write_folder(folder / "pipe", config_path, original), config_path, original


def random_weights(config_path, seed: int) -> dict:
    """The state dict of the config's model with seeded random weights, none of them all zeros (the
    zero-initialised output layers would compare zeros with zeros)."""
    torch.manual_seed(seed)
    original = {k: v.contiguous() for k, v in instantiate_from_config(OmegaConf.load(config_path).model).state_dict().items()}
    with torch.no_grad():
        for key, tensor in original.items():
            if tensor.is_floating_point() and tensor.ndim > 1 and not tensor.any():
                tensor.normal_(0, 0.02)
    return original


# --- SD 2.x-family diffusers folders, as diffusers' pipelines save them ----------------------------------------------
def openclip_config(folder, base_config, arch="ViT-L-14", width=768, **params) -> Path:
    """`base_config` with SD 2.x's text encoder class (OpenCLIP, penultimate layer) on the tower `arch` of
    `width`, saved in `folder`; `params` override the model's."""
    config = OmegaConf.load(base_config)
    config.model.params.unet_config.params.context_dim = width
    config.model.params.cond_stage_config = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                             "params": {"arch": arch, "layer": "penultimate"}}
    config.model.params.update(params)
    path = Path(folder) / f"openclip-{Path(base_config).name}"
    OmegaConf.save(config, path)
    return path


def diffusers_openclip(original: dict, width: int, heads: int):
    """transformers' CLIPTextModel as diffusers converts SD 2.x's OpenCLIP tower (convert_open_clip_checkpoint)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    class ConfigOnly:  # convert_open_clip_checkpoint reads only text_model.config.hidden_size
        config = types.SimpleNamespace(hidden_size=width)

    converted = convert_open_clip_checkpoint(ConfigOnly, original)
    converted.pop("text_projection.weight", None)  # SD 2.x's text model has no projection
    layers = len({key.split(".")[3] for key in converted if ".encoder.layers." in key})
    return build_reference_clip(converted, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                num_attention_heads=heads, hidden_act="gelu")


def save_diffusers_pipeline(folder, config_path, original: dict, tokenizer_folder, text_tower=(768, 12),
                            variant=None, safe_serialization=True) -> Path:
    """The pipeline diffusers builds from `original` (its own conversion of each model, the schedulers
    from_single_file makes), written by its save_pretrained: the folder diffusers users have."""
    import diffusers
    from transformers import CLIPTokenizer

    params = OmegaConf.load(config_path).model.params
    unet, vae = diffusers_models(config_path, original)
    text_encoder = diffusers_openclip(original, *text_tower)
    schedule = dict(beta_start=params.linear_start, beta_end=params.linear_end, beta_schedule="scaled_linear",
                    prediction_type="v_prediction" if params.get("parameterization") == "v" else "epsilon")
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_folder)),
                 unet=unet, scheduler=diffusers.DDIMScheduler(**schedule))
    model_class = OmegaConf.load(config_path).model.target.rsplit(".", 1)[-1]
    if model_class == "LatentUpscaleDiffusion":
        low_res = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")
        pipeline = diffusers.StableDiffusionUpscalePipeline(**parts, low_res_scheduler=low_res,
                                                            max_noise_level=params.low_scale_config.params.max_noise_level)
    elif model_class == "LatentDepth2ImageDiffusion":
        pipeline = diffusers.StableDiffusionDepth2ImgPipeline(**parts, depth_estimator=None, feature_extractor=None)
    else:
        pipeline_class = {"LatentDiffusion": diffusers.StableDiffusionPipeline,
                          "LatentInpaintDiffusion": diffusers.StableDiffusionInpaintPipeline}[model_class]
        pipeline = pipeline_class(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if variant == "fp16":
        pipeline.to(torch.float16)
    pipeline.save_pretrained(str(folder), variant=variant, safe_serialization=safe_serialization)
    if not safe_serialization:  # transformers >= 5 writes .safetensors whatever it is asked: as older ones did
        weights = Path(folder) / "text_encoder" / "model.safetensors"
        torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
        weights.unlink()
    return Path(folder)


def record_calls(monkeypatch, model) -> list:
    """The batch size of every apply_model call of `model` from now on, in order."""
    calls = []
    apply_model = model.apply_model

    def recording(x, t, cond):
        calls.append(x.shape[0])
        return apply_model(x, t, cond)

    monkeypatch.setattr(model, "apply_model", recording)
    return calls


# --- SDXL diffusers folders, as diffusers' pipelines save them ---------------------------------------------------
def diffusers_openclip_with_projection(original: dict, prefix: str, width: int, layers: int, heads: int):
    """transformers' CLIPTextModelWithProjection as diffusers converts SDXL's OpenCLIP bigG tower (under `prefix`)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, hidden_act="gelu", projection_dim=width, max_position_embeddings=77,
        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    missing, unexpected = text.load_state_dict(convert_open_clip_checkpoint(text, original, prefix=prefix), strict=False)
    assert not unexpected and all(key.endswith("position_ids") for key in missing)
    return text.eval()


def diffusers_sdxl_unet(config_path, original: dict):
    """diffusers' SDXL UNet (addition_embed_type text_time) converted from `original` by diffusers."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = OmegaConf.load(config_path).model.params
    config = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(OmegaConf.load(config_path)), original)
    outdim = next(embedder.params.outdim for embedder in params.conditioner_config.params.emb_models
                  if embedder.input_key != "txt")
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=outdim)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(original, config), strict=True)
    return unet.eval()


def save_diffusers_sdxl(folder, config_path, original: dict, tower: tuple, refiner=False, variant=None) -> Path:
    """The SDXL pipeline (the refiner's img2img pipeline with `refiner`) diffusers builds from `original` with its
    own conversion functions, written by its save_pretrained; tower: the bigG stand-in's (width, layers, heads)."""
    import diffusers

    first = "conditioner.embedders.0.transformer."
    text_encoder = None if refiner else build_reference_clip(
        {k.removeprefix(first): v for k, v in original.items() if k.startswith(first) and "position_ids" not in k},
        **CLIP_CONFIG)
    text_encoder_2 = diffusers_openclip_with_projection(original, f"conditioner.embedders.{0 if refiner else 1}.model.",
                                                        *tower)
    _, vae = diffusers_models(config_path, original)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=None,
                 unet=diffusers_sdxl_unet(config_path, original), scheduler=scheduler)
    pipeline = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True) if refiner \
        else diffusers.StableDiffusionXLPipeline(**parts)
    if variant == "fp16":
        pipeline.to(torch.float16)
    pipeline.save_pretrained(str(folder), variant=variant)
    return Path(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app, seconds: float = 30):
    """An ASGI app under uvicorn on a free loopback port, in a thread; yields the port."""
    uvicorn = pytest.importorskip("uvicorn")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + seconds
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(seconds)


def png_b64(image) -> str:
    """A picture as the base64 PNG that A1111's API takes."""
    import base64
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
