"""The web page: a Gradio UI (what AUTOMATIC1111's web UI is built on) mounted at "/" on the API's FastAPI app.

Tabs txt2img, img2img, Inpaint (the mask drawn in the page) and PNG Info; a checkpoint dropdown; the live
progress bar with the latent preview, Interrupt and Skip. Every button goes through the server's one job
queue (page_actions.py), so page and API share one model, one order and one progress. It works offline:
Gradio's telemetry is off and the page loads nothing from outside the server.
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads it then
import gradio as gr  # noqa: E402

from ldm.server.page_actions import (  # noqa: E402
    HIRES_UPSCALERS, IMG2IMG_FIELDS, INPAINT_AREAS, INPAINT_FIELDS, INPAINT_FILLS, MASK_MODES, RESIZE_MODES,
    SAMPLER_NAMES, SCHEDULE_LABELS, SENT_INPUTS, TXT2IMG_FIELDS, PageActions, progress_html)

TITLE = "Stable Diffusion (ldm)"
# the dice, recycle and refresh buttons' symbols: text ones, drawn by common fonts (DejaVu) where emoji are not
DEFAULT_SIZE = 512  # A1111's; the page sets the loaded model's native size once it is known
PAGE_CSS = """
.ldm-progress { display: flex; flex-direction: column; gap: 4px; }
.ldm-progress-bar { height: 14px; border-radius: 7px; overflow: hidden; background: var(--neutral-200); }
.ldm-progress-fill { height: 100%; background: var(--color-accent); transition: width 0.2s linear; }
.ldm-progress-text { font-size: var(--text-sm); color: var(--body-text-color-subdued); }
.ldm-tool { max-width: 44px; min-width: 44px !important; }
"""


def _slider(label, minimum, maximum, step, value, elem_id=None):
    return gr.Slider(minimum=minimum, maximum=maximum, step=step, value=value, label=label, elem_id=elem_id)


def _generation_tab(prefix: str, actions: PageActions, image_inputs=None, after_steps=None, last=None) -> dict:
    """One generation tab's controls, named as the request's fields. image_inputs, after_steps and last add the
    tab's own controls (they return {field: component}) at their places in the settings column."""
    fields = {}
    with gr.Row():
        with gr.Column(scale=4):
            fields["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{prefix}_prompt",
                                          placeholder="Prompt (A1111's syntax: (emphasis:1.2), [from:to:when], "
                                                      "<lora:name:weight>)")
            fields["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{prefix}_negative")
        with gr.Column(scale=1, min_width=200):
            generate = gr.Button("Generate", variant="primary", size="lg", elem_id=f"{prefix}_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt")
                skip = gr.Button("Skip", elem_id=f"{prefix}_skip")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            if image_inputs:
                fields.update(image_inputs())
            with gr.Row():
                fields["sampler_name"] = gr.Dropdown(SAMPLER_NAMES, value="Euler a", label="Sampling method",
                                                     elem_id=f"{prefix}_sampler")
                fields["scheduler"] = gr.Dropdown(SCHEDULE_LABELS, value="Automatic", label="Schedule type",
                                                  elem_id=f"{prefix}_scheduler")
            fields["steps"] = _slider("Sampling steps", 1, 150, 1, 20, f"{prefix}_steps")
            if after_steps:
                fields.update(after_steps())
            with gr.Row():
                fields["width"] = _slider("Width", 64, 2048, 8, DEFAULT_SIZE, f"{prefix}_width")
                fields["height"] = _slider("Height", 64, 2048, 8, DEFAULT_SIZE, f"{prefix}_height")
            with gr.Row():
                fields["n_iter"] = _slider("Batch count", 1, 100, 1, 1, f"{prefix}_batch_count")
                fields["batch_size"] = _slider("Batch size", 1, 8, 1, 1, f"{prefix}_batch_size")
            fields["cfg_scale"] = _slider("CFG Scale", 1, 30, 0.5, 7, f"{prefix}_cfg")
            with gr.Row():
                fields["seed"] = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id=f"{prefix}_seed",
                                           scale=4)
                dice = gr.Button("⚄", elem_id=f"{prefix}_random_seed", elem_classes="ldm-tool", scale=0)
                recycle = gr.Button("♻", elem_id=f"{prefix}_reuse_seed", elem_classes="ldm-tool", scale=0)
            with gr.Accordion("Variation seed", open=False):
                with gr.Row():
                    fields["subseed"] = gr.Number(-1, precision=0, label="Variation seed", elem_id=f"{prefix}_subseed")
                    fields["subseed_strength"] = _slider("Variation strength", 0, 1, 0.01, 0,
                                                         f"{prefix}_subseed_strength")
            if last:
                fields.update(last())
        with gr.Column(scale=1):
            progress = gr.HTML(progress_html(None, "idle", 0.0), elem_id=f"{prefix}_progress")
            preview = gr.Image(label="Live preview", interactive=False, height=160, elem_id=f"{prefix}_preview")
            gallery = gr.Gallery(label="Output", format="png", columns=2, object_fit="contain",
                                 elem_id=f"{prefix}_gallery")
            infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                  elem_id=f"{prefix}_infotext")
    results = gr.State(None)
    names = {"txt2img": TXT2IMG_FIELDS, "img2img": IMG2IMG_FIELDS, "inpaint": INPAINT_FIELDS}[prefix]
    handler = {"txt2img": actions.txt2img, "img2img": actions.img2img, "inpaint": actions.inpaint}[prefix]
    # concurrency_limit=None: Gradio lets every press through and the server's own queue orders the jobs, as it
    # does the API's; show_progress="hidden": the page's progress bar is the queue's, not Gradio's spinner
    generate.click(handler, [fields[name] for name in names], [gallery, infotext, progress, preview, results],
                   concurrency_limit=None, show_progress="hidden")
    interrupt.click(actions.interrupt, concurrency_limit=None, show_progress="hidden")
    skip.click(actions.skip, concurrency_limit=None, show_progress="hidden")
    dice.click(lambda: -1, None, fields["seed"], show_progress="hidden")
    recycle.click(actions.last_seed, [results, fields["seed"]], fields["seed"], show_progress="hidden")
    gallery.select(actions.selected, results, [infotext, results], show_progress="hidden")
    return fields


def _hires_controls() -> dict:
    with gr.Accordion("Hires. fix", open=False):
        controls = {"enable_hr": gr.Checkbox(False, label="Hires. fix", elem_id="txt2img_enable_hr")}
        with gr.Row():
            controls["hr_upscaler"] = gr.Dropdown(HIRES_UPSCALERS, value="Latent", label="Upscaler",
                                                  elem_id="txt2img_hr_upscaler")
            controls["hr_scale"] = _slider("Upscale by", 1, 4, 0.05, 2, "txt2img_hr_scale")
        with gr.Row():
            controls["hr_second_pass_steps"] = _slider("Hires steps (0: as many as the first pass)", 0, 150, 1, 0,
                                                       "txt2img_hr_steps")
            controls["denoising_strength"] = _slider("Denoising strength", 0, 1, 0.01, 0.7,
                                                     "txt2img_denoising_strength")
    return controls


def _img2img_controls(prefix: str) -> dict:
    return {"denoising_strength": _slider("Denoising strength", 0, 1, 0.01, 0.75, f"{prefix}_denoising_strength"),
            "resize_mode": gr.Radio(RESIZE_MODES, value=RESIZE_MODES[0], type="index", label="Resize mode",
                                    elem_id=f"{prefix}_resize_mode")}


def _inpaint_controls() -> dict:
    controls = _img2img_controls("inpaint")
    with gr.Row():
        controls["mask_blur"] = _slider("Mask blur", 0, 64, 1, 4, "inpaint_mask_blur")
        controls["inpaint_full_res_padding"] = _slider("Only masked padding, pixels", 0, 256, 4, 32,
                                                       "inpaint_padding")
    with gr.Row():
        controls["inpainting_mask_invert"] = gr.Radio(MASK_MODES, value=MASK_MODES[0], type="index",
                                                      label="Mask mode", elem_id="inpaint_mask_mode")
        controls["inpainting_fill"] = gr.Radio(INPAINT_FILLS, value=INPAINT_FILLS[1], type="index",
                                               label="Masked content", elem_id="inpaint_fill")
        controls["inpaint_full_res"] = gr.Radio(INPAINT_AREAS, value=INPAINT_AREAS[0], type="index",
                                                label="Inpaint area", elem_id="inpaint_area")
    return controls


def _png_info_tab(actions: PageActions, txt2img: dict, tabs):
    with gr.Row(equal_height=False):
        with gr.Column():
            picture = gr.Image(label="Source", type="filepath", sources=["upload", "clipboard"],
                               elem_id="png_info_image")
        with gr.Column():
            parameters = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="png_info_parameters")
            other = gr.HTML(elem_id="png_info_other")
            send = gr.Button("Send to txt2img", variant="primary", elem_id="png_info_send_to_txt2img")
    picture.change(actions.png_info, picture, [parameters, other], show_progress="hidden")
    send.click(actions.sent_to_txt2img, parameters, [*(txt2img[name] for name in SENT_INPUTS), tabs],
               show_progress="hidden")


def build_page(server) -> gr.Blocks:
    """The Blocks over `server` (ldm.server.app.Server): its queue, options and model folders."""
    actions = PageActions(server)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(900, 3600)) as page:
        with gr.Row():
            checkpoint = gr.Dropdown(label="Stable Diffusion checkpoint", elem_id="checkpoint", scale=4,
                                     choices=[entry.name for entry in server.folders.checkpoints],
                                     value=server.settings.snapshot()["sd_model_checkpoint"])
            refresh = gr.Button("↻", elem_id="refresh_checkpoints", elem_classes="ldm-tool", scale=0)
            model_status = gr.Markdown("", elem_id="model_status")
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                txt2img = _generation_tab("txt2img", actions, after_steps=_hires_controls)
            with gr.Tab("img2img", id="img2img"):
                img2img = _generation_tab("img2img", actions, last=lambda: _img2img_controls("img2img"), image_inputs=(
                    lambda: {"init_image": gr.Image(label="Picture to start from", type="pil", image_mode="RGB",
                                                    sources=["upload", "clipboard"], elem_id="img2img_image")}))
            with gr.Tab("Inpaint", id="inpaint"):
                inpaint = _generation_tab("inpaint", actions, last=_inpaint_controls, image_inputs=(
                    lambda: {"editor": gr.ImageEditor(label="Picture, and the mask drawn over it with the brush",
                                                      type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                                                      layers=False, transforms=(), format="png",
                                                      brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                                      elem_id="inpaint_editor")}))
            with gr.Tab("PNG Info", id="png_info"):
                _png_info_tab(actions, txt2img, tabs)
        sizes = [tab[side] for tab in (txt2img, img2img, inpaint) for side in ("width", "height")]

        def switched(name):
            status, size = actions.switch_checkpoint(name)
            return [status, *[size] * len(sizes)]

        checkpoint.input(switched, checkpoint, [model_status, *sizes], concurrency_limit=None)
        refresh.click(actions.checkpoint_choices, None, checkpoint, show_progress="hidden")
        # opening the page loads the model (A1111 loads it at start) and sets the sizes to its native size
        page.load(actions.checkpoint_choices, None, checkpoint, show_progress="hidden").then(
            switched, checkpoint, [model_status, *sizes], concurrency_limit=None, show_progress="hidden")
    return page


def mount_page(app, users: dict | None = None):
    """The page at "/" of the API's app; with users (--api-auth), Gradio's login asks for the same names."""
    page = build_page(app.state.server)
    # footer_links: no "Use via API" (that is Gradio's own API; ours is /sdapi/v1, /docs); run_history: the
    # browser keeps no record of prompts
    return gr.mount_gradio_app(app, page, path="/", auth=list(users.items()) if users else None,
                               footer_links=["settings"], run_history=False, css=PAGE_CSS, ssr_mode=False)
