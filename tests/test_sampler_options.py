"""A1111's sampler parameters (--eta, --s_churn, --s_tmin, --s_tmax, --s_noise, --sigma_quantization): parsing,
refusal where the sampler does not use them, pass-through by signature, the infotext; and
scripts/evaluate_adherence.py over the whole registry."""
import argparse
import functools
import math

import pytest
import torch

from conftest import REPO
from helpers import NoiseFrom, loaded_tiny, relative_error, txt2img
from ldm.generate import options as cli
from ldm.generate import run as run_module
from ldm.generate.errors import UserError
from ldm.generate.infotext import parse_parameters
from ldm.generate.output import OutputFolder
from ldm.generate.txt2img import TextToImage
from ldm.models.diffusion import samplers
from ldm.models.diffusion.sampler_options import SamplerOptions
from ldm.models.diffusion.sampling import GuidedDenoiser
from tiny_model import write_tiny_checkpoint


def parsed(*argv):
    parser = argparse.ArgumentParser()
    cli.add_sampling_arguments(parser)
    cli.add_output_arguments(parser, "out")
    return parser.parse_args([str(a) for a in argv])


# --- parsing ---------------------------------------------------------------------------------------------------
def test_defaults_are_a1111s_and_values_reach_the_job():
    args = parsed()
    cli.check_sampling_arguments(args)
    assert cli.sampler_options_from_args(args) == SamplerOptions(eta=1.0, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                                                                 s_noise=1.0)
    args = parsed("--sampler", "euler", "--s_churn", 0.5, "--s_tmin", 0.2, "--s_tmax", 0, "--s_noise", 0.9,
                  "--sigma_quantization")
    cli.check_sampling_arguments(args)
    job = cli.job_from_args(args, "euler", [["a"]], 64, 64)
    assert job.sampler_options == SamplerOptions(eta=1.0, s_churn=0.5, s_tmin=0.2, s_tmax=math.inf, s_noise=0.9)
    assert job.quantize and job.eta == 0.0  # s_tmax 0 is infinity, as in A1111; DDIM's eta untouched
    job = cli.job_from_args(parsed("--sampler", "euler a", "--eta", 0.25), "euler_a", [["a"]], 64, 64)
    assert job.sampler_options.eta == 0.25 and job.eta == 0.0


# --- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (("--sampler", "euler a", "--s_churn", 0.5), "Euler a does not use --s_churn (only Euler, Heun, DPM2 do)"),
    (("--eta", 0.3), "DDIM does not use --eta"),
    (("--eta", 0.3), "DDIM's eta is --ddim_eta"),
    (("--sampler", "dpmpp_2m", "--s_noise", 0.5), "DPM++ 2M does not use --s_noise"),
    (("--sampler", "heun", "--eta", 0), "Heun does not use --eta"),
    (("--sampler", "plms", "--sigma_quantization"), "--sigma_quantization applies to the k-diffusion samplers"),
    (("--sampler", "euler", "--s_churn", "nan"), "--s_churn must be a finite number, 0 or more"),
    (("--sampler", "euler a", "--eta", -1), "--eta must be a finite number, 0 or more"),
    (("--sampler", "euler", "--s_noise", "inf"), "--s_noise must be a finite number"),
    (("--sampler", "euler", "--s_tmin", 2, "--s_tmax", 1), "--s_tmax 1.0 is below --s_tmin 2.0"),
])
def test_options_a_sampler_does_not_use_or_out_of_range_are_refused(argv, message):
    with pytest.raises(UserError) as error:
        cli.check_sampling_arguments(parsed(*argv))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_options_at_their_defaults_are_accepted_by_every_sampler():
    for name in samplers.REGISTRY:
        cli.check_sampling_arguments(parsed("--sampler", name, "--eta", 1, "--s_churn", 0, "--s_noise", 1))


def test_the_cli_refuses_in_one_line_before_loading_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = txt2img("--ckpt", tmp_path / "nowhere.ckpt", "--outdir", out, "--sampler", "DPM++ 2M Karras",
                     "--eta", 0.5)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "DPM++ 2M does not use --eta" in lines[0]  # not "checkpoint not found": refused before loading
    assert list(tmp_path.iterdir()) == []


# --- pass-through by signature --------------------------------------------------------------------------------------
@pytest.fixture
def denoiser_and_start(tiny):
    generator = torch.Generator().manual_seed(4)
    x, cond = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    return GuidedDenoiser(tiny, cond, dtype=torch.float32, device="cpu"), x


def spy_on(monkeypatch, name):
    """Replace `name`'s function by a spy with its signature; returns the keyword arguments of each call."""
    info, calls = samplers.REGISTRY[name], []

    @functools.wraps(info.function)
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return info.function(*args, **kwargs)

    monkeypatch.setitem(samplers.REGISTRY, name, samplers.SamplerInfo(**{**info.__dict__, "function": spy}))
    return calls


@pytest.mark.parametrize("name,options,expected", [
    ("euler_a", SamplerOptions(), {"eta": 1.0, "s_noise": 1.0}),
    ("euler_a", SamplerOptions(eta=0.4, s_noise=0.8), {"eta": 0.4, "s_noise": 0.8}),
    ("euler", SamplerOptions(s_churn=0.7, s_tmin=0.1, s_tmax=9.0),
     {"s_churn": 0.7, "s_tmin": 0.1, "s_tmax": 9.0, "s_noise": 1.0}),
    ("dpmpp_2m", SamplerOptions(), {}),
])
def test_sample_passes_each_option_the_function_takes_and_no_other(monkeypatch, denoiser_and_start, name, options,
                                                                   expected):
    calls = spy_on(monkeypatch, name)
    denoiser, x = denoiser_and_start
    samplers.sample(name, denoiser, x, 3, noise_source=NoiseFrom(1), sampler_options=options)
    passed = {key: value for key, value in calls[0].items() if key in SamplerOptions.__dataclass_fields__}
    assert passed == expected


def test_sample_refuses_a_changed_option_the_sampler_does_not_take(denoiser_and_start):
    denoiser, x = denoiser_and_start
    with pytest.raises(ValueError, match="Euler a does not use s_churn"):
        samplers.sample("euler_a", denoiser, x, 3, noise_source=NoiseFrom(1), sampler_options=SamplerOptions(s_churn=1))
    with pytest.raises(ValueError, match="DDIM does not use eta"):
        samplers.sample("ddim", denoiser, x, 3, sampler_options=SamplerOptions(eta=0.0))
    with pytest.raises(ValueError, match="sigma_quantization applies to the k-diffusion samplers"):
        samplers.sample("ddim", denoiser, x, 3, quantize=True)


def test_the_options_change_the_samples_as_they_should(denoiser_and_start):
    denoiser, x = denoiser_and_start

    def run(name, seed=1, **kwargs):
        return samplers.sample(name, denoiser, x, 4, noise_source=NoiseFrom(seed), **kwargs)

    euler = run("euler")
    assert torch.equal(run("euler_a", sampler_options=SamplerOptions(eta=0.0)), euler)  # no fresh noise: Euler's steps
    assert relative_error(run("euler_a"), euler) > 1e-3
    churned = run("euler", sampler_options=SamplerOptions(s_churn=2.0))
    assert relative_error(churned, euler) > 1e-3
    assert relative_error(churned, run("euler", seed=2, sampler_options=SamplerOptions(s_churn=2.0))) > 1e-4
    assert torch.equal(run("euler", sampler_options=SamplerOptions(s_churn=2.0, s_tmin=100.0)), euler)  # out of range
    assert torch.equal(run("euler", sampler_options=SamplerOptions(s_churn=2.0, s_noise=0.0)),
                       run("euler", seed=2, sampler_options=SamplerOptions(s_churn=2.0, s_noise=0.0)))
    karras = run("euler", schedule="karras")  # uniform's sigmas sit on whole timesteps: quantizing changes nothing
    assert 0 < relative_error(run("euler", schedule="karras", quantize=True), karras) < 0.1


def test_the_run_hands_the_jobs_options_to_the_sampler(monkeypatch, tmp_path):
    seen = []
    real_sample = run_module.sample

    def sample_spy(*args, **kwargs):
        seen.append(kwargs)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(run_module, "sample", sample_spy)
    options = SamplerOptions(eta=0.5, s_noise=0.7)
    job = run_module.Job(batches=[["a"]], steps=3, sampler="euler_a", sampler_options=options, quantize=True,
                         height=32, width=32, save_grid=False, watermark=False)
    run_module.run(job, TextToImage(), loaded_tiny(), OutputFolder(tmp_path / "out"), log=lambda _: None)
    assert seen[0]["sampler_options"] == options and seen[0]["quantize"] is True


# --- the infotext -----------------------------------------------------------------------------------------------
def fields_of(**job):
    job = run_module.Job(batches=[["a"]], **job)
    return run_module.job_fields(job, loaded_tiny(), 1, 0)


def test_infotext_names_the_changed_options_the_sampler_takes_as_a1111():
    assert "Eta" not in fields_of(sampler="euler_a")  # at A1111's default
    fields = fields_of(sampler="euler_a", sampler_options=SamplerOptions(eta=0.5, s_noise=0.9))
    assert (fields["Eta"], fields["Sigma noise"]) == (0.5, 0.9)
    assert list(fields).index("Eta") < list(fields).index("Sigma noise")
    fields = fields_of(sampler="euler", sampler_options=SamplerOptions(s_churn=1.0, s_tmin=0.5, s_tmax=10.0))
    assert [key for key in fields if key.startswith("Sigma")] == ["Sigma churn", "Sigma tmin", "Sigma tmax"]
    fields = fields_of(sampler="ddim", eta=0.5)
    assert fields["Eta DDIM"] == 0.5 and "Eta" not in fields  # A1111 keeps DDIM's eta apart


def test_txt2img_writes_the_options_and_they_read_back(tmp_path):
    from PIL import Image

    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    result = txt2img("--ckpt", ckpt, "--outdir", out, "--ddim_steps", 3, "--H", 64, "--W", 64, "--n_samples", 1,
                     "--n_iter", 1, "--sampler", "heun", "--s_churn", 1, "--s_tmin", 0.5, "--s_noise", 0.9,
                     "--skip_grid")
    assert result.returncode == 0, result.stderr
    with Image.open(out / "samples" / "00000.png") as image:
        text = image.text["parameters"]
    assert "Sigma churn: 1.0, Sigma tmin: 0.5, Sigma noise: 0.9" in text
    _, _, fields = parse_parameters(text)
    assert (fields["Sigma churn"], fields["Sigma tmin"], fields["Sigma noise"]) == ("1.0", "0.5", "0.9")


# --- scripts/evaluate_adherence.py over the registry ---------------------------------------------------------------
def adherence_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_adherence", REPO / "scripts" / "evaluate_adherence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,schedule,steps,calls", [
    ("heun", "automatic", 3, 5), ("dpmpp_2m", "karras", 3, 3), ("ddim", "automatic", 3, 3),
])
def test_adherence_samples_with_any_registered_sampler_and_counts_its_model_calls(tiny, name, schedule, steps, calls):
    from ldm.training import sample_images

    evaluate = adherence_module()
    with evaluate.ModelCalls(tiny.model) as counted:
        images = sample_images(tiny, ["a", "b"], steps, 5.0, seed=3, sampler=name, schedule=schedule)
    assert counted.count == calls  # heun: two a step, but none at sigma 0
    assert images.shape[0] == 2 and torch.isfinite(images).all()


@pytest.mark.parametrize("argv,message", [
    (["--sampler", "euler_magic"], "--sampler: invalid choice 'euler_magic'"),
    (["--sampler", "ddim", "--schedule", "karras"], "--schedule applies to the k-diffusion samplers"),
    (["--sampler", "DPM++ 2M Karras", "--schedule", "uniform"], "names the karras schedule"),
])
def test_adherence_refuses_unknown_samplers_and_schedules(argv, message):
    evaluate = adherence_module()
    options = evaluate.parse_args(["--seen", "1", *argv])
    with pytest.raises(UserError, match=message):
        evaluate.check_options(options)


def test_adherence_resolves_names_as_the_scripts_do():
    evaluate = adherence_module()
    options = evaluate.parse_args(["--sampler", "dpm++ 2m karras"])
    evaluate.check_options(options)
    assert (options.sampler, options.schedule) == ("dpmpp_2m", "karras")
    assert evaluate.sampler_label(options) == "DPM++ 2M, Schedule type: Karras"
