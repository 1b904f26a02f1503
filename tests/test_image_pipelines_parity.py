"""img2img, inpainting and x4 upscaling against diffusers' own pipelines, on small random-weight models.

The models (the tiny configs, widened to 128 channels) are written as original-format checkpoints and
converted for diffusers by its own single-file conversion functions (as the project's notes on diffusers as an offline reference record);
DDIM is configured as the originals run it.
Both sides get the same text embeddings (ours; the encoders are compared elsewhere) and the same seeded
CPU generator, so the comparison covers the conditioning layout, the random draws and their order, the
noising, the sampler and guidance. Compared: the final latents, which the decoder only maps to pixels.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionUpscalePipeline,
)
from omegaconf import OmegaConf  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import diffusers_models, meta_state_dict, random_state_dict, relative_error  # noqa: E402
from ldm.generate import run as run_module  # noqa: E402
from ldm.generate.img2img import ImageToImage  # noqa: E402
from ldm.generate.inpaint import Inpainting  # noqa: E402
from ldm.generate.loading import load  # noqa: E402
from ldm.generate.output import OutputFolder  # noqa: E402
from ldm.generate.run import Job, run  # noqa: E402
from ldm.generate.upscale import Upscaling  # noqa: E402

TINY = REPO / "configs" / "tiny"
MAX_RELATIVE_ERROR = 1e-4
PROMPT, STEPS, SCALE, SEED = "a red square", 10, 5.0, 7
WIDTH = 128


def write_checkpoint(folder, config_name):
    """A random original-format checkpoint of a tiny config made 128 channels wide, with the config beside it.

    128 channels: our group norms use the originals' 32 groups from 128 channels up (all of SD's layers),
    but 4 channels a group in narrower ones, which diffusers' single norm_num_groups cannot express.
    """
    config = OmegaConf.load(TINY / config_name)
    config.model.params.unet_config.params.model_channels = WIDTH
    config.model.params.first_stage_config.params.ddconfig.ch = WIDTH
    path = folder / config_name.replace(".yaml", ".ckpt")
    OmegaConf.save(config, path.with_suffix(".yaml"))
    torch.save({"state_dict": random_state_dict(meta_state_dict(path.with_suffix(".yaml")), seed=1)}, path)
    return path, path.with_suffix(".yaml")


def both_models(tmp_path, config_name):
    path, config = write_checkpoint(tmp_path, config_name)
    loaded = load(str(path), None, "cpu", "full", log=lambda _: None)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    unet, vae = diffusers_models(config, checkpoint)
    return loaded, unet, vae, OmegaConf.load(config).model.params


def ddim_like_originals(params):
    prediction = {"eps": "epsilon", "v": "v_prediction"}[params.get("parameterization", "eps")]
    return DDIMScheduler(num_train_timesteps=1000, beta_start=params.linear_start, beta_end=params.linear_end,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading", prediction_type=prediction)


def pipeline(cls, unet, vae, scheduler, **extra):
    return cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, **extra)


def our_final_latents(loaded, task, height, width, tmp_path, monkeypatch):
    """Run the task through the shared loop (one picture) and return the latents it decodes."""
    captured = []
    real_decode = run_module.decode
    monkeypatch.setattr(run_module, "decode", lambda loaded_, latents, *rest: captured.append(latents.clone())
                        or real_decode(loaded_, latents, *rest))
    job = Job(batches=[[PROMPT]], steps=STEPS, scale=SCALE, height=height, width=width, seed=SEED, seed_mode="batch",
              save_grid=False, watermark=False)
    run(job, task, loaded, OutputFolder(tmp_path / "out"), log=lambda _: None)
    return captured[0]


def text_embeddings(loaded):
    with torch.no_grad():
        return loaded.model.get_learned_conditioning([PROMPT]), loaded.model.get_learned_conditioning([""])


def structured_picture():
    """A [-1, 1] picture with structure (a gradient and a square), 48x64."""
    ramp = torch.linspace(-1, 1, 64)
    picture = torch.stack([ramp.expand(48, 64), ramp.flip(0).expand(48, 64), torch.full((48, 64), 0.2)])
    picture[:, 12:30, 20:44] = torch.tensor([0.9, -0.8, -0.3])[:, None, None]
    return picture[None]


def assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, what
    assert theirs.std() > 0.1, f"{what}: the reference is nearly constant"
    error = relative_error(ours, theirs)
    assert error < MAX_RELATIVE_ERROR, f"{what}: relative error {error:.2e}"


def test_img2img_matches_diffusers_with_the_originals_noise_level(tmp_path, monkeypatch):
    loaded, unet, vae, params = both_models(tmp_path, "txt2img-tiny.yaml")
    picture = structured_picture()
    ours = our_final_latents(loaded, ImageToImage(picture, 0.75), 48, 64, tmp_path, monkeypatch)

    scheduler = ddim_like_originals(params)
    # diffusers noises to the first denoising step; the originals (and we) one DDIM step higher.
    one_ddim_step = 1000 // STEPS
    scheduler.add_noise = lambda x, noise, t: DDIMScheduler.add_noise(scheduler, x, noise, t + one_ddim_step)
    pipe = pipeline(StableDiffusionImg2ImgPipeline, unet, vae, scheduler, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)
    cond, uncond = text_embeddings(loaded)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=(picture + 1) / 2, strength=0.75,
                      num_inference_steps=STEPS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(SEED),
                      output_type="latent").images
    assert_close(ours, theirs, "img2img latents")


def test_inpainting_model_matches_diffusers(tmp_path, monkeypatch):
    loaded, unet, vae, params = both_models(tmp_path, "inpaint-tiny.yaml")
    picture = structured_picture()
    mask = torch.zeros(1, 1, 48, 64)
    mask[..., 8:36, 28:60] = 1.0
    task = Inpainting(picture, mask, strength=1.0, paste_back=False)
    ours = our_final_latents(loaded, task, 48, 64, tmp_path, monkeypatch)

    pipe = pipeline(StableDiffusionInpaintPipeline, unet, vae, ddim_like_originals(params), safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)
    cond, uncond = text_embeddings(loaded)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=(picture + 1) / 2, mask_image=mask,
                      height=48, width=64, strength=1.0, num_inference_steps=STEPS, guidance_scale=SCALE,
                      generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    assert_close(ours, theirs, "inpainting latents")


def test_x4_upscaler_matches_diffusers(tmp_path, monkeypatch):
    loaded, unet, vae, params = both_models(tmp_path, "upscale-tiny.yaml")
    low_res = torch.nn.functional.avg_pool2d(structured_picture(), 4)  # 12x16
    ours = our_final_latents(loaded, Upscaling(low_res, noise_level=40), 48, 64, tmp_path, monkeypatch)

    noise_schedule = params.low_scale_config.params.noise_schedule_config
    low_res_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=noise_schedule.linear_start,
                                      beta_end=noise_schedule.linear_end, beta_schedule="scaled_linear")
    pipe = pipeline(StableDiffusionUpscalePipeline, unet, vae, ddim_like_originals(params),
                    low_res_scheduler=low_res_scheduler, max_noise_level=350)
    cond, uncond = text_embeddings(loaded)
    # We draw the start noise, then the augmentation noise; diffusers the other way round unless it is
    # handed the start noise: draw it first from the same generator and pass it in.
    generator = torch.Generator().manual_seed(SEED)
    start = torch.randn([1, 4, 12, 16], generator=generator)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=(low_res + 1) / 2, noise_level=40,
                      num_inference_steps=STEPS, guidance_scale=SCALE, generator=generator, latents=start,
                      output_type="latent").images
    assert_close(ours, theirs, "upscaler latents")
