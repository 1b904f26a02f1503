"""Seeds users can share (A1111's convention): image k of a run has seed + k and its own generator, variation
seeds, seed resize, ENSD, seed -1, and batch mode keeping the originals' one generator."""
import pytest
import torch
from PIL import Image

from ldm.generate import options
from ldm.generate.errors import UserError
from ldm.generate.output import OutputFolder
from ldm.generate.rng import CpuRandom, ImageNoise, NvRandom, RunSeeds, noise_source, paste_centred, slerp
from ldm.generate.run import job_fields
from ldm.generate.txt2img import Txt2ImgJob, run_txt2img
from ldm.models.diffusion import samplers
from helpers import loaded_tiny, txt2img
from tiny_model import write_tiny_checkpoint

LATENT = [4, 8, 6]  # one image's latent at 64x48


@pytest.fixture(scope="module")
def loaded():
    return loaded_tiny()


def sampled(job, loaded, tmp_path, monkeypatch):
    """Run `job`; return [(start x, sampled latents, kwargs, denoiser)] per batch and the run's report."""
    seen, real_sample = [], samplers.sample

    def spy(name, denoiser, x, steps, **kwargs):
        result = real_sample(name, denoiser, x, steps, **kwargs)
        seen.append((x.clone(), result.clone(), kwargs, denoiser))
        return result

    monkeypatch.setattr("ldm.generate.run.sample", spy)
    report = run_txt2img(job, loaded, OutputFolder(tmp_path), log=lambda _: None)
    return seen, report


def job(**fields):
    base = dict(batches=[["a", "a", "a"]], steps=2, height=64, width=48, seed=7, sampler="euler_a", save_grid=False)
    return Txt2ImgJob(**{**base, **fields})


def parameters(path) -> str:
    return Image.open(path).text["parameters"]


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_image_k_of_a_batch_is_the_run_of_seed_plus_k_alone(loaded, tmp_path, monkeypatch, rng):
    batch, report = sampled(job(rng=rng, n_iter=2, batches=[["a", "a"]]), loaded, tmp_path / "batch", monkeypatch)
    alone, alone_report = sampled(job(rng=rng, seed=10, batches=[["a"]]), loaded, tmp_path / "alone", monkeypatch)
    # image 3 of the run is the second image of the second batch: seed 7 + 3
    assert torch.equal(batch[1][0][1], alone[0][0][0])
    # its ancestral noise too, from its own generator (a batch of two computes the UNet in another float order)
    assert torch.allclose(batch[1][1][1], alone[0][1][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(batch[0][0][0], noise_source(rng, 7).randn(LATENT))
    assert [f"Seed: {seed}," in parameters(path) for path, seed in zip(report.saved, (7, 8, 9, 10))] == [True] * 4
    assert "Seed mode" not in parameters(report.saved[0])


def test_batch_mode_keeps_one_generator_for_the_run_in_the_originals_order(loaded, tmp_path, monkeypatch):
    seen, report = sampled(job(seed_mode="batch", seed=42, batches=[["a", "a"], ["b"]]), loaded, tmp_path, monkeypatch)
    source = CpuRandom(42)  # today's SeededNoise: one source, start noise then the sampler's draws, batch after batch
    for start, result, kwargs, denoiser in seen:
        x = source.randn(start.shape)
        assert torch.equal(start, x)
        reference = samplers.sample("euler_a", denoiser, x, 2, **{**kwargs, "noise_source": source, "callback": None})
        assert torch.allclose(result, reference, atol=1e-6)
    assert all(f"Seed: 42," in parameters(path) and "Seed mode: batch" in parameters(path) for path in report.saved)


def test_seed_minus_one_picks_a_real_seed_and_writes_it(loaded, tmp_path, monkeypatch):
    lines = []
    report = run_txt2img(job(seed=-1, sampler="euler", batches=[["a", "a"]]), loaded, OutputFolder(tmp_path),
                         log=lines.append)
    first = int(parameters(report.saved[0]).split("Seed: ")[1].split(",")[0])
    assert 0 <= first < 4294967294
    assert f"Seed: {first + 1}," in parameters(report.saved[1])
    assert any(f"random seed {first}" in line for line in lines)


def test_variation_strength_0_and_1_give_the_two_seeds_noises():
    seed_noise, sub_noise = CpuRandom(3).randn(LATENT), CpuRandom(99).randn(LATENT)
    assert torch.equal(slerp(0.0, seed_noise, sub_noise), seed_noise)
    assert torch.equal(slerp(1.0, seed_noise, sub_noise), sub_noise)
    halfway = slerp(0.5, seed_noise, sub_noise)
    assert not torch.allclose(halfway, seed_noise) and not torch.allclose(halfway, sub_noise)
    # A1111's near-parallel fallback mixes them the other way round: low·strength + high·(1 - strength)
    assert torch.equal(slerp(0.25, seed_noise, seed_noise * 1.0000001), seed_noise * 0.25 + seed_noise * 1.0000001 * 0.75)


def test_variation_seeds_count_up_and_every_image_keeps_the_seed():
    seeds = RunSeeds.resolve(5, 100, 1.0)
    noise = seeds.images("cpu", 2, 2).first([2, *LATENT])
    assert torch.equal(noise[0], CpuRandom(102).randn(LATENT)) and torch.equal(noise[1], CpuRandom(103).randn(LATENT))
    assert [seeds.image_seed(k) for k in range(3)] == [5, 5, 5] and seeds.image_subseed(2) == 102
    assert RunSeeds.resolve(5, 100, 0.0).image_seed(2) == 7 and RunSeeds.resolve(5, 100, 0.0).subseed is None


@pytest.mark.parametrize("source", [CpuRandom, NvRandom])
def test_seed_resize_pastes_the_noise_made_at_the_old_size_at_the_centre(source):
    rng = "cpu" if source is CpuRandom else "nv"
    smaller = ImageNoise(rng, [11], resize_from=(4, 2)).first([1, 4, 8, 6])[0]
    made, full = source(11).randn([4, 4, 2]), source(11).randn([4, 8, 6])
    assert torch.equal(smaller[:, 2:6, 2:4], made)
    outside = torch.ones(8, 6, dtype=torch.bool)
    outside[2:6, 2:4] = False
    assert torch.equal(smaller[:, outside], full[:, outside])
    larger = ImageNoise(rng, [11], resize_from=(12, 10)).first([1, 4, 8, 6])[0]
    assert torch.equal(larger, source(11).randn([4, 12, 10])[:, 2:10, 2:8])
    assert torch.equal(paste_centred(torch.zeros(1, 2, 2), torch.ones(1, 4, 4)).sum(), torch.tensor(12.0))


def test_ensd_reseeds_the_sampler_noise_only():
    images = ImageNoise("cpu", [4, 5], ensd=31337)
    start = images.first([2, *LATENT])
    assert torch.equal(start[1], CpuRandom(5).randn(LATENT))
    later = images.randn([2, *LATENT])
    assert torch.equal(later[0], CpuRandom(4 + 31337).randn(LATENT))
    assert images.brownian_seeds(2) == [4, 5]  # A1111's Brownian trees take the seeds, not seed + ENSD


def test_ensd_changes_euler_a_but_not_euler(loaded, tmp_path, monkeypatch):
    def final(sampler, ensd, name):
        seen, report = sampled(job(sampler=sampler, ensd=ensd, batches=[["a"]]), loaded, tmp_path / name, monkeypatch)
        return seen[0][1], parameters(report.saved[0])

    euler_a, text_a = final("euler_a", 31337, "a1")
    assert not torch.allclose(euler_a, final("euler_a", 0, "a0")[0]) and "ENSD: 31337" in text_a
    euler, text = final("euler", 31337, "e1")
    assert torch.equal(euler, final("euler", 0, "e0")[0]) and "ENSD" not in text


def test_brownian_seeds_in_batch_mode_are_one_int_from_the_run_generator():
    assert CpuRandom(1).brownian_seeds(3) == CpuRandom(1).brownian_seeds(3) != CpuRandom(2).brownian_seeds(3)
    nv = NvRandom(1)
    first, second = nv.brownian_seeds(3), nv.brownian_seeds(3)
    assert isinstance(first, int) and 0 <= first < 2**63 and first != second and nv.offset == 2


def test_infotext_fields_in_a1111_order(loaded):
    asked = job(subseed=9, subseed_strength=0.5, seed_resize_from=(64, 32), ensd=31337, rng="nv")
    fields = job_fields(asked, loaded, 3, 1, {"Denoising strength": 0.75}, seed=7, subseed=10)
    order = [key for key in fields if key in ("Seed", "Size", "Model", "Variation seed", "Variation seed strength",
                                              "Seed resize from", "Denoising strength", "ENSD", "RNG", "Version")]
    assert order == ["Seed", "Size", "Model", "Variation seed", "Variation seed strength", "Seed resize from",
                     "Denoising strength", "ENSD", "RNG", "Version"]
    assert (fields["Seed"], fields["Variation seed"], fields["Seed resize from"]) == (7, 10, "32x64")


def parsed(*argv):
    parser = options.OneLineParser()
    options.add_sampling_arguments(parser)
    options.add_output_arguments(parser, "out")
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv, problem", [
    (["--seed_mode", "batch", "--ensd", "1"], "--ensd work on each image's own generator"),
    (["--seed_mode", "batch", "--subseed_strength", "0.5"], "--subseed_strength work on"),
    (["--subseed", "4"], "--subseed 4 has no effect at --subseed_strength 0"),
    (["--subseed_strength", "1.5"], "outside [0, 1]"),
    (["--seed_resize_from_h", "64"], "go together"),
    (["--seed_resize_from_h", "60", "--seed_resize_from_w", "64"], "not a positive multiple of 8"),
    (["--seed", "-2"], "--seed -2 is outside"),
    (["--ensd", "-1"], "--ensd must be 0 or more"),
])
def test_seed_options_that_cannot_apply_are_refused(argv, problem):
    with pytest.raises(UserError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        options.check_sampling_arguments(parsed(*argv))


def test_seeds_past_64_bits_are_refused_before_loading():
    args = parsed("--seed", str(2**64 - 2), "--n_samples", "3", "--n_iter", "1")
    with pytest.raises(UserError, match="too large for 3 images"):
        options.check_seed_range(args, 3)
    options.check_seed_range(parsed("--seed", str(2**64 - 3)), 3)


def test_cli_seed_minus_one_names_each_image_its_seed(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model")
    result = txt2img("--ckpt", ckpt, "--outdir", tmp_path / "out", "--seed", "-1", "--n_samples", "2", "--n_iter", "1",
                     "--ddim_steps", "2", "--H", "64", "--W", "64", "--skip_grid")
    assert result.returncode == 0, result.stderr
    texts = [parameters(path) for path in sorted((tmp_path / "out" / "samples").glob("*.png"))]
    first = int(texts[0].split("Seed: ")[1].split(",")[0])
    assert f"Seed: {first + 1}," in texts[1] and f"random seed {first}" in result.stdout
