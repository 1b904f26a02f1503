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

from ldm.generate.control import start_control
from ldm.generate.errors import Interrupted, Skipped
from ldm.generate.extra_networks import AppliedNetworks, PromptNetworks
from ldm.modules.embeddings import ti_hashes
from ldm.generate.output import OutputFolder, SaveFailed, Watermarker, infotext, make_grid, to_uint8_images
from ldm.generate.progress import StopFlag, progress_bar, step_callback
from ldm.generate.conditioning import EMPHASIS_NAMES, Conditioner, resolve, schedule_steps
from ldm.generate.refiner import RefinerPass
from ldm.generate.rng import RNG_INFOTEXT_NAMES, ImageNoise, RunSeeds, noise_source
from ldm.generate.speedups import Speedups, for_pass, infotext_fields as speedup_fields
from ldm.models.diffusion.sampler_options import SamplerOptions, infotext_fields as option_fields
from ldm.models.diffusion.samplers import REGISTRY, infotext_fields, sample
from ldm.models.diffusion.sampling import GuidedDenoiser
from ldm.modules.encoders.sdxl_conditioner import SizeConditioning
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
    eta: float = 0.0  # DDIM's (A1111's "Eta DDIM"); the k-samplers' eta is in sampler_options
    sampler_options: SamplerOptions = field(default_factory=SamplerOptions)
    quantize: bool = False  # k-samplers: sigma rounded to a whole model timestep (A1111's quantization)
    height: int = 512
    width: int = 512
    seed: int = 42  # -1: a random one (A1111's), written to the infotexts
    rng: str = "cpu"  # where the seed's numbers come from: "cpu" or "nv" (ldm.generate.rng)
    seed_mode: str = "a1111"  # a1111: image k has seed + k and its own generator; batch: one generator (SEED_MODES)
    subseed: int = -1  # A1111's variation seed (-1: a random one), mixed in at subseed_strength
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (height, width) in pixels the seed's noise is made at
    ensd: int = 0  # A1111's "eta noise seed delta": sampler noise from seed + ensd
    fixed_code: bool = False
    n_rows: int = 0
    save_grid: bool = True
    watermark: bool = True
    clip_skip: int = 1  # A1111's: 1 = the text encoder's last layer, 2 = the one before (SD 1.x)
    emphasis: str = "original"  # A1111's Emphasis (prompt_encoding.EMPHASIS_MODES)
    networks: PromptNetworks | None = None  # LoRAs (--lora, the prompts' tags); None: the tags', from models/Lora
    # SDXL's size micro-conditioning, (height, width) / (top, left) in pixels; None: the output's size
    original_size: tuple[int, int] | None = None
    crop_coords: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    refiner: object = None  # ldm.generate.refiner.RefinerSettings: a model that takes over the sampling; None: none
    control: list = field(default_factory=list)  # ldm.generate.control.ControlUnit: ControlNets steering each pass
    speedups: Speedups = field(default_factory=Speedups)  # step caching and token merging (off by default)
    controlnet_dirs: tuple = ()  # where a unit's ControlNet is found by name (--controlnet_dir), before the defaults
    save_control_maps: bool = False  # each unit's detected map beside the outputs (control-NNNN.png)

    def size_conditioning(self, height: int | None = None, width: int | None = None) -> SizeConditioning:
        """What SDXL is told of the picture's size: as A1111 and diffusers, the output's size by default (that
        of the pass: height and width, a hires pass's; the job's by default)."""
        own = (height or self.height, width or self.width)
        return SizeConditioning(original_size=self.original_size or own, target_size=self.target_size or own,
                                crop_coords=self.crop_coords)


@dataclass
class RunReport:
    saved: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    grid: object = None
    interrupted: str | None = None
    skipped: list = field(default_factory=list)  # numbers of the batches a Skip dropped
    save_failed: str | None = None  # why a file could not be written; the run stopped there


class SeededNoise:
    """The run's random numbers, from `rng` (torch's CPU generator, or CUDA's numbers computed on the CPU,
    see ldm.generate.rng): the same numbers on every device.

    Batch mode (the originals'): one source, seeded once. With fixed_code, the draws of the first batch
    are recorded and every later batch gets the same ones (cut to its size; the first batch is the
    largest), so "one start noise shared by every batch" holds for img2img's and the upscaler's draws
    too. Sampler noise (DDIM eta, ancestral) comes from `source` directly, never replayed.

    A1111 mode: `new_batch(seeds)` gives each image of the batch its own source (rng.ImageNoise); the start
    noise is made first, in A1111's order, and every later draw (img2img's posterior noise, sampler noise)
    continues from each image's source. fixed_code there repeats the first batch's seeds (see RunSeeds).
    """

    def __init__(self, seed: int, fixed: bool = False, rng: str = "cpu"):
        self.batch_source = noise_source(rng, seed)
        self.fixed = fixed
        self.images: ImageNoise | None = None  # the batch's per-image sources, in A1111 mode
        self._start = None
        self._recorded, self._replaying, self._index = [], False, 0

    @property
    def source(self):
        """What the sampler draws from: randn(shape) and brownian_seeds(batch_size)."""
        return self.images if self.images is not None else self.batch_source

    def new_batch(self, images: ImageNoise | None = None, start_shape=None):
        """A1111 mode: `images`, whose start noise of `start_shape` is drawn at once (it comes first)."""
        self.images = images
        self._start = None if images is None else images.first(start_shape)
        self._replaying = self.fixed and bool(self._recorded) and images is None
        self._index = 0

    def start_noise(self, shape) -> torch.Tensor:
        """The batch's start noise [n, C, h, w]: in A1111 mode the one made by new_batch (with its variation
        seed and seed resize), in batch mode the next draw."""
        if self._start is None:
            return self.randn(shape)
        if list(self._start.shape) != list(shape):
            raise ValueError(f"start noise of shape {list(shape)} asked for; the batch's is {list(self._start.shape)}")
        return self._start

    def randn(self, shape) -> torch.Tensor:
        if self.images is not None:
            return self.images.randn(shape)
        if self._replaying:
            recorded = self._recorded[self._index]
            self._index += 1
            return recorded[:shape[0]]
        noise = self.batch_source.randn(shape)
        if self.fixed:
            self._recorded.append(noise)
        return noise


@dataclass
class BatchInputs:
    """What a task gets for each batch."""
    prompts: list[str]
    cond: object  # the prompts' text conditioning (conditioning.PromptConditioning, encoded per pass)
    uncond: object  # of the negative prompt, None when there is no guidance (scale 1)
    noise: SeededNoise
    job: Job
    loaded: object  # ldm.generate.loading.LoadedModel
    condition: Callable | None = None  # prompts -> their text embeddings, cached for the run (Conditioner)

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
    steps: the schedule's number of steps, None for the job's.
    second_pass: second_pass(latents, sampled) -> latents, run on the sampled latents before finish_latents;
    sampled(start) samples another Start as the first pass was (txt2img's hires fix).
    """
    latents: torch.Tensor
    cond: object
    uncond: object = None
    skip_steps: int = 0
    blend: Callable | None = None
    finish_latents: Callable | None = None
    finish_images: Callable | None = None
    steps: int | None = None
    second_pass: Callable | None = None


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


def run(job: Job, task: Task, loaded, folder: OutputFolder, log=print, stop: StopFlag | None = None,
        preview: Callable | None = None) -> RunReport:
    """preview(info): called after every sampling step with the sampler's info (i, total, t, x, x0)."""
    return _Run(job, task, loaded, folder, log, stop or StopFlag(), preview).all_batches()


class _Run:
    """One run's state: the generator, the conditioning cache, the report and the grid's pictures."""

    def __init__(self, job, task, loaded, folder, log, stop, preview=None):
        self.job, self.task, self.loaded, self.folder, self.log, self.stop = job, task, loaded, folder, log, stop
        self.preview = preview
        self.seeds = RunSeeds.resolve(job.seed, job.subseed, job.subseed_strength)
        for flag, asked, real in (("--seed", job.seed, self.seeds.seed), ("--subseed", job.subseed, self.seeds.subseed)):
            if asked == -1 and real is not None:
                log(f"{flag} -1: the random seed {real} ({flag} {real} makes this run again)")
        self.noise = SeededNoise(self.seeds.seed, job.fixed_code, job.rng)
        self.images_before = self.batch_first_image = 0  # the run's image index of this batch's first image
        self.condition = Conditioner(loaded, log, job.emphasis, job.clip_skip, getattr(loaded, "embeddings", None),
                                     size=job.size_conditioning())
        if getattr(loaded, "embeddings", None) is not None:
            loaded.embeddings.forget_used()  # the infotext's "TI hashes" name this run's embeddings
        self.networks = job.networks or PromptNetworks(log=log)
        self.applied_networks = AppliedNetworks(loaded, self.networks, log)
        self.network_fields, self.grid_network_fields = {}, None  # the batch's and the first batch's
        self.watermark = Watermarker(loaded.watermark_text if job.watermark else None)
        self.report, self.grid_images, self.tiling_announced = RunReport(), [], False
        self.refiner = None if job.refiner is None else RefinerPass(job.refiner, loaded, job, log)
        self.total_batches = job.n_iter * len(job.batches)
        self.control = None  # ldm.generate.control.RunControl, made after the task's checks

    def all_batches(self) -> RunReport:
        job = self.job
        try:
            with torch.inference_mode(), self.loaded.autocast():
                self.networks.check(job.batches, job.negative_prompt)
                self.applied_networks.check(job.batches, job.negative_prompt)
                self.task.prepare(job, self.loaded, self.log)
                self.control = start_control(job, self.loaded, self.folder, self.log)
                try:
                    for number, prompts in self.numbered_batches():
                        try:
                            self.one_batch(prompts, number)
                        except Skipped:  # its seeds are used up, so the next batch keeps its own
                            self.report.skipped.append(number)
                        if self.stop.requested:  # a batch without sampling steps (img2img at strength 0) stops here
                            raise Interrupted(f"the end of batch {number} of {self.total_batches}")
                except Interrupted as where:
                    self.report.interrupted = str(where)
            self.save_grid()
        except SaveFailed as error:  # a full disk or the like: what is saved stays, nothing more is tried
            self.report.save_failed = str(error)
        finally:  # a later run of this loaded model (the server's next request) starts from its own weights
            self.applied_networks.restore()
        return self.report

    def numbered_batches(self):
        """(number, prompts) of the batches this run makes; numbers count from 1 across the iterations."""
        for iteration in range(self.job.n_iter):
            for batch_index, prompts in enumerate(self.job.batches):
                yield iteration * len(self.job.batches) + batch_index + 1, prompts

    def save_grid(self):
        job = self.job
        if job.save_grid and self.grid_images:
            batch_size = max(len(batch) for batch in job.batches)
            grid = self.watermark.apply(make_grid(self.grid_images, job.n_rows or batch_size))
            text = infotext(job.batches[0][0], job.negative_prompt, self.fields(batch_size, None))
            self.report.grid = self.folder.save_grid(grid, text)

    def one_batch(self, prompts: list[str], number: int):
        job = self.job
        networks = self.networks.for_batch(prompts, job.negative_prompt)
        if self.applied_networks.apply(networks):
            self.condition.cache.clear()  # encoded with the text encoder's previous weights
        self.network_fields = networks.infotext_fields()
        if self.grid_network_fields is None:
            self.grid_network_fields = self.network_fields
        cond = self.condition(networks.prompts, composable=True)
        composed = any(len(parts) > 1 or parts[0][1] != 1.0 for parts in cond.parts)  # AND needs the uncond
        uncond = None
        if job.scale != 1.0 or composed:
            uncond = self.condition([networks.negative_prompt] * len(prompts))
        batch = BatchInputs(prompts, cond, uncond, self.noise, job, self.loaded, self.condition)
        self.new_batch_noise(batch)
        start = self.task.start(batch)
        label = f"batch {number}/{self.total_batches}"
        # the refiner takes over the batch's last pass (A1111's default with the hires fix: its second pass)
        latents = self.sampled(start, label, refine=start.second_pass is None)
        if start.second_pass is not None:
            latents = start.second_pass(latents, lambda second: self.sampled(second, f"{label} hires", refine=True, hires=True))
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

    def sampled(self, start: Start, label: str, refine: bool = False, hires: bool = False) -> torch.Tensor:
        """The start's latents after its steps, with a progress bar and Ctrl-C honoured at each step."""
        job, steps = self.job, start.steps or self.job.steps
        latents = start.latents.to(self.loaded.device)
        if start.skip_steps >= steps:
            return latents
        text_steps = schedule_steps(job.sampler, steps)
        cond, uncond = resolve(start.cond, text_steps), resolve(start.uncond, text_steps)  # before the UNet (--lowmem)
        self.loaded.use("model")
        control = None if self.control is None else self.control.for_pass(steps - start.skip_steps)
        denoiser = GuidedDenoiser(self.loaded.model, cond, uncond, job.scale, dtype=self.loaded.dtype,
                                  device=self.loaded.device, control=control)
        refiner = self.refiner if refine else None
        if refiner is not None:
            denoiser = refiner.switching(denoiser, start.cond, start.uncond, text_steps)
        # the batch's first image's seed: token merging's random picks follow the seed as the noise does
        merge_seed = self.seeds.image_seed(0 if job.seed_mode == "batch" else self.batch_first_image)
        with progress_bar(steps - start.skip_steps, label) as bar, for_pass(
                job.speedups, self.loaded.model.model.diffusion_model, steps - start.skip_steps, merge_seed,
                hires) as counting:
            callback = counting(step_callback(bar, self.stop, self.preview))
            try:
                latents = sample(job.sampler, denoiser, latents, steps, skip_steps=start.skip_steps, eta=job.eta,
                                 sampler_options=job.sampler_options, quantize=job.quantize, schedule=job.schedule,
                                 noise_source=self.noise.source, blend=start.blend,
                                 callback=callback if control is None else control.counting(callback))
            finally:
                if refiner is not None:
                    refiner.finish(steps)
        if control is not None:
            self.control.after_pass()
        return latents

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
            self.report.saved.append(self.save_sample(image, text, position))
        self.grid_images.append(image)

    def save_sample(self, image, text: str, position: int):
        """Image `position` of the batch as the next numbered file."""
        return self.folder.save_sample(image, text)

    def new_batch_noise(self, batch: BatchInputs):
        """Batch mode: the run's one source goes on. A1111 mode: each image its seed's source; with
        fixed_code every batch has the first batch's seeds, so that it has the first batch's noise."""
        job = self.job
        self.batch_first_image = 0 if job.fixed_code else self.images_before
        self.images_before += batch.size
        if job.seed_mode == "batch":
            self.noise.new_batch()
            return
        factor = self.loaded.downsampling_factor
        resize = None if job.seed_resize_from is None else tuple(side // factor for side in job.seed_resize_from)
        images = self.seeds.images(job.rng, self.batch_first_image, batch.size, resize, job.ensd)
        self.noise.new_batch(images, batch.latent_shape)

    def fields(self, batch_size, position) -> dict:
        """Image `position` of this batch's fields; position None: the grid's, which names the run's first image."""
        index = 0 if position is None or self.job.seed_mode == "batch" else self.batch_first_image + position
        networks = self.grid_network_fields if position is None else self.network_fields
        control = {} if self.control is None else self.control.infotext_fields()
        return job_fields(self.job, self.loaded, batch_size, position, {**self.task.fields(self.job), **control},
                          seed=self.seeds.image_seed(index), subseed=self.seeds.image_subseed(index),
                          networks=networks, refiner=None if self.refiner is None else self.refiner.fields())


def job_fields(job: Job, loaded, batch_size: int, position, extra: dict | None = None, seed: int | None = None,
               subseed: int | None = None, networks: dict | None = None, refiner: dict | None = None) -> dict:
    """The A1111 `key: value` fields, in their order; seed and subseed: the image's own (default job.seed);
    networks: the batch's "Lora hashes" (after RNG, as A1111's extra generation parameters)."""
    fields = {
        "Steps": job.steps,
        **infotext_fields(job.sampler, job.schedule),
        "CFG scale": job.scale,
        "Seed": job.seed if seed is None else seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": loaded.hash,
        "Model": loaded.name,
    }
    if loaded.vae_path is not None:  # A1111's order: after Model
        fields["VAE hash"] = loaded.vae_hash
        fields["VAE"] = loaded.vae_path.name
    if job.subseed_strength:
        fields["Variation seed"] = job.subseed if subseed is None else subseed
        fields["Variation seed strength"] = job.subseed_strength
    if job.seed_resize_from is not None:
        fields["Seed resize from"] = f"{job.seed_resize_from[1]}x{job.seed_resize_from[0]}"  # WxH, as Size
    fields.update(extra or {})
    if job.clip_skip > 1:
        fields["Clip skip"] = job.clip_skip
    fields.update(size_conditioning_fields(job))
    if job.emphasis != "original":
        fields["Emphasis"] = EMPHASIS_NAMES[job.emphasis]
    if ensd_changes_image(job):  # as A1111: written only where the sampler draws noise that ENSD reseeds
        fields["ENSD"] = job.ensd
    if job.eta:
        fields["Eta DDIM"] = job.eta  # A1111's name for DDIM's eta; "Eta" is the k-samplers'
    fields.update(speedup_fields(job.speedups))  # A1111's "Token merging ratio" comes after ENSD
    fields.update(option_fields(REGISTRY[job.sampler].function, job.sampler_options))
    fields["Batch size"] = batch_size
    fields["Batch pos"] = position
    if job.seed_mode != "a1111":  # without it, the seed would be read back with A1111's meaning
        fields["Seed mode"] = job.seed_mode
    # always: A1111 leaves the field out for its own default, "GPU" (the card's numbers), which is not ours
    fields["RNG"] = RNG_INFOTEXT_NAMES[job.rng]
    fields.update(networks or {})
    used_embeddings = ti_hashes(loaded.embeddings.used.values()) if getattr(loaded, "embeddings", None) else None
    if used_embeddings:  # A1111's order: after "Lora hashes"
        fields["TI hashes"] = used_embeddings
    fields.update(refiner or {})  # A1111's "Refiner", "Refiner switch at": added when it takes over
    if getattr(loaded, "quantized", None):  # only then: the exact paths' text stays A1111's
        fields["Precision"] = loaded.quantized
    fields["Version"] = VERSION
    return fields


def size_conditioning_fields(job: Job) -> dict:
    """SDXL's size micro-conditioning where it is not the default, sizes as WxH like "Size" (A1111 writes none)."""
    fields = {}
    for name, size in (("Original size", job.original_size), ("Target size", job.target_size)):
        if size is not None and tuple(size) != (job.height, job.width):
            fields[name] = f"{size[1]}x{size[0]}"
    if tuple(job.crop_coords) != (0, 0):
        fields["Crop top"], fields["Crop left"] = job.crop_coords
    return fields


def ensd_changes_image(job: Job) -> bool:
    """Whether ENSD moves this job's image: its sampler draws noise after the start (DDIM with eta, the
    ancestral samplers with a non-zero eta)."""
    draws_noise = job.eta > 0 if job.sampler == "ddim" else REGISTRY[job.sampler].stochastic and job.sampler_options.eta != 0
    return bool(job.ensd) and draws_noise


def run_and_report(job: Job, task: Task, loaded, folder: OutputFolder) -> int:
    """Run with Ctrl-C caught, print where the pictures went; the exit status: 130 interrupted, 1 when a
    picture came out NaN or a file could not be written (disk full, file-size limit: one line on stderr)."""
    from ldm.generate import sharding  # it builds on this module

    if sharding.wanted(folder):
        return sharding.run_and_report(job, task, loaded, folder)
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
