"""A1111 requests as calls of the Python API (ldm.pipeline, itself the scripts' Job, task and run loop), and
their results as A1111's answers. Nothing here samples: it translates field names, prepares the input
pictures as A1111 does (resize modes, "only masked" crops) and writes the `info` JSON.

`Generator.work(request, kind)` returns the function the job queue runs on its worker thread.
"""
import json
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ldm.generate.infotext import parse_parameters
from ldm.generate.run import VERSION
from ldm.models.diffusion import samplers
from ldm.pipeline import GenerationResult, ImageWithInfotext
from ldm.server import controlnet, pictures
from ldm.server.checkpoints import ModelFolders, ResidentModel
from ldm.server.errors import RequestProblem
from ldm.server.jobs import Ticket
from ldm.server.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from ldm.server.settings import RNG_SOURCES, Settings


@dataclass
class Answer:
    """A generation's result: the pictures with their infotexts, and A1111's info object."""
    images: list  # PIL images
    infotexts: list
    info: dict
    extra_images: list = field(default_factory=list)  # after the pictures, without infotext: ControlNet's maps


def _call(method, *args, **kwargs):
    """A Python API call, its bad-input ValueError as a RequestProblem (422)."""
    try:
        return method(*args, **kwargs)
    except ValueError as error:
        raise RequestProblem(str(error)) from None


def sampler_keywords(request: GenerationRequest) -> dict:
    """sampler, schedule and the sampler parameters as the Python API's keywords. A1111's `eta` is DDIM's eta
    for DDIM and the ancestral samplers' otherwise, as A1111 hands it on."""
    try:
        key, _ = samplers.resolve_sampler(request.sampler)
    except ValueError as error:
        raise RequestProblem(f"sampler_name: {error}") from None
    scheduler = request.scheduler if request.scheduler not in (None, "", "Automatic") else "automatic"
    keywords = {"sampler": request.sampler, "schedule": scheduler}
    if request.eta is not None:
        keywords["ddim_eta" if key == "ddim" else "eta"] = request.eta
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
        if getattr(request, name) is not None:
            keywords[name] = getattr(request, name)
    return keywords


def seed_keywords(request: GenerationRequest) -> dict:
    keywords = {"seed": request.seed}
    if request.subseed_strength:  # A1111 ignores the variation seed at strength 0; ours would refuse it
        keywords.update(subseed=request.subseed, subseed_strength=request.subseed_strength)
    if request.seed_resize_from_h > 0 and request.seed_resize_from_w > 0:
        keywords.update(seed_resize_from_h=request.seed_resize_from_h, seed_resize_from_w=request.seed_resize_from_w)
    return keywords


def hires_keywords(request: Txt2ImgRequest) -> dict:
    if not request.enable_hr:
        return {}
    keywords = {"hr_upscaler": request.hr_upscaler or "Latent", "hr_second_pass_steps": request.hr_second_pass_steps,
                "denoising_strength": 0.7 if request.denoising_strength is None else request.denoising_strength,
                "hr_prompt": request.hr_prompt, "hr_negative_prompt": request.hr_negative_prompt}
    if request.hr_resize_x or request.hr_resize_y:
        keywords.update(hr_resize_x=request.hr_resize_x, hr_resize_y=request.hr_resize_y)
    else:
        keywords["hr_scale"] = request.hr_scale
    return keywords


class Generator:
    def __init__(self, folders: ModelFolders, resident: ResidentModel, settings: Settings, lora_dir, log=print,
                 controlnets: controlnet.ControlNets | None = None):
        self.folders, self.resident, self.settings, self.lora_dir, self.log = folders, resident, settings, lora_dir, log
        self.controlnets = controlnets or controlnet.ControlNets(folders.models_dir)

    def pipeline_for(self, options: dict):
        checkpoint = self.folders.checkpoint(options["sd_model_checkpoint"])
        vae = self.folders.vae(options["sd_vae"])
        return _call(self.resident.get, checkpoint, options["sd_vae"], vae)

    def load_work(self):
        """A job that loads the model the options name (POST /options with sd_model_checkpoint)."""
        def work(ticket: Ticket):
            pipe = self.pipeline_for(self.settings.snapshot())
            return pipe.loaded.ckpt_path

        return work

    def work(self, request: GenerationRequest, kind: str):
        """The job for a txt2img or img2img request; checks what can be checked before it waits in the queue."""
        overrides = self.settings.checked(request.override_settings or {})
        prepared = self._prepared_inputs(request) if isinstance(request, Img2ImgRequest) else None
        keywords = {**sampler_keywords(request), **seed_keywords(request)}
        control = self.controlnets.request_control(request, getattr(request, "enable_hr", False))

        def work(ticket: Ticket) -> Answer:
            options = {**self.settings.snapshot(), **overrides}
            pipe = self.pipeline_for(options)
            common = dict(negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
                          guidance_scale=request.cfg_scale, num_images_per_prompt=request.batch_size,
                          n_iter=request.n_iter, callback=ticket.step, lora_dir=str(self.lora_dir),
                          clip_skip=options["CLIP_stop_at_last_layers"], ensd=options["eta_noise_seed_delta"],
                          rng=RNG_SOURCES[options["randn_source"]], control=control.units, **keywords)
            ticket.expected_passes = request.n_iter * (2 if getattr(request, "enable_hr", False) else 1)
            started = time.time()
            if kind == "txt2img":
                result = _call(pipe, request.prompt, height=request.height, width=request.width,
                               **hires_keywords(request), **common)
                images = list(result.images)
            else:
                images, result = self._img2img(pipe, request, prepared, common)
            if not request.override_settings_restore_afterwards and overrides:
                self.settings.update(overrides)
            answer = self._answer(request, pipe, images, result, options, ticket, started)
            answer.extra_images = control.maps
            if request.save_images and options["samples_save"] and not request.do_not_save_samples:
                folder = "outdir_txt2img_samples" if kind == "txt2img" else "outdir_img2img_samples"
                GenerationResult([ImageWithInfotext.of(np.asarray(image.convert("RGB")), text)
                                  for image, text in zip(answer.images, answer.infotexts)]).save(
                    self.settings.outdir(options, folder))
            return answer

        return work

    # --- img2img and inpainting ------------------------------------------------------------------------------------
    def _prepared_inputs(self, request: Img2ImgRequest) -> dict:
        """The init picture (and mask) decoded and shaped as A1111 does, before the job waits in the queue."""
        if len(request.init_images) > 1:
            raise RequestProblem("init_images holds more than one picture: send one (each batch image starts "
                                 "from it)")
        image = pictures.decode_image(request.init_images[0], "init_images[0]").convert("RGB")
        if request.mask is None:
            return {"image": pictures.resized(image, request.width, request.height, request.resize_mode)}
        image = pictures.resized(image, request.width, request.height, request.resize_mode) \
            if not request.inpaint_full_res else image
        blur = (request.mask_blur, request.mask_blur) if request.mask_blur is not None else \
            (request.mask_blur_x, request.mask_blur_y)
        mask = pictures.prepared_mask(pictures.decode_image(request.mask, "mask"), image.size,
                                      bool(request.inpainting_mask_invert), *blur)
        if request.inpainting_fill == 0:
            image_to_paint = pictures.filled_with_surroundings(image, mask)
        else:
            image_to_paint = image
        if not request.inpaint_full_res:
            return {"image": image_to_paint, "mask": mask, "original": image}
        box = pictures.masked_region(mask, request.inpaint_full_res_padding, request.width, request.height)
        size = (request.width, request.height)
        return {"image": image_to_paint.crop(box).resize(size, Image.LANCZOS),
                "mask": mask.crop(box).resize(size, Image.BILINEAR), "original": image, "full_mask": mask,
                "box": box}

    def _img2img(self, pipe, request: Img2ImgRequest, prepared: dict, common: dict):
        if "mask" not in prepared:
            result = _call(pipe.img2img, request.prompt, image=prepared["image"],
                           strength=request.denoising_strength, **common)
            return list(result.images), result
        result = _call(pipe.inpaint, request.prompt, image=prepared["image"], mask_image=prepared["mask"],
                       strength=request.denoising_strength, **common)
        images = list(result.images)
        if "box" in prepared:  # "only masked": the repainted crop goes back into the whole picture
            images = [pictures.paste_region(prepared["original"], image, prepared["full_mask"], prepared["box"])
                      for image in images]
        return images, result

    # --- the answer ---------------------------------------------------------------------------------------------
    def _answer(self, request, pipe, images, result, options, ticket, started) -> Answer:
        infotexts = result.infotexts
        fields = [parse_parameters(text)[2] for text in infotexts]
        seeds = [int(field["Seed"]) for field in fields] or [request.seed]
        subseeds = [int(field.get("Variation seed", request.subseed)) for field in fields] or [request.subseed]
        loaded = pipe.loaded
        count = len(images)
        info = {
            "prompt": request.prompt, "all_prompts": [request.prompt] * count,
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * count,
            "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
            "subseed_strength": request.subseed_strength, "width": request.width, "height": request.height,
            "sampler_name": fields[0]["Sampler"] if fields else request.sampler,
            "scheduler": fields[0].get("Schedule type", "Automatic") if fields else request.scheduler,
            "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
            "n_iter": request.n_iter, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": loaded.name, "sd_model_hash": loaded.hash,
            "sd_vae_name": loaded.vae_path.name if loaded.vae_path else None, "sd_vae_hash": loaded.vae_hash,
            "seed_resize_from_w": request.seed_resize_from_w, "seed_resize_from_h": request.seed_resize_from_h,
            "denoising_strength": request.denoising_strength,
            "extra_generation_params": controlnet.extra_generation_params(infotexts),
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
            "clip_skip": options["CLIP_stop_at_last_layers"],
            "is_using_inpainting_conditioning": loaded.kind == "inpainting", "version": VERSION,
            "interrupted": ticket.interrupted, "skipped": ticket.skipped, "failed": result.failed,
            "id_task": ticket.id,
        }
        return Answer(images, infotexts, info)


def response_body(request: GenerationRequest, answer: Answer) -> dict:
    """A1111's answer: {"images": [base64 PNG], "parameters": the request (pictures left out), "info": JSON}."""
    parameters = request.model_dump()
    for name in ("init_images", "mask"):
        if name in parameters:
            parameters[name] = None
    controlnet.leave_out_pictures(parameters["alwayson_scripts"])
    images = [pictures.encode_png(image, text) for image, text in zip(answer.images, answer.infotexts)] \
        + [pictures.encode_png(image) for image in answer.extra_images] if request.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(answer.info)}
