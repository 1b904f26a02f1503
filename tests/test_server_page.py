"""The web page (ldm.server.page, Gradio at "/"): its handlers on the server's shared queue, on tiny models, and
the page itself in a real browser (Debian's chromium driven by Playwright, offline): a prompt typed and
generated with the progress bar moving, the seed buttons, Interrupt during a long run, PNG Info sent to txt2img."""
import base64
import contextlib
import importlib.util
import io
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("fastapi")
gr = pytest.importorskip("gradio")
# gradio's own queue bookkeeping against pandas 3: not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
from fastapi.testclient import TestClient  # noqa: E402

from ldm.server import cli  # noqa: E402
from ldm.server.app import ServerConfig, create_app  # noqa: E402
from ldm.server.page import mount_page  # noqa: E402
from ldm.server.page_actions import IMG2IMG_FIELDS, SENT_INPUTS, TXT2IMG_FIELDS, PageActions, drawn_mask  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# flags that keep headless chromium from reaching the network by itself (updates, sync, field trials)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGE_TIMEOUT_MS = 120_000
# A1111's own parameters text (its older combined sampler name), as a PNG saved by A1111 carries it
A1111_TEXT = ("a blue square, (masterpiece:1.2)\nNegative prompt: blurry\nSteps: 7, Sampler: DPM++ 2M Karras, "
              "CFG scale: 5.5, Seed: 4242, Size: 96x72, Model hash: abcdef1234, Model: foreign, "
              "Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (nearest)")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(models / "Stable-diffusion", "alpha.safetensors", seed=0)
    write_tiny_checkpoint(models / "ldm", "beta.safetensors", seed=1)
    return models


def make_app(models_dir, tmp_path, **config):
    return create_app(ServerConfig(models_dir=models_dir, output_root=tmp_path, device="cpu", log=lambda *a: None,
                                   **config))


def txt2img_inputs(**values) -> list:
    defaults = {"prompt": "a red circle", "negative_prompt": "", "sampler_name": "Euler a", "scheduler": "Automatic",
                "steps": 3, "cfg_scale": 7.0, "width": 64, "height": 64, "n_iter": 1, "batch_size": 1, "seed": 5.0,
                "subseed": -1.0, "subseed_strength": 0.0, "enable_hr": False, "hr_upscaler": "Latent",
                "hr_scale": 2.0, "hr_second_pass_steps": 0, "denoising_strength": 0.7}
    return [{**defaults, **values}[name] for name in TXT2IMG_FIELDS]


def png_with_text(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32), (0, 0, 200)).save(path, pnginfo=info)
    return path


# --- the handlers, in-process ------------------------------------------------------------------------------------
def test_page_jobs_go_through_the_api_queue(models_dir, tmp_path):
    app = make_app(models_dir, tmp_path)
    server = app.state.server
    submitted = []
    submit = server.queue.submit
    server.queue.submit = lambda work, label, ticket_id=None: submitted.append(label) or submit(work, label, ticket_id)
    try:
        updates = list(PageActions(server).txt2img(*txt2img_inputs(steps=100, n_iter=2, batch_size=2)))
    finally:
        server.shutdown()
    assert submitted == ["txt2img"]
    gallery, infotext, progress, preview, results = updates[-1]
    assert len(gallery) == 4 and all(image.size == (64, 64) for image, _ in gallery)
    assert results["seeds"] == [5, 6, 7, 8]  # A1111's seeds: one per picture, counting up
    assert gallery[1][0].info["parameters"] == results["infotexts"][1]  # the PNG the page serves keeps it
    assert infotext.startswith("a red circle\nSteps: 100, Sampler: Euler a") and "Seed: 5," in infotext
    assert 'data-fraction="1.0000"' in progress and "done: 4 pictures" in progress
    running = [update[2] for update in updates[:-1] if isinstance(update[2], str) and "step" in update[2]]
    assert running, "no progress was shown while the job ran"


def test_img2img_and_checkpoint_switching_from_the_page(models_dir, tmp_path):
    app = make_app(models_dir, tmp_path)
    server, actions = app.state.server, PageActions(app.state.server)
    try:
        status, size = actions.switch_checkpoint("beta.safetensors")
        assert status == "loaded: beta.safetensors" and size == 64
        assert server.resident.key[0].name == "beta.safetensors"
        with pytest.raises(gr.Error) as refused:
            actions.switch_checkpoint("nonesuch")
        assert "no checkpoint named 'nonesuch'" in refused.value.message
        assert server.settings.snapshot()["sd_model_checkpoint"] == "beta.safetensors"  # the option went back
        assert actions.checkpoint_choices().choices == [("alpha.safetensors", "alpha.safetensors"),
                                                        ("beta.safetensors", "beta.safetensors")]
        values = dict(zip(TXT2IMG_FIELDS, txt2img_inputs(width=48, height=40)))
        inputs = [{**values, "init_image": Image.new("RGB", (96, 80), (0, 0, 200)), "denoising_strength": 0.5,
                   "resize_mode": 1}[name] for name in IMG2IMG_FIELDS]
        gallery, infotext, *_ = list(actions.img2img(*inputs))[-1]
        assert [image.size for image, _ in gallery] == [(48, 40)] and "Denoising strength: 0.5" in infotext
        assert "Model: beta" in infotext
    finally:
        server.shutdown()


def test_a_bad_value_is_one_message_on_the_page(models_dir, tmp_path):
    app = make_app(models_dir, tmp_path)
    try:
        with pytest.raises(gr.Error) as refused:
            next(PageActions(app.state.server).txt2img(*txt2img_inputs(cfg_scale=500.0)))
        assert refused.value.message.startswith("cfg_scale: Input should be less than or equal to 100")
        with pytest.raises(gr.Error) as refused:
            next(PageActions(app.state.server).txt2img(*txt2img_inputs(sampler_name="Nonesuch")))
        assert refused.value.message.startswith("sampler_name: invalid choice 'Nonesuch': choose one of")
    finally:
        app.state.server.shutdown()


def test_seed_buttons_and_gallery_selection():
    results = {"seeds": [11, 12], "infotexts": ["first", "second"], "selected": 0}
    assert PageActions.last_seed(None, -1) == -1
    assert PageActions.last_seed(results, -1) == 11
    text, picked = PageActions.selected(results, gr.SelectData(None, {"index": 1, "value": None}))
    assert text == "second" and PageActions.last_seed(picked, -1) == 12


def test_png_info_sends_a1111_settings_to_txt2img(tmp_path):
    text, other = PageActions.png_info(str(png_with_text(tmp_path / "a1111.png", A1111_TEXT)))
    assert text == A1111_TEXT and other == ""
    sent = dict(zip([*SENT_INPUTS, "tabs"], PageActions.sent_to_txt2img(text)))
    assert sent["prompt"] == "a blue square, (masterpiece:1.2)" and sent["negative_prompt"] == "blurry"
    assert (sent["sampler_name"], sent["scheduler"]) == ("DPM++ 2M", "Karras")  # the combined name split
    assert (sent["steps"], sent["cfg_scale"], sent["seed"], sent["width"], sent["height"]) == (7, 5.5, 4242, 96, 72)
    assert sent["enable_hr"] is True and sent["hr_upscaler"] == "Latent (nearest)" and sent["hr_scale"] == 1.5
    assert sent["denoising_strength"] == 0.45 and sent["hr_second_pass_steps"] == 3
    assert sent["subseed"] == gr.skip()  # a field the text does not hold leaves the page's value alone
    assert sent["tabs"].selected == "txt2img"
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert PageActions.png_info(str(plain)) == ("", "<p>this picture carries no generation parameters</p>")
    with pytest.raises(gr.Error) as refused:
        PageActions.sent_to_txt2img("")
    assert refused.value.message.startswith("no parameters to send")


def test_drawn_strokes_become_the_mask():
    background = Image.new("RGBA", (32, 24), (10, 20, 30, 255))
    stroke = Image.new("RGBA", (32, 24), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 128), (4, 4, 10, 12))
    picture, mask = drawn_mask({"background": background, "layers": [stroke], "composite": None})
    assert picture is background and mask.mode == "L" and mask.getbbox() == (4, 4, 10, 12)
    assert mask.getpixel((5, 5)) == 255 and mask.getpixel((20, 20)) == 0
    assert drawn_mask(None) == (None, None)


def test_page_is_mounted_beside_the_api_and_asks_for_the_api_users(models_dir, tmp_path):
    app = make_app(models_dir, tmp_path)
    mount_page(app)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert client.get("/sdapi/v1/samplers").status_code == 200  # the API's routes come first
        assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]
    secured = make_app(models_dir, tmp_path, api_auth={"ann": "secret"})
    mount_page(secured, {"ann": "secret"})
    with TestClient(secured) as client:
        assert client.get("/config").status_code == 401  # the page's setup is not given without a login
        assert client.post("/login/", data={"username": "ann", "password": "wrong"}).status_code == 400
        assert client.post("/login/", data={"username": "ann", "password": "secret"}).status_code == 200
        assert client.get("/config").status_code == 200


def test_serve_mounts_the_page_unless_gradio_is_missing(models_dir, tmp_path, monkeypatch, capsys):
    app = make_app(models_dir, tmp_path)
    cli._mount_page(app, {}, "http://127.0.0.1:7860/")
    assert [route.path for route in app.routes][-1] == "" and "the web page: http://127.0.0.1:7860/" in \
        capsys.readouterr().out  # the page's mount at "/", after every API route
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gradio" else real_find_spec(name, *args))
    api_only = make_app(models_dir, tmp_path)
    routes = len(api_only.routes)
    cli._mount_page(api_only, {}, "http://127.0.0.1:7860/")
    assert len(api_only.routes) == routes
    assert "no web page: gradio is not installed" in capsys.readouterr().err
    assert cli.parse_args(["--nowebui"]).nowebui


# --- the page in a browser ---------------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    """The API with the page, under uvicorn on a free loopback port (in a thread of this process)."""
    import uvicorn

    app = make_app(models_dir, tmp_path_factory.mktemp("out"))
    mount_page(app)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield app, f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        pytest.skip(f"browser tests need chromium and playwright: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM,
                                              args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, served):
    """A fresh tab on the page, with every request that would leave the loopback address refused and noted."""
    _, base = served
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    tab.set_default_timeout(PAGE_TIMEOUT_MS)
    outside = []

    def only_loopback(route):
        url = route.request.url
        if url.startswith((base, "data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    tab.route("**/*", only_loopback)
    tab.goto(base + "/")
    tab.wait_for_function("document.querySelector('#model_status')?.innerText.includes('loaded:')")
    yield tab
    tab.close()
    assert outside == [], f"the page reached outside the server: {outside}"


def set_number(tab, selector: str, value):
    field = tab.locator(f"{selector} input[type=number]").first if "seed" not in selector else \
        tab.locator(f"{selector} input").first
    field.fill(str(value))
    field.press("Enter")


def progress_texts(tab, prefix: str):
    """Record every value the progress bar takes from now on (a MutationObserver: no poll misses one)."""
    tab.evaluate("""prefix => {
        window.progressSeen = [];
        const box = document.querySelector(`#${prefix}_progress`);
        const note = () => { const bar = box.querySelector('.ldm-progress');
                             if (bar) window.progressSeen.push([bar.dataset.fraction, bar.innerText]); };
        new MutationObserver(note).observe(box, {subtree: true, childList: true, attributes: true,
                                                 characterData: true});
    }""", prefix)
    return lambda: [(float(fraction), text) for fraction, text in tab.evaluate("window.progressSeen")]


def wait_for_progress_text(tab, prefix: str, words: str):
    tab.wait_for_function("([prefix, words]) => document.querySelector(`#${prefix}_progress`)"
                          "?.innerText.includes(words)", arg=[prefix, words])


def test_browser_generates_with_a_moving_progress_bar(page, served):
    assert page.input_value("#txt2img_width input[type=number]") == "64"  # the model's native size, once loaded
    page.fill("#txt2img_prompt textarea", "a red circle on the left")
    set_number(page, "#txt2img_steps", 150)
    set_number(page, "#txt2img_batch_size", 2)
    set_number(page, "#txt2img_seed", 1234)
    seen = progress_texts(page, "txt2img")
    page.click("#txt2img_generate")
    wait_for_progress_text(page, "txt2img", "done: 2 pictures")
    page.wait_for_selector("#txt2img_gallery img")
    infotext = page.input_value("#txt2img_infotext textarea")
    assert infotext.startswith("a red circle on the left\nSteps: 150, Sampler: Euler a") and "Seed: 1234," in infotext
    fractions = [fraction for fraction, _ in seen()]
    moving = [fraction for fraction in fractions if 0 < fraction < 1]
    assert moving and fractions == sorted(fractions), fractions  # it moved, forward only
    assert any("step" in text for _, text in seen())
    page.locator("#txt2img_gallery button.thumbnail-item").nth(1).click()  # the second picture: its own infotext
    page.wait_for_function("document.querySelector('#txt2img_infotext textarea').value.includes('Seed: 1235,')")
    page.click("#txt2img_random_seed")
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '-1'")
    page.click("#txt2img_reuse_seed")  # the picked picture's seed
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '1235'")


def test_browser_interrupt_stops_a_long_run(page, served):
    app, _ = served
    page.fill("#txt2img_prompt textarea", "a long run")
    set_number(page, "#txt2img_steps", 150)
    set_number(page, "#txt2img_batch_count", 40)
    seen = progress_texts(page, "txt2img")
    page.click("#txt2img_generate")
    page.wait_for_function("parseFloat(document.querySelector('#txt2img_progress .ldm-progress')"
                           "?.dataset.fraction) > 0")
    assert app.state.server.queue.progress()["state"]["job"] == "txt2img"  # the page's job, on the API's queue
    started = time.monotonic()
    page.click("#txt2img_interrupt")
    wait_for_progress_text(page, "txt2img", "interrupted")
    assert time.monotonic() - started < 30  # 6000 steps were asked for: it stopped at the next one
    assert max(fraction for fraction, _ in seen() if fraction < 1) < 0.5
    assert app.state.server.queue.running is None


def test_browser_png_info_sends_its_settings_to_txt2img(page, tmp_path):
    page.get_by_role("tab", name="PNG Info").click()
    page.set_input_files("#png_info_image input[type=file]", str(png_with_text(tmp_path / "a1111.png", A1111_TEXT)))
    page.wait_for_function("document.querySelector('#png_info_parameters textarea')?.value.includes('Seed: 4242')")
    page.click("#png_info_send_to_txt2img")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value.startsWith('a blue square')")
    assert page.get_by_role("tab", name="txt2img").get_attribute("aria-selected") == "true"
    assert page.input_value("#txt2img_negative textarea") == "blurry"
    assert page.input_value("#txt2img_steps input[type=number]") == "7"
    assert page.input_value("#txt2img_width input[type=number]") == "96"
    assert page.input_value("#txt2img_seed input") == "4242"
    assert page.input_value("#txt2img_sampler input") == "DPM++ 2M"
    assert page.input_value("#txt2img_scheduler input") == "Karras"


@pytest.mark.slow  # the longest of these (the editor's canvas, its layers uploaded): -m slow runs it
def test_browser_inpaints_with_the_mask_drawn_in_the_page(page, served, tmp_path, monkeypatch):
    app, _ = served
    generator, requests = app.state.server.generator, []
    work = generator.work
    monkeypatch.setattr(generator, "work", lambda request, kind: requests.append(request) or work(request, kind))
    Image.new("RGB", (64, 64), (30, 60, 200)).save(tmp_path / "blue.png")
    page.get_by_role("tab", name="Inpaint").click()
    # a file chosen before the editor has mounted its canvas is dropped (seen in about half the runs)
    page.wait_for_selector("#inpaint_editor canvas")
    page.set_input_files("#inpaint_editor input[type=file]", str(tmp_path / "blue.png"))
    page.locator("#inpaint_editor button[aria-label='Brush']").click()
    # the picture sits in the middle of the canvas, shown at the zoom the editor's toolbar reads out. Until the
    # upload has reached the canvas the editor shows its blank 800-pixel canvas below 100 %, and a stroke drawn then
    # lands on that blank canvas: wait for the 64-pixel picture, which fits the canvas enlarged.
    page.wait_for_function("(/(\\d+)%/.exec(document.querySelector('#inpaint_editor').innerText) || [0, 0])[1] > 100")
    zoom = int(re.search(r"(\d+)%", page.inner_text("#inpaint_editor")).group(1)) / 100
    box = page.locator("#inpaint_editor canvas").first.bounding_box()
    centre_x, centre_y, shown = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 64 * zoom
    page.mouse.move(centre_x - 0.35 * shown, centre_y - 0.35 * shown)  # a stroke in the picture's top left corner
    page.mouse.down()
    page.mouse.move(centre_x - 0.3 * shown, centre_y - 0.3 * shown, steps=5)
    page.mouse.up()
    page.fill("#inpaint_prompt textarea", "a red circle")
    set_number(page, "#inpaint_steps", 4)
    page.click("#inpaint_generate")
    wait_for_progress_text(page, "inpaint", "done: 1 picture")
    page.wait_for_selector("#inpaint_gallery img")
    [request] = requests
    mask = Image.open(io.BytesIO(base64.b64decode(request.mask)))
    assert mask.size == (64, 64) and mask.getpixel((10, 10)) == 255 and mask.getpixel((62, 62)) == 0, mask.getbbox()
    assert (request.width, request.height, request.inpaint_full_res) == (64, 64, False)
