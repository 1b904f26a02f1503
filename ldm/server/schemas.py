"""The request bodies of AUTOMATIC1111's HTTP API, with its field names and defaults.

Every field A1111 (and its client `webuiapi`) sends is declared, so a body that works there is accepted here.
A field we cannot honour is accepted only at the values that mean "off" (`restore_faces: false`, no
`script_name`, no `alwayson_scripts` but ControlNet's, ...); any other value answers 422 naming the field:
never silence.
A field we do not know at all answers 422 too (extra="forbid"), so that a typo is not silently dropped.
"""
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ldm.server import controlnet

MAX_SIDE = 8192  # pixels: far past what one model call makes; the memory check refuses smaller ones that do not fit
MAX_BATCH = 64  # images one batch may hold; ldm.generate.prompts.MAX_IMAGES bounds the whole run
MAX_PROMPT_CHARS = 100_000
MAX_SEED = 2**64 - 1


# field -> the values that ask for nothing we would have to do
OFF_VALUES = {
    "restore_faces": (None, False),
    "tiling": (None, False),
    "styles": (None, []),
    "script_name": (None, ""),
    "script_args": (None, []),
    "refiner_checkpoint": (None, "", "None"),
    "refiner_switch_at": (None, 0, 1),
    "s_min_uncond": (None, 0),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "hr_sampler_name": (None, "", "Use same sampler"),
    "hr_scheduler": (None, "", "Use same scheduler"),
    "firstphase_width": (0,),
    "firstphase_height": (0,),
    "firstpass_image": (None, ""),
    "disable_extra_networks": (False,),
    "comments": (None, {}),
    "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None, ""),
    "include_init_images": (False,),
    "mask_round": (True,),
}
WHY_NOT = {
    "restore_faces": "face restoration (GFPGAN, CodeFormer) is not part of this server",
    "tiling": "seamless tiling is not supported",
    "styles": "saved prompt styles are an A1111 UI feature: write the style into the prompt",
    "script_name": "A1111 scripts and extensions do not run here",
    "script_args": "A1111 scripts and extensions do not run here",
    "refiner_checkpoint": "the SDXL refiner is not supported",
    "hr_checkpoint_name": "the hires pass runs with the request's checkpoint",
    "hr_sampler_name": "the hires pass runs with the request's sampler",
    "hr_scheduler": "the hires pass runs with the request's scheduler",
}


class _A1111Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _refuse_what_we_cannot_honour(self):
        for name, allowed in OFF_VALUES.items():
            if name in type(self).model_fields:
                value = getattr(self, name)
                if value not in allowed and not self._same_as_main(name, value):
                    why = WHY_NOT.get(name, "this server does not support it")
                    raise ValueError(f"{name}={value!r} cannot be honoured: {why}; leave it at its default "
                                     f"{allowed[0]!r}")
        return self

    def _same_as_main(self, name, value) -> bool:
        """hr_sampler_name equal to sampler_name (and alike) asks for nothing more."""
        main = {"hr_sampler_name": "sampler_name", "hr_scheduler": "scheduler"}.get(name)
        return main is not None and value == getattr(self, main, None)


class GenerationRequest(_A1111Request):
    """Fields txt2img and img2img share, A1111's defaults."""
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = Field(-1, ge=-1, le=MAX_SIDE)
    seed_resize_from_w: int = Field(-1, ge=-1, le=MAX_SIDE)
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's older name for the sampler; sampler_name wins
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_BATCH)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=8, le=MAX_SIDE)
    height: int = Field(512, ge=8, le=MAX_SIDE)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, ge=0.0, le=10.0)
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    s_min_uncond: float | None = None
    s_churn: float | None = Field(None, ge=0.0, le=100.0)
    s_tmax: float | None = Field(None, ge=0.0)
    s_tmin: float | None = Field(None, ge=0.0)
    s_noise: float | None = Field(None, ge=0.0, le=10.0)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = Field(None, max_length=200)
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)  # ControlNet's only (ldm.server.controlnet)
    infotext: str | None = Field(None, max_length=MAX_PROMPT_CHARS)

    @field_validator("alwayson_scripts")
    @classmethod
    def _controlnet_only(cls, scripts):
        return controlnet.check_scripts(scripts)

    @property
    def sampler(self) -> str:
        return self.sampler_name or self.sampler_index


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = Field(2.0, ge=1.0, le=8.0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0, le=1000)
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] = Field(..., min_length=1, max_length=MAX_BATCH)
    resize_mode: int = Field(0, ge=0, le=2)  # 0 just resize, 1 crop and resize, 2 resize and fill
    image_cfg_scale: float | None = None  # instruct-pix2pix only: no model of that kind loads here
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=256)
    mask_blur_y: int = Field(4, ge=0, le=256)
    mask_blur: int | None = Field(None, ge=0, le=256)
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=1)  # 0 fill, 1 original; 2 and 3 (latent noise/nothing) refused
    inpaint_full_res: bool = True  # A1111's "Only masked"
    inpaint_full_res_padding: int = Field(0, ge=0, le=MAX_SIDE)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)


class PngInfoRequest(_A1111Request):
    image: str = ""


class ExtrasRequest(_A1111Request):
    """The fields /extra-single-image and /extra-batch-images share."""
    resize_mode: int = Field(0, ge=0, le=1)  # 0 scale by upscaling_resize, 1 to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=0)
    codeformer_visibility: float = Field(0, ge=0, le=0)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_SIDE)
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_SIDE)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=0)
    upscale_first: bool = False


class ExtraSingleImageRequest(ExtrasRequest):
    image: str


class ExtrasFile(_A1111Request):
    data: str
    name: str = Field("", max_length=1000)


class ExtraBatchImagesRequest(ExtrasRequest):
    imageList: list[ExtrasFile] = Field(..., min_length=1, max_length=MAX_BATCH)  # noqa: N815 - A1111's name
