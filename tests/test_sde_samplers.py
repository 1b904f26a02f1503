"""The SDE samplers (DPM++ SDE, 2M SDE, 3M SDE) and their Brownian-tree noise.

The tree is compared with torchsde's BrownianTree (what k-diffusion, A1111 and ComfyUI use) value for value;
the samplers with k-diffusion's functions of the same name given our Brownian noise as their noise_sampler.
"""
import random
import warnings

import numpy as np
import pytest
import torch

from helpers import SD_ALPHAS_CUMPROD, GaussianVEDenoiser, NoiseFrom, karras_grid, relative_error
from ldm.models.diffusion import samplers
from ldm.models.diffusion.brownian import BrownianNoise, BrownianTree, brownian_noise_for, brownian_seeds
from ldm.models.diffusion.k_sampling import ModelSigmas, SigmaDenoiser
from ldm.models.diffusion.sampling import GuidedDenoiser

SDE_SAMPLERS = [key for key, info in samplers.REGISTRY.items() if info.brownian_noise]
SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642


@pytest.fixture(scope="module")
def torchsde():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torchsde", reason="torchsde is not installed: the test extra has it")


def query_pairs(seed, count=25):
    """Random (ta, tb) pairs over a few fixed points, the range's ends included, in a random order."""
    rng = random.Random(seed)
    points = sorted(rng.uniform(SIGMA_MIN, SIGMA_MAX) for _ in range(10)) + [SIGMA_MIN, SIGMA_MAX]
    return [tuple(sorted(rng.sample(points, 2))) for _ in range(count)]


# --- the tree --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7, 123456789, 2**32 - 1, 2**63 - 2])
@pytest.mark.parametrize("shape", [(3,), (2, 4, 5), (1, 4, 8, 8)])
def test_brownian_tree_gives_torchsdes_values(torchsde, seed, shape):
    theirs = torchsde.BrownianTree(SIGMA_MIN, torch.zeros(shape), SIGMA_MAX, entropy=seed)
    ours = BrownianTree(SIGMA_MIN, SIGMA_MAX, shape, seed)
    for ta, tb in query_pairs(seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs(ta, tb)
        assert torch.equal(ours.increment(ta, tb), expected), (ta, tb)


def test_the_path_does_not_depend_on_the_order_or_number_of_queries():
    first, second = BrownianTree(SIGMA_MIN, SIGMA_MAX, (4, 3), 5), BrownianTree(SIGMA_MIN, SIGMA_MAX, (4, 3), 5)
    pairs = query_pairs(1)
    forward = [first.increment(ta, tb) for ta, tb in pairs]
    second.increment(1.0, 2.0)
    backward = [second.increment(ta, tb) for ta, tb in reversed(pairs)][::-1]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(forward, backward))
    whole = first.increment(1.0, 3.0)
    assert torch.allclose(whole, first.increment(1.0, 2.0) + first.increment(2.0, 3.0), atol=1e-5)


def test_brownian_increments_have_the_variance_of_their_length():
    tree = BrownianTree(SIGMA_MIN, SIGMA_MAX, (200_000,), 11)
    for ta, tb in [(0.5, 0.6), (2.0, 9.0), (SIGMA_MIN, SIGMA_MAX)]:
        increment = tree.increment(ta, tb).double()
        assert abs(float(increment.mean())) < 5 * (tb - ta) ** 0.5 / 200_000 ** 0.5
        assert float(increment.var()) == pytest.approx(tb - ta, rel=0.02)


def test_noise_equals_k_diffusions_brownian_tree_noise_sampler(kdiffusion, torchsde, monkeypatch):
    sampling = kdiffusion[0]
    monkeypatch.setattr(sampling, "torchsde", torchsde)  # the fixture loads it with a stand-in
    x = torch.zeros(2, 4, 6, 6)
    sigmas = karras_grid(10).float()
    for seeds in ([3, 4], 9):
        theirs = sampling.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=seeds)
        ours = BrownianNoise(x.shape, float(sigmas[-2]), float(sigmas[0]), seeds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):
                assert torch.equal(ours(float(sigma), float(sigma_next)), theirs(sigma, sigma_next))


def test_a_seed_list_gives_each_image_the_noise_of_its_seed_alone():
    batch = BrownianNoise((3, 4, 5, 5), SIGMA_MIN, SIGMA_MAX, [10, 11, 12])
    alone = BrownianNoise((1, 4, 5, 5), SIGMA_MIN, SIGMA_MAX, [11])
    assert torch.equal(batch(5.0, 3.0)[1:2], alone(5.0, 3.0))
    assert not torch.equal(batch(5.0, 3.0)[0], batch(5.0, 3.0)[1])
    one_tree = BrownianNoise((3, 4, 5, 5), SIGMA_MIN, SIGMA_MAX, 11)
    assert one_tree(5.0, 3.0).shape == (3, 4, 5, 5)


def test_brownian_seeds_come_from_the_source_or_its_draws():
    class ListSource(NoiseFrom):
        def brownian_seeds(self, batch_size):
            return [100 + k for k in range(batch_size)]

    assert brownian_seeds(ListSource(0), 3) == [100, 101, 102]
    drawn = brownian_seeds(NoiseFrom(5), 2)
    assert isinstance(drawn, int) and 0 <= drawn < 2**63
    assert drawn == brownian_seeds(NoiseFrom(5), 2) != brownian_seeds(NoiseFrom(6), 2)
    grid = karras_grid(6)
    noise = brownian_noise_for(ListSource(0), (2, 4, 3, 3), grid)
    assert [tree.seed for tree in noise.trees] == [100, 101]
    assert noise.trees[0].root.start == round(float(grid[-2].float()), 6)
    assert noise.trees[0].root.end == round(float(grid[0].float()), 6)


# --- the samplers against k-diffusion --------------------------------------------------------------------------
def test_the_registry_has_a1111s_sde_samplers_and_defaults():
    assert {key: (info.display_name, info.default_schedule) for key, info in samplers.REGISTRY.items()
            if key in SDE_SAMPLERS} == {"dpmpp_sde": ("DPM++ SDE", "karras"),
                                        "dpmpp_2m_sde": ("DPM++ 2M SDE", "exponential"),
                                        "dpmpp_3m_sde": ("DPM++ 3M SDE", "exponential")}
    assert samplers.REGISTRY["dpmpp_3m_sde"].discard_next_to_last_sigma
    for spelling, key in [("k_dpmpp_sde", "dpmpp_sde"), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde"),
                          ("dpmpp_3m_sde", "dpmpp_3m_sde"), ("K_DPMPP_2M_SDE", "dpmpp_2m_sde")]:
        assert samplers.resolve_sampler(spelling)[0] == key


def run_both(kd_sampling, name, ours_model, theirs_model, x, sigmas, seeds, eta=1.0, **extra):
    info = samplers.REGISTRY[name]
    noise = BrownianNoise(x.shape, float(sigmas[sigmas > 0].min()), float(sigmas.max()), seeds)
    ours = info.function(ours_model, x, sigmas, noise=noise, eta=eta)
    with torch.no_grad():
        theirs = getattr(kd_sampling, info.function.__name__)(theirs_model, x, sigmas.float(), disable=True,
                                                            noise_sampler=noise, eta=eta, **extra)
    return ours, theirs


@pytest.mark.parametrize("name", SDE_SAMPLERS)
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_each_sde_sampler_equals_k_diffusion_on_an_analytic_denoiser(kdiffusion, name, eta):
    denoiser = GaussianVEDenoiser()
    sigmas = karras_grid(12)
    x = denoiser.at(float(sigmas[0])).float()
    ours, theirs = run_both(kdiffusion[0], name, denoiser, denoiser, x, sigmas, 21, eta=eta)
    assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_each_sde_sampler_equals_k_diffusion_on_the_tiny_model(kdiffusion, tiny, name):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = torch.randn(2, 77, 32, generator=generator)
    ours_model = SigmaDenoiser(GuidedDenoiser(tiny, cond, dtype=torch.float32, device="cpu"))
    theirs_model = kdiffusion[1].CompVisDenoiser(tiny)
    sigmas = samplers.sigma_grid(name, "automatic", 6, ours_model)
    ours, theirs = run_both(kdiffusion[0], name, ours_model, theirs_model, x * float(sigmas[0]), sigmas, [4, 5],
                            extra_args={"cond": cond})
    assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_sde_samplers_converge_at_their_order_without_noise(name):
    """At eta 0 each is its ODE solver (DPM-Solver++ 2S, 2M, 3M), on the exact Gaussian denoiser."""
    denoiser, model_sigmas = GaussianVEDenoiser(), ModelSigmas(torch.tensor(SD_ALPHAS_CUMPROD))
    step_counts, errors = [25, 50, 100], []
    for steps in step_counts:
        sigmas = samplers.schedule_sigmas("exponential", steps, model_sigmas)[:-1]
        result = samplers.REGISTRY[name].function(denoiser, denoiser.at(float(sigmas[0])), sigmas, noise=None, eta=0.0)
        errors.append(relative_error(result, denoiser.at(float(sigmas[-1]))))
    order = -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    expected = samplers.REGISTRY[name].order
    assert errors[0] > errors[1] > errors[2]
    assert 0.8 * expected < order < expected + 0.5, (order, errors)


# --- through samplers.sample -------------------------------------------------------------------------------------
class SeededImages(NoiseFrom):
    """A per-image source as the run's: Brownian trees seeded with the images' seeds."""

    def __init__(self, seeds):
        super().__init__(seeds[0])
        self.seeds = seeds

    def brownian_seeds(self, batch_size):
        return self.seeds[:batch_size]


def sample_sde(name, model, x, cond, steps, seeds):
    denoiser = GuidedDenoiser(model, cond, dtype=torch.float32, device="cpu")
    return samplers.sample(name, denoiser, x, steps, noise_source=SeededImages(seeds))


@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_an_image_of_a_batch_equals_its_seed_alone(tiny, name):
    generator = torch.Generator().manual_seed(8)
    x, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    batch = sample_sde(name, tiny, x, cond, 5, [30, 31])
    alone = sample_sde(name, tiny, x[1:], cond[1:], 5, [31])
    assert relative_error(batch[1:], alone) < 1e-5
    assert relative_error(batch[1:], sample_sde(name, tiny, x[1:], cond[1:], 5, [32])) > 1e-3
    assert torch.isfinite(sample_sde(name, tiny, x, cond, 1, [30, 31])).all()  # one step: a tree over one sigma


@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_one_more_step_changes_the_image_much_less_than_another_seed(name):
    """The Brownian path is the seed's, whatever the grid: 20 and 21 steps see nearly the same noise."""
    denoiser = GaussianVEDenoiser()
    model_sigmas = ModelSigmas(torch.tensor(SD_ALPHAS_CUMPROD))
    results = {}
    for steps, seed in [(20, 1), (21, 1), (20, 2)]:
        sigmas = samplers.sigma_grid(name, "automatic", steps, model_sigmas)
        x = denoiser.at(float(sigmas[0])).float()
        noise = BrownianNoise(x.shape, float(sigmas[sigmas > 0].min()), float(sigmas.max()), seed)
        results[steps, seed] = samplers.REGISTRY[name].function(denoiser, x, sigmas, noise=noise)
    step_change = relative_error(results[20, 1], results[21, 1])
    seed_change = relative_error(results[20, 1], results[20, 2])
    assert step_change < 0.3 * seed_change, (step_change, seed_change)


def test_nv_rng_gives_the_trees_cudas_numbers_for_their_seeds():
    """k-diffusion builds the trees on the latents' device: on an NVIDIA GPU torchsde's draws are CUDA's."""
    from ldm.generate.rng import ImageNoise, NvRandom

    shape, sigmas = (2, 4, 8, 8), karras_grid(6)
    cpu_noise = brownian_noise_for(ImageNoise("cpu", [5, 6]), shape, sigmas)
    nv_noise = brownian_noise_for(ImageNoise("nv", [5, 6]), shape, sigmas)
    expected = BrownianNoise(shape, float(sigmas[-2]), float(sigmas[0]), [5, 6], NvRandom.seeded_normal)
    step = (float(sigmas[1]), float(sigmas[2]))
    assert torch.equal(nv_noise(*step), expected(*step))
    assert not torch.equal(nv_noise(*step), cpu_noise(*step))
    assert torch.equal(NvRandom.seeded_normal((3,), 9), NvRandom(9).randn([3]))
