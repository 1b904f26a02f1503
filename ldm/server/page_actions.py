"""What the web page's buttons do, on the server's shared queue (the same one /sdapi/v1 uses).

A Generate press builds the A1111 request the API would get (Txt2ImgRequest or Img2ImgRequest, so the checks
and the answer are the API's), submits `server.generator.work(request, kind)` to `server.queue`, and streams
the job's progress and latent preview to the page until its pictures come back. No generation happens here.
"""
import concurrent.futures
import html
import time

import gradio as gr
import pydantic
from PIL import Image, UnidentifiedImageError

from ldm.generate import hires
from ldm.generate.infotext import parse_parameters
from ldm.models.diffusion import samplers
from ldm.server import pictures
from ldm.server.errors import RequestProblem
from ldm.server.jobs import QueueClosed, QueueFull
from ldm.server.schemas import Img2ImgRequest, Txt2ImgRequest

POLL_SECONDS = 0.25
SAMPLER_NAMES = [info.display_name for info in samplers.REGISTRY.values()]
SCHEDULE_LABELS = list(samplers.SCHEDULE_NAMES.values())
HIRES_UPSCALERS = [*hires.LATENT_UPSCALERS, *(name for name in hires.PIXEL_UPSCALERS if name != "None")]
RESIZE_MODES = ["Just resize", "Crop and resize", "Resize and fill"]  # A1111's resize_mode 0, 1, 2
INPAINT_FILLS = ["fill", "original"]  # A1111's inpainting_fill 0, 1
INPAINT_AREAS = ["Whole picture", "Only masked"]  # inpaint_full_res False, True
MASK_MODES = ["Inpaint masked", "Inpaint not masked"]  # inpainting_mask_invert 0, 1

# The page's inputs, in the order the Generate buttons hand them over (the names are the request's fields).
COMMON_FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
                 "n_iter", "batch_size", "seed", "subseed", "subseed_strength")
TXT2IMG_FIELDS = (*COMMON_FIELDS, "enable_hr", "hr_upscaler", "hr_scale", "hr_second_pass_steps",
                  "denoising_strength")
IMG2IMG_FIELDS = (*COMMON_FIELDS, "init_image", "denoising_strength", "resize_mode")
INPAINT_FIELDS = (*COMMON_FIELDS, "editor", "denoising_strength", "resize_mode", "mask_blur", "inpainting_fill",
                  "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert")
WHOLE_NUMBERS = ("steps", "width", "height", "n_iter", "batch_size", "seed", "subseed", "hr_second_pass_steps",
                 "mask_blur", "inpaint_full_res_padding")
# PNG Info's "Send to txt2img": the parameters text's field -> (the txt2img input it sets, the value's type)
SENT_FIELDS = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
               "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
               "Hires upscale": ("hr_scale", float), "Hires steps": ("hr_second_pass_steps", int),
               "Denoising strength": ("denoising_strength", float)}
SENT_INPUTS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "width", "height", "enable_hr",
               "hr_upscaler", *(name for name, _ in SENT_FIELDS.values()))


def _problem_text(error: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in problem['loc']) or 'request'}: {problem['msg']}"
                     for problem in error.errors())


def _request(kind: str, values: dict):
    """The API request for the page's values; gr.Error (shown on the page) naming a bad one."""
    values = {name: int(value) if name in WHOLE_NUMBERS and value is not None else value
              for name, value in values.items()}
    try:
        return Txt2ImgRequest(**values) if kind == "txt2img" else Img2ImgRequest(**values)
    except pydantic.ValidationError as error:
        raise gr.Error(_problem_text(error)) from None


def _image_request_values(values: dict, image: Image.Image | None, mask: Image.Image | None) -> dict:
    if image is None:
        raise gr.Error("no picture to start from: upload one first")
    values["init_images"] = [pictures.encode_png(image.convert("RGB"))]
    if mask is not None:
        values["mask"] = pictures.encode_png(mask)
    return values


def drawn_mask(editor: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """(the picture, a white-on-black mask of every stroke drawn over it) from an ImageEditor's value."""
    if not editor or editor.get("background") is None:
        return None, None
    background = editor["background"]
    mask = Image.new("L", background.size, 0)
    for layer in editor.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").resize(background.size, Image.NEAREST)
        mask.paste(255, (0, 0), alpha.point(lambda value: 255 if value > 0 else 0))
    return background, mask


def progress_html(snapshot: dict | None, message: str = "", fraction: float | None = None) -> str:
    """The progress bar: the fraction done, the step, the queue position and the ETA, as A1111 shows them.
    data-fraction lets a test (or a script) read it back."""
    state = (snapshot or {}).get("state", {})
    if fraction is None:
        fraction = float((snapshot or {}).get("progress", 0.0))
    if not message and snapshot is not None:
        if state.get("task_state") == "queued":
            message = f"waiting: number {state['queue_position']} in the queue"
        elif state.get("sampling_steps"):
            eta = snapshot.get("eta_relative") or 0.0
            message = (f"{fraction:.0%} · step {state['sampling_step']} of {state['sampling_steps']}"
                       f" · pass {state['job_no'] + 1}" + (f" · ETA {eta:.0f} s" if eta else ""))
        else:
            message = "starting (loading the model)"
    return (f'<div class="ldm-progress" data-fraction="{fraction:.4f}"><div class="ldm-progress-bar">'
            f'<div class="ldm-progress-fill" style="width:{100 * fraction:.1f}%"></div></div>'
            f'<span class="ldm-progress-text">{html.escape(message)}</span></div>')


def _enlarged(preview: Image.Image | None, side: int = 256) -> Image.Image | None:
    """The latent's preview (an eighth of the picture's size) blown up, so that the page shows it big enough."""
    if preview is None or max(preview.size) >= side:
        return preview
    factor = max(1, side // max(preview.size))
    return preview.resize((preview.width * factor, preview.height * factor), Image.NEAREST)


def _outcome(answer, seconds: float) -> str:
    info = answer.info
    count = len(answer.images)
    made = f"{count} picture{'s' if count != 1 else ''} in {seconds:.1f} s"
    if info.get("interrupted"):
        return f"interrupted: {made}"
    if info.get("skipped"):
        return f"skipped a batch: {made}"
    return f"done: {made}"


class PageActions:
    """The page's event handlers over one Server (ldm.server.app)."""

    def __init__(self, server):
        self.server = server

    # --- generating ------------------------------------------------------------------------------------------------
    def txt2img(self, *inputs):
        yield from self._generate("txt2img", dict(zip(TXT2IMG_FIELDS, inputs)))

    def img2img(self, *inputs):
        values = dict(zip(IMG2IMG_FIELDS, inputs))
        image = values.pop("init_image")
        yield from self._generate("img2img", _image_request_values(values, image, None))

    def inpaint(self, *inputs):
        values = dict(zip(INPAINT_FIELDS, inputs))
        image, mask = drawn_mask(values.pop("editor"))
        if mask is not None and mask.getbbox() is None:
            raise gr.Error("no mask drawn: paint over what to repaint with the brush")
        values["inpaint_full_res"] = bool(values["inpaint_full_res"])
        yield from self._generate("img2img", _image_request_values(values, image, mask))

    def _generate(self, kind: str, values: dict):
        """Yields (gallery, infotext, progress, preview, results) while the job waits and runs, then its pictures."""
        server = self.server
        request = _request(kind, values)
        try:
            work = server.generator.work(request, kind)
            ticket = server.queue.submit(work, kind)
        except (RequestProblem, QueueFull, QueueClosed) as error:
            raise gr.Error(str(error)) from None
        started, shown_step = time.monotonic(), None
        try:
            while True:
                done, _ = concurrent.futures.wait([ticket.future], timeout=POLL_SECONDS)
                if done:
                    break
                snapshot = server.queue.progress(ticket.id)
                step = (ticket.passes_done, ticket.step_index)
                latent = snapshot.pop("current_latent")
                preview = _enlarged(pictures.latent_preview(latent)) if step != shown_step and latent is not None \
                    else gr.skip()
                shown_step = step if latent is not None else shown_step
                yield gr.skip(), gr.skip(), progress_html(snapshot), preview, gr.skip()
        finally:  # the page went away (or the job ended): a job still waiting is dropped, as the API drops it
            if not ticket.future.done():
                server.queue.cancel(ticket)
        try:
            answer = ticket.future.result()
        except (RequestProblem, QueueClosed, concurrent.futures.CancelledError) as error:
            raise gr.Error(str(error) or "the job was dropped") from None
        for image, text in zip(answer.images, answer.infotexts):
            image.info["parameters"] = text  # kept in the PNG the gallery serves, for its download button
        results = {"seeds": answer.info["all_seeds"], "infotexts": answer.infotexts, "selected": 0}
        outcome = progress_html(None, _outcome(answer, time.monotonic() - started), fraction=1.0)
        yield (list(zip(answer.images, [None] * len(answer.images))), "\n\n".join(answer.infotexts[:1]), outcome,
               None, results)

    # --- the running job -------------------------------------------------------------------------------------------
    def interrupt(self):
        self.server.queue.interrupt()

    def skip(self):
        self.server.queue.skip()

    # --- the gallery and the seed buttons ------------------------------------------------------------------------
    @staticmethod
    def selected(results: dict | None, event: gr.SelectData):
        """A picture picked in the gallery: its infotext, and the seed the recycle button brings back."""
        if not results or event.index is None or event.index >= len(results["infotexts"]):
            return gr.skip(), results
        return results["infotexts"][event.index], {**results, "selected": event.index}

    @staticmethod
    def last_seed(results: dict | None, seed):
        """The recycle button: the seed of the picture picked in the gallery (the first by default)."""
        if not results or not results["seeds"]:
            return seed
        return results["seeds"][min(results["selected"], len(results["seeds"]) - 1)]

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint_choices(self):
        """The dropdown's names (the folders looked at again) and the one the options name."""
        self.server.folders.refresh()
        names = [entry.name for entry in self.server.folders.checkpoints]
        return gr.Dropdown(choices=names, value=self.server.settings.snapshot()["sd_model_checkpoint"])

    def switch_checkpoint(self, name: str):
        """Load the checkpoint through the queue (as POST /sdapi/v1/options does; on failure the option goes
        back). Returns the status line and the model's native size, for the size sliders of every tab."""
        server = self.server
        before = server.settings.snapshot()["sd_model_checkpoint"]
        if name and (name != before or server.resident.pipeline is None):
            try:
                server.settings.update({"sd_model_checkpoint": name})
                server.queue.submit(server.generator.load_work(), "load model").future.result()
            except (RequestProblem, QueueFull, QueueClosed) as error:
                server.settings.update({"sd_model_checkpoint": before})
                raise gr.Error(f"{name} was not loaded: {error}") from None
        pipeline = server.resident.pipeline
        size = pipeline.loaded.native_size if pipeline is not None else gr.skip()
        return f"loaded: {server.settings.snapshot()['sd_model_checkpoint']}", size

    # --- PNG Info ------------------------------------------------------------------------------------------------
    @staticmethod
    def png_info(path: str | None):
        """(the parameters text, the PNG's other text chunks as HTML) of an uploaded picture."""
        if not path:
            return "", ""
        try:
            with Image.open(path) as image:
                chunks = {key: value for key, value in image.info.items() if isinstance(value, str)}
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise gr.Error(f"not a picture PIL can read ({type(error).__name__})") from None
        text = chunks.pop("parameters", "")
        if not text and not chunks:
            return "", "<p>this picture carries no generation parameters</p>"
        rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"
                       for key, value in chunks.items())
        return text, f"<table>{rows}</table>" if rows else ""

    @staticmethod
    def sent_to_txt2img(text: str):
        """The txt2img inputs (SENT_INPUTS order) a parameters text sets; gr.skip() for those it does not."""
        if not text or not text.strip():
            raise gr.Error("no parameters to send: read a PNG with generation parameters first")
        prompt, negative, fields = parse_parameters(text)
        values = dict.fromkeys(SENT_INPUTS, gr.skip())
        values.update(prompt=prompt, negative_prompt=negative)
        for field, (name, kind) in SENT_FIELDS.items():
            try:
                values[name] = kind(fields[field]) if field in fields else gr.skip()
            except ValueError:
                gr.Warning(f"{field}: {fields[field]!r} is not a number; left as it was")
        if "Sampler" in fields:
            try:
                key, schedule = samplers.resolve_sampler(fields["Sampler"])
                values["sampler_name"] = samplers.REGISTRY[key].display_name
                if schedule:
                    values["scheduler"] = samplers.SCHEDULE_NAMES[schedule]
            except ValueError:
                gr.Warning(f"sampler {fields['Sampler']!r} is not one of ours; left as it was")
        if fields.get("Schedule type") in SCHEDULE_LABELS:
            values["scheduler"] = fields["Schedule type"]
        width, _, height = fields.get("Size", "").partition("x")
        if width.isdigit() and height.isdigit():
            values.update(width=int(width), height=int(height))
        values["enable_hr"] = "Hires upscale" in fields or "Hires resize" in fields
        if fields.get("Hires upscaler") in HIRES_UPSCALERS:
            values["hr_upscaler"] = fields["Hires upscaler"]
        return [values[name] for name in SENT_INPUTS] + [gr.Tabs(selected="txt2img")]
