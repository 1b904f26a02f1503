"""img2img's defining behaviour on the tiny model: the originals' random draws and off-by-one, strength 0 and 1."""
import pytest
import torch

from helpers import loaded_tiny
from ldm.generate import run as run_module
from ldm.generate.errors import UserError
from ldm.generate.img2img import ImageToImage, noised_start_timestep
from ldm.generate.options import check_strength
from ldm.generate.output import OutputFolder
from ldm.generate.run import Job, run
from ldm.generate.txt2img import TextToImage
from ldm.models.diffusion import sampling
from ldm.models.diffusion.ddim import DDIMSampler

STEPS, SEED, SIZE = 10, 3, 32


@pytest.fixture(scope="module")
def loaded():
    return loaded_tiny()


def picture(seed):
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def final_latents(loaded, task, tmp_path, monkeypatch, steps=STEPS, **job_settings):
    """The latents each batch decodes, and the sampler calls, of one run."""
    decoded, sampled = [], []
    real_decode, real_sample = run_module.decode, run_module.sample

    def decode_spy(loaded_, latents, *rest):
        decoded.append(latents.clone())
        return real_decode(loaded_, latents, *rest)

    def sample_spy(name, denoiser, x, steps_, **kwargs):
        sampled.append({"x": x.clone(), **kwargs})
        return real_sample(name, denoiser, x, steps_, **kwargs)

    monkeypatch.setattr(run_module, "decode", decode_spy)
    monkeypatch.setattr(run_module, "sample", sample_spy)
    settings = {"batches": [["a blue circle"]], "steps": steps, "scale": 5.0, "height": SIZE, "width": SIZE,
                "seed": SEED, "seed_mode": "batch", "save_grid": False, "watermark": False, **job_settings}
    run(Job(**settings), task, loaded, OutputFolder(tmp_path / "out"), log=lambda _: None)
    return decoded, sampled


def test_same_seed_gives_the_originals_img2img(loaded, tmp_path, monkeypatch):
    """The originals' script, step by step, on the original DDIMSampler API with the global generator
    seeded once: posterior sample, stochastic encode to index t_enc, decode t_enc steps."""
    image, strength = picture(0), 0.75
    ours, _ = final_latents(loaded, ImageToImage(image, strength), tmp_path, monkeypatch)

    model = loaded.model
    torch.manual_seed(SEED)
    with torch.no_grad():
        sampler = DDIMSampler(model)
        sampler.make_schedule(ddim_num_steps=STEPS, ddim_eta=0.0, verbose=False)
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(image))  # draw 1
        t_enc = int(strength * STEPS)
        z_enc = sampler.stochastic_encode(init_latent, torch.tensor([t_enc]))  # draw 2
        c = model.get_learned_conditioning(["a blue circle"])
        uc = model.get_learned_conditioning([""])
        expected = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-5)


def test_noised_one_ddim_step_above_where_denoising_starts(loaded, tmp_path, monkeypatch):
    """The originals' off-by-one: noise to DDIM index t_enc, denoise t_enc steps from index t_enc - 1."""
    image = picture(1)
    _, sampled = final_latents(loaded, ImageToImage(image, 0.75), tmp_path, monkeypatch)
    schedule = sampling.Schedule(loaded.model.alphas_cumprod)
    t_enc = 7
    assert sampled[0]["skip_steps"] == STEPS - t_enc
    assert sampling.first_timestep("ddim", schedule, STEPS, STEPS - t_enc) == 601
    assert noised_start_timestep("ddim", schedule, STEPS, t_enc) == 701

    generator = torch.Generator().manual_seed(SEED)
    posterior = loaded.model.encode_first_stage(image)
    init_latent = loaded.model.scale_factor * (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator))
    noise = torch.randn(init_latent.shape, generator=generator)
    expected = sampling.noise_to_step(schedule, init_latent, 701, noise)
    torch.testing.assert_close(sampled[0]["x"], expected, rtol=1e-5, atol=1e-6)


def test_strength_zero_returns_the_reconstruction_without_sampling(loaded, tmp_path, monkeypatch):
    image = picture(2)
    decoded, sampled = final_latents(loaded, ImageToImage(image, 0.0), tmp_path, monkeypatch)
    assert not sampled
    posterior = loaded.model.encode_first_stage(image)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(decoded[0], loaded.model.scale_factor * (posterior.mean + posterior.std * noise))


def test_strength_one_ignores_the_picture_and_starts_like_txt2img(loaded, tmp_path, monkeypatch):
    first, sampled = final_latents(loaded, ImageToImage(picture(3), 1.0), tmp_path / "a", monkeypatch)
    second, _ = final_latents(loaded, ImageToImage(picture(4), 1.0), tmp_path / "b", monkeypatch)
    txt2img, _ = final_latents(loaded, TextToImage(), tmp_path / "c", monkeypatch)
    assert sampled[0]["skip_steps"] == 0
    assert torch.equal(first[0], second[0]) and torch.equal(first[0], txt2img[0])


@pytest.mark.parametrize("sampler", ["plms", "dpm"])
def test_other_samplers_start_from_the_noised_picture(loaded, tmp_path, monkeypatch, sampler):
    """Low strength keeps the picture: the result is nearer the picture's latent than a strength-1 result is."""
    image = picture(5)
    low, sampled = final_latents(loaded, ImageToImage(image, 0.3), tmp_path / "low", monkeypatch, sampler=sampler)
    high, _ = final_latents(loaded, ImageToImage(image, 1.0), tmp_path / "high", monkeypatch, sampler=sampler)
    assert sampled[0]["skip_steps"] == STEPS - 3
    target = loaded.model.scale_factor * loaded.model.encode_first_stage(image).mean
    assert (low[0] - target).norm() < 0.5 * (high[0] - target).norm()


def test_fixed_code_repeats_the_first_batchs_draws(loaded, tmp_path, monkeypatch):
    _, sampled = final_latents(loaded, ImageToImage(picture(6), 0.5), tmp_path, monkeypatch, n_iter=3, fixed_code=True)
    assert len(sampled) == 3 and torch.equal(sampled[0]["x"], sampled[2]["x"])
    _, unfixed = final_latents(loaded, ImageToImage(picture(6), 0.5), tmp_path / "b", monkeypatch, n_iter=2)
    assert not torch.equal(unfixed[0]["x"], unfixed[1]["x"])


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan")])
def test_strength_outside_zero_to_one_is_refused(strength):
    with pytest.raises(UserError, match="outside"):
        check_strength(strength)
