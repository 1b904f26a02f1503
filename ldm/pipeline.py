"""The Python API: `pipe = Pipeline.from_pretrained(ckpt)`, `pipe(prompt).images[0]`, as diffusers users write it.

Every call runs the scripts' own code: the same option checks and defaults (ldm.generate.options, so an
option means what its flag means), the same Job, task and loop (ldm.generate.run); only the pictures are
kept in memory (`PicturesInMemory`) instead of written as numbered files. The same settings make the same
picture as the script, pixel for pixel.

Options beyond the named keywords are the scripts' own, by their argparse names: eta, s_churn, subseed,
subseed_strength, clip_skip, emphasis, rng, seed_mode, ensd, n_iter, hr_scale, denoising_strength, ... (see
`--help` of scripts/txt2img.py). ControlNet: `control=[ControlUnit(model, image, weight=..., ...)]`
(ldm.generate.control) on any call. Bad input is one ValueError naming the problem and the fix.
"""
import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from ldm.generate import hires, images, loading, options
from ldm.generate.depth2img import DepthToImage, depth_source, load_depth_map, padded_size
from ldm.generate.errors import UserError
from ldm.generate.img2img import ImageToImage
from ldm.generate.infotext import parse_parameters
from ldm.generate.inpaint import Inpainting
from ldm.generate.output import OutputFolder
from ldm.generate.rng import RANDOM_SEED
from ldm.generate.run import run
from ldm.generate.txt2img import TextToImage
from ldm.generate.upscale import DEFAULT_NOISE_LEVEL, Upscaling, check_noise_level
from ldm.generate.variations import ImageVariations

DTYPE_PRECISIONS = {torch.float32: "full", torch.bfloat16: "bf16", torch.float16: "autocast"}
# The scripts' flags as this API's keywords, so that an error names what the caller wrote.
KEYWORDS_OF_FLAGS = {"ddim_steps": "num_inference_steps", "steps": "num_inference_steps", "scale": "guidance_scale",
                     "n_samples": "num_images_per_prompt", "H": "height", "W": "width", "ckpt": "model",
                     "init-img": "image", "mask": "mask_image", "lowmem": "low_memory"}
# Options of the scripts that are about files and flags, not about the picture: not keywords here.
NOT_KEYWORDS = {"help", "prompt", "from_file", "repeat", "from_png", "outdir", "skip_save", "skip_grid", "n_rows",
                "sampler_flags", "precision", "H", "W", "ddim_steps", "scale", "n_samples", "seed", "no_watermark",
                "lora", "sampler", "schedule", "negative_prompt"}
# Which call each model family answers.
CALLS_OF_KINDS = {"text-to-image": ("pipe(...)", "pipe.img2img", "pipe.inpaint"), "inpainting": ("pipe.inpaint",),
                  "x4 upscaling": ("pipe.upscale",), "depth-to-image": ("pipe.depth2img",),
                  "image variations": ("pipe.variations",)}


def _python_names(message: str) -> str:
    """A script's error line with its flags written as this API's keywords."""
    return re.sub(r"--([A-Za-z][\w-]*)", lambda match: KEYWORDS_OF_FLAGS.get(match[1], match[1]), message)


class ImageWithInfotext(Image.Image):
    """A PIL image that keeps its infotext (`info["parameters"]`) when saved as a PNG: PIL writes PNG text
    chunks only from a `pnginfo` argument, never from `info`. Images derived from it (copy, resize) are plain."""

    def save(self, fp, format=None, **params):
        name = fp if isinstance(fp, (str, os.PathLike)) else getattr(fp, "name", "")
        as_png = (format or "").upper() == "PNG" or (format is None and str(name).lower().endswith(".png"))
        if as_png and "pnginfo" not in params and self.info.get("parameters"):
            params["pnginfo"] = PngImagePlugin.PngInfo()
            params["pnginfo"].add_text("parameters", self.info["parameters"])
        return super().save(fp, format, **params)

    @classmethod
    def of(cls, pixels: np.ndarray, text: str | None) -> "ImageWithInfotext":
        image = Image.fromarray(pixels)
        image.__class__ = cls  # PIL builds its images itself; the subclass only adds behaviour, no state
        if text:
            image.info["parameters"] = text
        return image


class PicturesInMemory:
    """What run() needs of an OutputFolder, keeping the pictures as ImageWithInfotext instead of files."""
    save_samples = True

    def __init__(self):
        self.images: list[ImageWithInfotext] = []
        self.grid: ImageWithInfotext | None = None

    def save_sample(self, image: np.ndarray, text: str | None) -> ImageWithInfotext:
        self.images.append(ImageWithInfotext.of(image, text))
        return self.images[-1]

    def save_grid(self, image: np.ndarray, text: str | None) -> ImageWithInfotext:
        self.grid = ImageWithInfotext.of(image, text)
        return self.grid


@dataclass
class GenerationResult:
    """images: PIL images with their A1111 infotext in `.info["parameters"]` (kept when saved as PNG);
    seeds and infotexts: each image's; failed: the images that came out NaN and were left out."""
    images: list
    failed: list = field(default_factory=list)

    @property
    def infotexts(self) -> list[str]:
        return [image.info["parameters"] for image in self.images]

    @property
    def seeds(self) -> list[int]:
        return [int(parse_parameters(text)[2]["Seed"]) for text in self.infotexts]

    def save(self, outdir) -> list[Path]:
        """The images as the scripts save them: outdir/samples/NNNNN.png, numbered after the highest there,
        never overwriting, each with its infotext."""
        folder = OutputFolder(outdir)
        folder.check_writable()
        return [folder.save_sample(np.asarray(image), text) for image, text in zip(self.images, self.infotexts)]


def _defaults(steps: int, scale: float, with_hires=False) -> tuple[argparse.Namespace, dict]:
    """A script's options at their defaults (one picture per call, no grid), and their argparse actions by name."""
    parser = options.OneLineParser(prog="ldm.pipeline")
    options.add_sampling_arguments(parser, steps=steps, scale=scale, n_samples=1, n_iter=1)
    options.add_output_arguments(parser, outdir=".")
    if with_hires:
        hires.add_arguments(parser)
    args = parser.parse_args([])
    args.skip_grid = True
    return args, {action.dest: action for action in reversed(parser._actions)}  # the first of a dest wins


def _as_option(name: str, value, action: argparse.Action | None):
    """A keyword's value as its option's parser would make it from the command line."""
    kind = getattr(action, "type", None)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)  # 6 and 6.0 alike, as the infotext writes "CFG scale: 6.0" for --scale 6
    elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    elif kind is str.lower and isinstance(value, str):
        value = value.lower()
    if action is not None and action.choices is not None and value not in action.choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _pil_pixels(image, multiple: int, name: str, log) -> torch.Tensor:
    """A PIL image or a picture file as the scripts read --init-img (upright, RGB, sides a multiple of `multiple`)."""
    if isinstance(image, (str, os.PathLike)):
        return images.load_image(image, multiple, flag=name, log=log)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image or a picture file's path, not {type(image).__name__}")
    return images.image_tensor(ImageOps.exif_transpose(image), multiple, name, log)


def _opened(image, name: str, log) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        return images.open_image(image, name, log=log)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image or a picture file's path, not {type(image).__name__}")
    return ImageOps.exif_transpose(image)


class Pipeline:
    """A loaded model and the generation calls it supports; see the module's docstring."""

    def __init__(self, loaded: loading.LoadedModel, log=print):
        self.loaded, self.log = loaded, log

    @classmethod
    def from_pretrained(cls, model=None, config=None, device="auto", dtype: torch.dtype | None = None,
                        precision: str = "autocast", low_memory=False, vae=None, use_ema=False, embeddings_dir=None,
                        trust_config=False, midas=None, log=print) -> "Pipeline":
        """model: a checkpoint (.ckpt, .safetensors); None: the scripts' default (the embedded model when
        models/ldm/stable-diffusion-v1/model.ckpt holds nothing). dtype: torch.float32, torch.bfloat16 or
        torch.float16 (CUDA only), or `precision` as the scripts' --precision. log: where the scripts' lines go."""
        if dtype is not None:
            if dtype not in DTYPE_PRECISIONS:
                raise ValueError(f"dtype {dtype} is not supported: use torch.float32, torch.bfloat16 or torch.float16")
            precision = DTYPE_PRECISIONS[dtype]
        if precision not in options.PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(options.PRECISIONS)}")
        args = argparse.Namespace(ckpt=None if model is None else str(model), config=config, device=device,
                                  precision=precision, use_ema=use_ema, lowmem=low_memory, trust_config=trust_config,
                                  vae=vae, embeddings_dir=embeddings_dir, skip_bad_embeddings=False)
        try:
            if dtype == torch.float16 and loading.resolve_device(device).type != "cuda":
                raise UserError("dtype torch.float16 runs on CUDA only: use torch.float32 or torch.bfloat16")
            customize = depth_source(loading.resolve_checkpoint(args.ckpt, log), False, midas) if midas else None
            return cls(loading.load_from_args(args, log=log, customize=customize), log)
        except UserError as error:
            raise ValueError(_python_names(str(error))) from None

    @property
    def kind(self) -> str:
        """text-to-image, inpainting, x4 upscaling, depth-to-image or image variations."""
        return self.loaded.kind

    def __call__(self, prompt, negative_prompt="", num_inference_steps=50, guidance_scale=7.5, height=None,
                 width=None, num_images_per_prompt=1, seed=None, generator=None, sampler="DDIM", schedule="automatic",
                 lora=(), callback=None, watermark=True, **more) -> GenerationResult:
        """Text to image (scripts/txt2img.py). height, width: the model's native size when None. seed: None or
        -1 for a random one, or a torch.Generator's initial_seed(). callback(info) after every step, info
        {"i", "total", "t", "x", "x0"}. lora: [(path, weight)]. more: the script's other options."""
        self._require("pipe(...)")
        args = self._args(_defaults(num_inference_steps, guidance_scale, with_hires=True), locals())
        factor = self.loaded.downsampling_factor
        height, width = height or self.loaded.native_size, width or self.loaded.native_size

        def job_and_task(job_for):
            settings = hires.settings_from_args(args)
            for name, side in (("height", height), ("width", width)):
                options.check_dimension(name, side, max(8, factor))
            final = None if settings is None else hires.final_size(hires.checked_target(settings, height, width, factor))
            return job_for(height, width, final_size=final), TextToImage(settings)

        return self._run(args, job_and_task, callback)

    def img2img(self, prompt, image, strength=0.75, negative_prompt="", num_inference_steps=50, guidance_scale=5.0,
                num_images_per_prompt=1, seed=None, generator=None, sampler="DDIM", schedule="automatic", lora=(),
                callback=None, watermark=True, **more) -> GenerationResult:
        """Image to image (scripts/img2img.py): `image` (PIL or a path) redrawn at `strength`, 0..1."""
        self._require("pipe.img2img")
        args = self._args(_defaults(num_inference_steps, guidance_scale), locals())

        def job_and_task(job_for):
            options.check_strength(strength)
            pixels = _pil_pixels(image, 8, "image", self.log)
            return job_for(*pixels.shape[-2:]), ImageToImage(pixels, strength)

        return self._run(args, job_and_task, callback)

    def inpaint(self, prompt, image, mask_image, strength=1.0, paste_back=True, negative_prompt="",
                num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1, seed=None, generator=None,
                sampler="DDIM", schedule="automatic", lora=(), callback=None, watermark=True,
                **more) -> GenerationResult:
        """Inpainting (scripts/inpaint.py): the white part of `mask_image` repainted; an inpainting model, or
        any text-to-image model by masked sampling."""
        self._require("pipe.inpaint")
        args = self._args(_defaults(num_inference_steps, guidance_scale), locals())

        def job_and_task(job_for):
            options.check_strength(strength)
            pixels, mask = images.image_and_mask_tensors(_opened(image, "image", self.log),
                                                         _opened(mask_image, "mask_image", self.log),
                                                         "image", "mask_image", log=self.log)
            return job_for(*pixels.shape[-2:]), Inpainting(pixels, mask, strength, paste_back)

        return self._run(args, job_and_task, callback)

    def upscale(self, prompt, image, noise_level=DEFAULT_NOISE_LEVEL, negative_prompt="", num_inference_steps=50,
                guidance_scale=9.0, num_images_per_prompt=1, seed=None, generator=None, sampler="DDIM",
                schedule="automatic", lora=(), callback=None, watermark=True, **more) -> GenerationResult:
        """x4 upscaling (scripts/upscale.py) with the SD 2.x x4 upscaler: the output is 4x `image`'s sides."""
        self._require("pipe.upscale")
        args = self._args(_defaults(num_inference_steps, guidance_scale), locals())

        def job_and_task(job_for):
            check_noise_level(noise_level)
            low_res = _pil_pixels(image, 1, "image", self.log)
            factor = self.loaded.downsampling_factor
            job = job_for(low_res.shape[-2] * factor, low_res.shape[-1] * factor, upscaled=True)
            return job, Upscaling(low_res, noise_level)

        return self._run(args, job_and_task, callback)

    def depth2img(self, prompt, image, strength=0.9, depth_map=None, negative_prompt="", num_inference_steps=50,
                  guidance_scale=9.0, num_images_per_prompt=1, seed=None, generator=None, sampler="DDIM",
                  schedule="automatic", lora=(), callback=None, watermark=True, **more) -> GenerationResult:
        """Depth to image (scripts/depth2img.py) with an SD 2 depth model; depth_map: a depth image's path
        (bright = near) instead of the model's MiDaS estimate."""
        self._require("pipe.depth2img")
        args = self._args(_defaults(num_inference_steps, guidance_scale), locals())

        def job_and_task(job_for):
            options.check_strength(strength)
            pixels = _pil_pixels(image, 1, "image", self.log)  # padded to a multiple of 64 by the task
            depth = load_depth_map(depth_map, *pixels.shape[-2:], flag="depth_map") if depth_map else None
            return job_for(*padded_size(*pixels.shape[-2:])), DepthToImage(pixels, strength, depth)

        return self._run(args, job_and_task, callback)

    def variations(self, image, prompt="", noise_level=0, negative_prompt="", num_inference_steps=50,
                   guidance_scale=10.0, height=None, width=None, num_images_per_prompt=1, seed=None, generator=None,
                   sampler="DDIM", schedule="automatic", lora=(), callback=None, watermark=True,
                   **more) -> GenerationResult:
        """Image variations (scripts/variations.py) with an SD 2.1 unCLIP model: new pictures after `image`'s
        CLIP embedding (PIL or a path, any size), steered by `prompt`; noise_level 0..999 lets them drift
        further from it. height, width: the model's native size when None."""
        self._require("pipe.variations")
        args = self._args(_defaults(num_inference_steps, guidance_scale), locals())

        def job_and_task(job_for):
            height_, width_ = height or self.loaded.native_size, width or self.loaded.native_size
            for name, side in (("height", height_), ("width", width_)):
                options.check_dimension(name, side, max(8, self.loaded.downsampling_factor))
            return job_for(height_, width_), ImageVariations(_pil_pixels(image, 1, "image", self.log), noise_level)

        return self._run(args, job_and_task, callback)

    # --- the shared steps --------------------------------------------------------------------------------------
    def _require(self, call: str):
        calls = CALLS_OF_KINDS[self.kind]
        if call not in calls:
            raise ValueError(f"{self.loaded.ckpt_path.name} is a model for {self.kind}, which {call} cannot use: call {' or '.join(calls)} with it, or load another model")

    def _args(self, defaults: tuple[argparse.Namespace, dict], given: dict) -> argparse.Namespace:
        """The script's options with this call's keywords set; TypeError for a keyword no script takes."""
        args, actions = defaults
        more = dict(given["more"])
        args.control_units = list(more.pop("control", None) or [])  # ldm.generate.control.ControlUnit
        unknown = sorted(set(more) - (set(vars(args)) - NOT_KEYWORDS))
        if unknown:
            allowed = ", ".join(sorted(set(vars(args)) - NOT_KEYWORDS))
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}; the scripts' other options are: {allowed}")
        vars(args).update({name: _as_option(name, value, actions.get(name)) for name, value in more.items()})
        prompt, generator, seed = given["prompt"], given["generator"], given["seed"]
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt or not all(isinstance(text, str) for text in prompt):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if generator is not None and seed is not None:
            raise ValueError("seed and generator both give the seed: pass one of them")
        args.prompts = list(prompt)
        args.negative_prompt = given["negative_prompt"]
        for name, dest in (("num_inference_steps", "ddim_steps"), ("guidance_scale", "scale"),
                           ("num_images_per_prompt", "n_samples")):
            setattr(args, dest, _as_option(name, given[name], actions[dest]))
        seed = generator.initial_seed() if generator is not None else RANDOM_SEED if seed is None else seed
        args.seed = _as_option("seed", seed, actions["seed"])
        args.sampler, args.schedule = given["sampler"], given["schedule"]
        args.lora = [(Path(path), float(weight)) for path, weight in given["lora"]]
        args.no_watermark = not given["watermark"]
        args.lowmem = self.loaded.components is not None  # how the model was loaded: the memory check's
        return args

    def _run(self, args, job_and_task, callback) -> GenerationResult:
        """Check the options as the scripts do, then run the scripts' loop with the pictures kept in memory.
        job_and_task(job_for) -> (Job, Task), job_for(height, width, ...) being options.job_for_model's Job."""
        try:
            batches = [[prompt] * args.n_samples for prompt in args.prompts]  # as --prompt's, or --from-file's
            sampler, batches = options.prepare_run(args, batches, log=self.log)  # with --repeat n_samples

            def job_for(height, width, **where):
                return options.job_for_model(args, sampler, batches, self.loaded, height, width, **where)

            job, task = job_and_task(job_for)
            pictures = PicturesInMemory()
            report = run(job, task, self.loaded, pictures, log=self.log, preview=callback)
        except UserError as error:
            raise ValueError(_python_names(str(error))) from None
        return GenerationResult(pictures.images, report.failed)
