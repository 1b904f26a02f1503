"""A text-to-image run: prompts in batches -> start noise from one seeded generator -> sampler -> files."""
from dataclasses import dataclass, field

import torch

from ldm.generate.errors import Interrupted
from ldm.generate.output import OutputFolder, Watermarker, infotext, make_grid, to_uint8_images
from ldm.generate.progress import StopFlag, progress_bar, step_callback
from ldm.generate.prompts import truncation_warnings
from ldm.models.diffusion.sampling import GuidedDenoiser, sample

SAMPLER_NAMES = {"ddim": "DDIM", "plms": "PLMS", "dpm": "DPM++ 2M"}  # as AUTOMATIC1111 users read them
VERSION = "ldm 0.1.0"


@dataclass
class Txt2ImgJob:
    batches: list
    negative_prompt: str = ""
    n_iter: int = 1
    steps: int = 50
    sampler: str = "ddim"
    scale: float = 7.5
    eta: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 42
    fixed_code: bool = False
    n_rows: int = 0
    save_grid: bool = True
    watermark: bool = True


@dataclass
class RunReport:
    saved: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    grid: object = None
    interrupted: str | None = None


class Conditioner:
    """Text embeddings, computed once per distinct batch of prompts and reused across iterations."""

    def __init__(self, model, log):
        self.model, self.log = model, log
        self.cache = {}

    def __call__(self, prompts: list[str]):
        key = tuple(prompts)
        if key not in self.cache:
            self.cache[key] = self.model.get_learned_conditioning(list(prompts))
            counts = getattr(self.model.cond_stage_model, "last_token_counts", None) or []
            for line in dict.fromkeys(truncation_warnings(prompts, counts)):  # each cut prompt once
                self.log(line)
        return self.cache[key]


def image_problem(decoded_image: torch.Tensor) -> str | None:
    if not torch.isfinite(decoded_image).all():
        return "NaN"
    if decoded_image.max() <= -1.0 + 1.0 / 255:
        return "all black"
    return None


def run_txt2img(job: Txt2ImgJob, loaded, folder: OutputFolder, log=print, stop: StopFlag | None = None) -> RunReport:
    model, device = loaded.model, loaded.device
    stop = stop or StopFlag()
    generator = torch.Generator().manual_seed(job.seed)  # one CPU generator: the same numbers on every device
    latent_shape = [loaded.latent_channels, job.height // loaded.downsampling_factor, job.width // loaded.downsampling_factor]
    batch_size = max(len(batch) for batch in job.batches)
    fixed_noise = torch.randn([batch_size, *latent_shape], generator=generator) if job.fixed_code else None
    condition = Conditioner(model, log)
    watermark = Watermarker(loaded.watermark_text if job.watermark else None)
    report, grid_images = RunReport(), []
    total_batches = job.n_iter * len(job.batches)
    with torch.inference_mode(), loaded.autocast():
        try:
            for iteration in range(job.n_iter):
                for batch_index, prompts in enumerate(job.batches):
                    n = len(prompts)
                    noise = fixed_noise[:n] if fixed_noise is not None else torch.randn([n, *latent_shape], generator=generator)
                    cond = condition(prompts)
                    uncond = condition([job.negative_prompt] * n) if job.scale != 1.0 else None
                    denoiser = GuidedDenoiser(model, cond, uncond, job.scale)
                    number = iteration * len(job.batches) + batch_index + 1
                    with progress_bar(job.steps, f"batch {number}/{total_batches}") as bar:
                        latents = sample(job.sampler, denoiser, noise.to(device), job.steps, eta=job.eta,
                                         generator=generator, callback=step_callback(bar, stop))
                    decoded = model.decode_first_stage(latents.to(loaded.dtype)).float()
                    for position, (prompt, image) in enumerate(zip(prompts, to_uint8_images(decoded))):
                        problem = image_problem(decoded[position])
                        label = f"batch {number} image {position + 1} ({prompt[:40]!r})"
                        if problem == "NaN":
                            log(f"error: {label} came out NaN and was not saved: try --precision full")
                            report.failed.append(label)
                            continue
                        if problem:
                            log(f"warning: {label} is all black")
                        image = watermark.apply(image)
                        text = infotext(prompt, job.negative_prompt, job_fields(job, loaded, n, position))
                        if folder.save_samples:
                            report.saved.append(folder.save_sample(image, text))
                        grid_images.append(image)
        except Interrupted as where:
            report.interrupted = str(where)
    if job.save_grid and grid_images:
        grid = watermark.apply(make_grid(grid_images, job.n_rows or batch_size))
        report.grid = folder.save_grid(grid, infotext(job.batches[0][0], job.negative_prompt,
                                                      job_fields(job, loaded, batch_size, None)))
    return report


def job_fields(job: Txt2ImgJob, loaded, batch_size: int, position, extra: dict | None = None) -> dict:
    """The A1111 `key: value` fields, in their order."""
    fields = {
        "Steps": job.steps,
        "Sampler": SAMPLER_NAMES.get(job.sampler, job.sampler),
        "CFG scale": job.scale,
        "Seed": job.seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": loaded.hash,
        "Model": loaded.name,
    }
    fields.update(extra or {})
    if job.eta:
        fields["Eta"] = job.eta
    fields["Batch size"] = batch_size
    fields["Batch pos"] = position
    fields["Version"] = VERSION
    return fields
