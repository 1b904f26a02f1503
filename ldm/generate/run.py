"""The one generation loop that txt2img, img2img, inpainting, upscaling and depth2img share.

prompts in batches -> text conditioning (cached) -> the task's start for the batch -> sampler with
classifier-free guidance -> decode (in tiles when large) -> NaN check, watermark, metadata, numbered
files, grid. Progress bars, Ctrl-C (stop after the current step, keep what is finished) and seeds are
handled here once.

What differs between scripts is a *task* (see `Task`): it checks the model, does its one-time work
(encoding an init image), and for every batch says where sampling starts and with what conditioning
(`Start`). It draws its random numbers from `BatchInputs.noise`, so every script's seed means the same:
one CPU generator, seeded once, drawn in a documented order, identical on every device.
"""
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from ldm.generate.errors import Interrupted
from ldm.generate.output import OutputFolder, SaveFailed, Watermarker, infotext, make_grid, to_uint8_images
from ldm.generate.progress import StopFlag, progress_bar, step_callback
from ldm.generate.prompts import truncation_warnings
from ldm.generate.rng import RNG_INFOTEXT_NAMES, noise_source
from ldm.models.diffusion.samplers import infotext_fields, sample
from ldm.models.diffusion.sampling import GuidedDenoiser
from ldm.models.tiling import DECODE_TILED_ABOVE_PIXELS, TILE_PIXELS, decode_tiled, needs_tiling

VERSION = "ldm 0.1.0"


@dataclass
class Job:
    """What every script asks for. height and width are the output's size in pixels."""
    batches: list
    negative_prompt: str = ""
    n_iter: int = 1
    steps: int = 50
    sampler: str = "ddim"  # a key of ldm.models.diffusion.samplers.REGISTRY
    schedule: str = "automatic"  # the k-samplers' sigma schedule (samplers.SCHEDULE_NAMES)
    scale: float = 7.5
    eta: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 42
    rng: str = "cpu"  # where the seed's numbers come from: "cpu" or "nv" (ldm.generate.rng)
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
    save_failed: str | None = None  # why a file could not be written; the run stopped there


class SeededNoise:
    """The run's random numbers: one source (`rng`: torch's CPU generator, or CUDA's numbers computed on the
    CPU, see ldm.generate.rng), seeded once, the same numbers on every device.

    With fixed_code, the draws of the first batch are recorded and every later batch gets the same ones
    (cut to its size; the first batch is the largest), so "one start noise shared by every batch" holds
    for img2img's and the upscaler's draws too. Sampler noise (DDIM eta) comes from `source` directly,
    after the batch's start noise, never replayed.
    """

    def __init__(self, seed: int, fixed: bool = False, rng: str = "cpu"):
        self.source = noise_source(rng, seed)
        self.fixed = fixed
        self._recorded, self._replaying, self._index = [], False, 0

    def new_batch(self):
        self._replaying = self.fixed and bool(self._recorded)
        self._index = 0

    def randn(self, shape) -> torch.Tensor:
        if self._replaying:
            recorded = self._recorded[self._index]
            self._index += 1
            return recorded[:shape[0]]
        noise = self.source.randn(shape)
        if self.fixed:
            self._recorded.append(noise)
        return noise


class Conditioner:
    """Text embeddings, computed once per distinct batch of prompts and reused across iterations."""

    def __init__(self, loaded, log):
        self.loaded, self.log = loaded, log
        self.cache = {}

    def __call__(self, prompts: list[str]):
        key = tuple(prompts)
        if key not in self.cache:
            encoder = self.loaded.use("cond_stage_model")
            self.cache[key] = self.loaded.model.get_learned_conditioning(list(prompts))
            counts = getattr(encoder, "last_token_counts", None) or []
            for line in dict.fromkeys(truncation_warnings(prompts, counts)):  # each cut prompt once
                self.log(line)
        return self.cache[key]


@dataclass
class BatchInputs:
    """What a task gets for each batch."""
    prompts: list[str]
    cond: torch.Tensor  # text embeddings of the prompts
    uncond: torch.Tensor | None  # of the negative prompt, None when there is no guidance (scale 1)
    noise: SeededNoise
    job: Job
    loaded: object  # ldm.generate.loading.LoadedModel

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def latent_shape(self) -> list[int]:
        """[n, C, H/f, W/f] for the job's output size."""
        f = self.loaded.downsampling_factor
        return [self.size, self.loaded.latent_channels, self.job.height // f, self.job.width // f]


@dataclass
class Start:
    """Where one batch's sampling starts, and with what.

    latents: the sampler's x at its first step (or the result itself when skip_steps == job.steps).
    cond / uncond: what apply_model gets (a text tensor, or a dict with c_concat / c_crossattn / c_adm).
    skip_steps: steps of the job's schedule left out at the start (img2img's 1 - strength).
    blend: the samplers' masked-sampling hook, blend(x, t) -> x before each model evaluation.
    finish_latents: applied to the sampled latents before decoding.
    finish_images: applied to the decoded pictures as HWC uint8 arrays (in 8 bits, so that pixels pasted
    back from the input stay exactly the input's).
    """
    latents: torch.Tensor
    cond: object
    uncond: object = None
    skip_steps: int = 0
    blend: Callable | None = None
    finish_latents: Callable | None = None
    finish_images: Callable | None = None


class Task:
    """A kind of run. Subclasses implement `start`; the others have working defaults."""

    def prepare(self, job: Job, loaded, log):
        """Check that the model fits the task and do the one-time work; raise UserError to refuse."""

    def start(self, batch: BatchInputs) -> Start:
        raise NotImplementedError

    def fields(self, job: Job) -> dict:
        """Extra A1111 metadata fields (after Model), e.g. {"Denoising strength": 0.75}."""
        return {}


def image_problem(decoded_image: torch.Tensor) -> str | None:
    if not torch.isfinite(decoded_image).all():
        return "NaN"
    if decoded_image.max() <= -1.0 + 1.0 / 255:
        return "all black"
    return None


def decode(loaded, latents: torch.Tensor) -> torch.Tensor:
    """decode_first_stage, in overlapping tiles when the output is over DECODE_TILED_ABOVE_PIXELS."""
    model, factor = loaded.model, loaded.downsampling_factor
    loaded.use("first_stage_model")
    latents = latents.to(loaded.device, loaded.dtype)
    if needs_tiling(latents.shape, factor):
        return decode_tiled(model.decode_first_stage, latents, factor)
    return model.decode_first_stage(latents).float()


def tiling_message(latent_shape, factor: int) -> str:
    height, width = latent_shape[-2] * factor, latent_shape[-1] * factor
    return (f"decoding {width}x{height} in overlapping {TILE_PIXELS}x{TILE_PIXELS} tiles blended at their seams "
            f"(outputs over {DECODE_TILED_ABOVE_PIXELS // 1024}x1024 pixels are tiled to bound memory)")


def run(job: Job, task: Task, loaded, folder: OutputFolder, log=print, stop: StopFlag | None = None) -> RunReport:
    return _Run(job, task, loaded, folder, log, stop or StopFlag()).all_batches()


class _Run:
    """One run's state: the generator, the conditioning cache, the report and the grid's pictures."""

    def __init__(self, job, task, loaded, folder, log, stop):
        self.job, self.task, self.loaded, self.folder, self.log, self.stop = job, task, loaded, folder, log, stop
        self.noise = SeededNoise(job.seed, job.fixed_code, job.rng)
        self.condition = Conditioner(loaded, log)
        self.watermark = Watermarker(loaded.watermark_text if job.watermark else None)
        self.report, self.grid_images, self.tiling_announced = RunReport(), [], False
        self.total_batches = job.n_iter * len(job.batches)

    def all_batches(self) -> RunReport:
        job = self.job
        try:
            with torch.inference_mode(), self.loaded.autocast():
                self.task.prepare(job, self.loaded, self.log)
                try:
                    for iteration in range(job.n_iter):
                        for batch_index, prompts in enumerate(job.batches):
                            number = iteration * len(job.batches) + batch_index + 1
                            self.one_batch(prompts, number)
                            if self.stop.requested:  # a batch without sampling steps (img2img at strength 0) stops here
                                raise Interrupted(f"the end of batch {number} of {self.total_batches}")
                except Interrupted as where:
                    self.report.interrupted = str(where)
            if job.save_grid and self.grid_images:
                batch_size = max(len(batch) for batch in job.batches)
                grid = self.watermark.apply(make_grid(self.grid_images, job.n_rows or batch_size))
                text = infotext(job.batches[0][0], job.negative_prompt, self.fields(batch_size, None))
                self.report.grid = self.folder.save_grid(grid, text)
        except SaveFailed as error:  # a full disk or the like: what is saved stays, nothing more is tried
            self.report.save_failed = str(error)
        return self.report

    def one_batch(self, prompts: list[str], number: int):
        job, model = self.job, self.loaded.model
        self.noise.new_batch()
        cond = self.condition(prompts)
        uncond = self.condition([job.negative_prompt] * len(prompts)) if job.scale != 1.0 else None
        start = self.task.start(BatchInputs(prompts, cond, uncond, self.noise, job, self.loaded))
        latents = start.latents.to(self.loaded.device)
        if start.skip_steps < job.steps:
            self.loaded.use("model")
            denoiser = GuidedDenoiser(model, start.cond, start.uncond, job.scale, dtype=self.loaded.dtype,
                                      device=self.loaded.device)
            with progress_bar(job.steps - start.skip_steps, f"batch {number}/{self.total_batches}") as bar:
                latents = sample(job.sampler, denoiser, latents, job.steps, skip_steps=start.skip_steps, eta=job.eta,
                                 schedule=job.schedule, noise_source=self.noise.source,
                                 callback=step_callback(bar, self.stop), blend=start.blend)
        if start.finish_latents is not None:
            latents = start.finish_latents(latents)
        if needs_tiling(latents.shape, self.loaded.downsampling_factor) and not self.tiling_announced:
            self.log(tiling_message(latents.shape, self.loaded.downsampling_factor))
            self.tiling_announced = True
        decoded = decode(self.loaded, latents)
        images = to_uint8_images(decoded)
        if start.finish_images is not None:
            images = start.finish_images(images)
        for position, (prompt, image) in enumerate(zip(prompts, images)):
            self.save(image, decoded[position], prompt, f"batch {number} image {position + 1} ({prompt[:40]!r})",
                      len(prompts), position)

    def save(self, image, decoded_image, prompt, label, batch_size, position):
        """One picture: refused if its decode is NaN (the rest of the batch goes on), else watermarked and saved."""
        problem = image_problem(decoded_image)
        if problem == "NaN":
            advice = ("try --precision full (fp32)" if self.loaded.dtype != torch.float32 else
                      "it ran in fp32 already, so the checkpoint or its config is the likely cause (or a very large --scale)")
            self.log(f"error: {label} came out NaN and was not saved: {advice}")
            self.report.failed.append(label)
            return
        if problem:
            self.log(f"warning: {label} is all black")
        image = self.watermark.apply(image)
        if self.folder.save_samples:
            text = infotext(prompt, self.job.negative_prompt, self.fields(batch_size, position))
            self.report.saved.append(self.folder.save_sample(image, text))
        self.grid_images.append(image)

    def fields(self, batch_size, position) -> dict:
        return job_fields(self.job, self.loaded, batch_size, position, self.task.fields(self.job))


def job_fields(job: Job, loaded, batch_size: int, position, extra: dict | None = None) -> dict:
    """The A1111 `key: value` fields, in their order."""
    fields = {
        "Steps": job.steps,
        **infotext_fields(job.sampler, job.schedule),
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
    if job.rng != "cpu":  # A1111 writes the field only when it is not the default (ours is cpu)
        fields["RNG"] = RNG_INFOTEXT_NAMES[job.rng]
    fields["Version"] = VERSION
    return fields


def run_and_report(job: Job, task: Task, loaded, folder: OutputFolder) -> int:
    """Run with Ctrl-C caught, print where the pictures went; the exit status: 130 interrupted, 1 when a
    picture came out NaN or a file could not be written (disk full, file-size limit: one line on stderr)."""
    stop = StopFlag()
    this_run = _Run(job, task, loaded, folder, print, stop)
    with stop.catching_sigint():
        try:
            this_run.all_batches()
        except KeyboardInterrupt:  # a second Ctrl-C stops at once
            this_run.report.interrupted = "once by a second Ctrl-C"
    report = this_run.report
    where = f"{len(report.saved)} images in {folder.samples}" if folder.save_samples else "no single images (--skip_save)"
    grid = f", grid {report.grid}" if report.grid else ""
    if report.save_failed:
        kept = f"kept {where}{grid}" if report.saved or report.grid else "nothing was saved"
        print(f"error: {report.save_failed}; {kept}", file=sys.stderr)
        return 1
    if report.interrupted:
        print(f"interrupted at {report.interrupted}: kept {where}{grid}", file=sys.stderr)
        return 130
    print(f"done: {where}{grid}" + (f"; {len(report.failed)} failed" if report.failed else ""))
    return 1 if report.failed else 0
