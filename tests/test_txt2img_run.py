"""The txt2img run as a library: seeds, start noise, bad images."""
import torch

from ldm.generate.output import OutputFolder
from ldm.generate.txt2img import Txt2ImgJob, run_txt2img
from ldm.models.diffusion import samplers
from helpers import loaded_tiny


def test_seed_means_one_cpu_generator_drawing_start_noise_per_batch(tmp_path, monkeypatch):
    seen = []
    real_sample = samplers.sample  # what the run calls

    def spy(name, denoiser, x, steps, **kwargs):
        seen.append(x.clone())
        return real_sample(name, denoiser, x, steps, **kwargs)

    monkeypatch.setattr("ldm.generate.run.sample", spy)
    job = Txt2ImgJob(batches=[["a"], ["b"]], n_iter=1, steps=2, height=64, width=48, seed=42, seed_mode="batch",
                     save_grid=False)
    run_txt2img(job, loaded_tiny(), OutputFolder(tmp_path), log=lambda _: None)
    generator = torch.Generator().manual_seed(42)
    assert torch.equal(seen[0], torch.randn([1, 4, 8, 6], generator=generator))
    assert torch.equal(seen[1], torch.randn([1, 4, 8, 6], generator=generator))


def test_fixed_code_shares_one_start_noise(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("ldm.generate.run.sample", lambda name, d, x, steps, **kw: seen.append(x.clone()) or x)
    job = Txt2ImgJob(batches=[["a", "b"], ["c"]], n_iter=2, steps=2, height=64, width=64, seed=1, fixed_code=True,
                     save_grid=False)
    run_txt2img(job, loaded_tiny(), OutputFolder(tmp_path), log=lambda _: None)
    assert len(seen) == 4 and torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[0][:1])


def test_a_nan_image_is_reported_and_the_rest_of_the_batch_is_saved(tmp_path):
    loaded = loaded_tiny()
    decode = loaded.model.decode_first_stage

    def decode_with_one_nan(z):
        out = decode(z)
        out[0] = float("nan")
        return out

    loaded.model.decode_first_stage = decode_with_one_nan
    lines = []
    job = Txt2ImgJob(batches=[["a", "b", "c"]], steps=2, height=64, width=64, save_grid=False)
    report = run_txt2img(job, loaded, OutputFolder(tmp_path), log=lines.append)
    assert len(report.failed) == 1 and len(report.saved) == 2
    assert any("NaN" in line for line in lines)
