"""Parity of the k-diffusion family with the k-diffusion package on a full-size SD 1.x UNet (slow).

The tiny model's parity (tests/test_k_samplers.py) holds within 1e-5; here the same comparison runs through
the full-size network, with seeded random weights, at a small latent: each deterministic and ancestral
registered k-sampler against k-diffusion's function of the same name around k-diffusion's own
CompVisDenoiser of the same model, the same sigmas and the same noise. Run with `pytest -m slow`.
"""
import pytest
import torch

from helpers import K_DIFFUSION_SAMPLERS, build_full_size_random, relative_error, run_ours, run_theirs
from ldm.models.diffusion import samplers
from ldm.models.diffusion.k_sampling import SigmaDenoiser
from ldm.models.diffusion.sampling import GuidedDenoiser

# Brownian-tree (SDE) and adaptive samplers have their own parity tests on the tiny model
STEPPED_K_SAMPLERS = [name for name in K_DIFFUSION_SAMPLERS
                      if not samplers.REGISTRY[name].brownian_noise and not samplers.REGISTRY[name].adaptive]


@pytest.fixture(scope="module")
def full_size():
    """(the model, its text conditioning): SD 1.x with a seeded random UNet, and one random prompt embedding."""
    model = build_full_size_random("v1-inference.yaml", seed=1)
    return model, torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))


@pytest.mark.slow
def test_every_stepped_k_sampler_equals_k_diffusion_on_a_full_size_unet(kdiffusion, full_size):
    model, cond = full_size
    ours_model = SigmaDenoiser(GuidedDenoiser(model, cond, dtype=torch.float32, device="cpu"))
    theirs_model = kdiffusion[1].CompVisDenoiser(model)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    errors = {}
    with torch.inference_mode():
        for name in STEPPED_K_SAMPLERS:
            sigmas = samplers.sigma_grid(name, "karras", 3, ours_model)
            ours = run_ours(name, ours_model, x * float(sigmas[0]), sigmas)
            theirs = run_theirs(kdiffusion[0], name, theirs_model, x * float(sigmas[0]), sigmas.float(),
                                extra_args={"cond": cond})
            errors[name] = relative_error(ours, theirs)
    assert {"euler", "euler_a", "heun", "lms", "dpm_2", "dpm_2_a", "dpmpp_2s_a", "dpmpp_2m"} <= set(errors)
    assert all(error < 1e-4 for error in errors.values()), errors
