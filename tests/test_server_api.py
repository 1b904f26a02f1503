"""The A1111-compatible HTTP API (ldm.server) on tiny models: answers, seeds, options and model switching,
progress, interrupt and skip, png-info, refusals (422, 401, 413, 503), and the real `webuiapi` client against
a uvicorn server on a loopback port."""
import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import free_port, png_b64, script_environment, serving  # noqa: E402
from ldm.generate.options import run_cli  # noqa: E402
from ldm.server import cli  # noqa: E402
from ldm.server.app import ServerConfig, create_app  # noqa: E402
from ldm.server.jobs import JobQueue, QueueFull  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

QUICK = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler a", "seed": 100}
# A1111's answer to /txt2img: these keys, and an info JSON string holding at least these (its processing.js())
ANSWER_KEYS = {"images", "parameters", "info"}
INFO_KEYS = {"seed", "all_seeds", "subseed", "all_subseeds", "prompt", "all_prompts", "negative_prompt", "infotexts",
             "sampler_name", "steps", "cfg_scale", "width", "height", "sd_model_name", "sd_model_hash"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(models / "Stable-diffusion", "alpha.safetensors", seed=0)
    write_tiny_checkpoint(models / "ldm" / "sub", "beta.safetensors", seed=1)
    return models


def make_client(models_dir, tmp_path, **config) -> TestClient:
    settings = dict(models_dir=models_dir, output_root=tmp_path, device="cpu", log=lambda *args: None)
    return TestClient(create_app(ServerConfig(**{**settings, **config})))


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    with make_client(models_dir, tmp_path_factory.mktemp("out")) as test_client:
        yield test_client


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def random_picture(seed=0, size=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def post_ok(client, path, body) -> tuple[dict, dict]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == ANSWER_KEYS
    return answer, json.loads(answer["info"])


def test_txt2img_batches_seeds_and_infotexts(client):
    answer, info = post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "batch_size": 2, "n_iter": 2,
                                                         "negative_prompt": "blurry"})
    assert INFO_KEYS <= set(info)
    assert info["all_seeds"] == [100, 101, 102, 103] and info["seed"] == 100  # A1111: image k has seed + k
    assert len(answer["images"]) == 4 and len(info["infotexts"]) == 4
    for k, (image_text, infotext) in enumerate(zip(answer["images"], info["infotexts"])):
        image = decoded(image_text)
        assert image.size == (64, 64)
        assert image.text["parameters"] == infotext
        assert infotext.startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
        assert f"Seed: {100 + k}," in infotext and "Size: 64x64" in infotext and "Model: alpha" in infotext
    assert answer["parameters"]["batch_size"] == 2 and answer["parameters"]["restore_faces"] is None
    again, again_info = post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "seed": 102, "batch_size": 2,
                                                               "negative_prompt": "blurry"})
    assert again_info["all_seeds"] == [102, 103] and again_info["infotexts"] == info["infotexts"][2:]
    assert np.array_equal(np.asarray(decoded(again["images"][0])), np.asarray(decoded(answer["images"][2])))


def test_variation_seeds_and_random_seed(client):
    _, info = post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "batch_size": 2, "subseed": 7, "subseed_strength": 0.5})
    assert info["all_seeds"] == [100, 100] and info["all_subseeds"] == [7, 8]
    assert "Variation seed: 8, Variation seed strength: 0.5" in info["infotexts"][1]
    _, random_info = post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "seed": -1})
    assert random_info["seed"] >= 0 and f"Seed: {random_info['seed']}," in random_info["infotexts"][0]


def test_img2img_and_inpainting(client):
    init = random_picture(1)
    answer, info = post_ok(client, "/sdapi/v1/img2img", {**QUICK, "init_images": [png_b64(init)],
                                                         "denoising_strength": 0.5})
    assert "Denoising strength: 0.5" in info["infotexts"][0] and decoded(answer["images"][0]).size == (64, 64)
    assert answer["parameters"]["init_images"] is None  # A1111 leaves the pictures out of the echo
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:16, :16] = 255
    body = {**QUICK, "init_images": ["data:image/png;base64," + png_b64(init)], "mask": png_b64(Image.fromarray(mask)),
            "inpainting_fill": 1, "inpaint_full_res": False, "mask_blur": 0, "denoising_strength": 1.0}
    answer, _ = post_ok(client, "/sdapi/v1/img2img", body)
    out = np.asarray(decoded(answer["images"][0]).convert("RGB"))
    assert np.array_equal(out[40:, 40:], np.asarray(init)[40:, 40:])  # far from the mask: the input's own
    assert not np.array_equal(out[:16, :16], np.asarray(init)[:16, :16])
    # "only masked" (webuiapi's default): the crop is repainted at width x height and pasted back
    body.update(inpaint_full_res=True, inpaint_full_res_padding=4, width=32, height=32)
    answer, _ = post_ok(client, "/sdapi/v1/img2img", body)
    out = np.asarray(decoded(answer["images"][0]).convert("RGB"))
    assert out.shape == (64, 64, 3) and np.array_equal(out[32:, 32:], np.asarray(init)[32:, 32:])


def test_options_and_model_switching(client, tmp_path):
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("alpha.safetensors")
    titles = [model["title"] for model in client.get("/sdapi/v1/sd-models").json()]
    assert len(titles) == 2 and any(title.startswith("sub/beta.safetensors") for title in titles)
    resident = client.app.state.server.resident
    response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/beta.safetensors"})
    assert response.status_code == 200, response.text
    assert resident.key[0].name == "beta.safetensors"  # loaded at once, the old one given up
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("sub/beta.safetensors [")
    _, info = post_ok(client, "/sdapi/v1/txt2img", QUICK)
    assert "Model: beta" in info["infotexts"][0]
    _, info = post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "override_settings": {"sd_model_checkpoint": "alpha",
                                                                                    "eta_noise_seed_delta": 31337}})
    assert "Model: alpha" in info["infotexts"][0] and "ENSD: 31337" in info["infotexts"][0]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("sub/beta")  # restored
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha.safetensors"}).status_code == 200
    for bad in ({"sd_model_checkpoint": "../../etc/passwd"}, {"outdir_txt2img_samples": "../escape"},
                {"outdir_txt2img_samples": "/tmp/elsewhere"}, {"no_such_option": 1}, {"CLIP_stop_at_last_layers": 0}):
        response = client.post("/sdapi/v1/options", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert next(iter(bad)) in response.json()["detail"]


def test_save_images_numbered_with_infotext(models_dir, tmp_path):
    with make_client(models_dir, tmp_path) as client:
        assert client.post("/sdapi/v1/options", json={"outdir_txt2img_samples": "mine"}).status_code == 200
        _, info = post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "batch_size": 2, "save_images": True,
                                                        "send_images": False})
        post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "save_images": True})
    saved = sorted((tmp_path / "mine" / "samples").iterdir())
    assert [path.name for path in saved] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(saved[1]).text["parameters"] == info["infotexts"][1]


def test_png_info_round_trip(client):
    answer, info = post_ok(client, "/sdapi/v1/txt2img", {**QUICK, "seed": 5, "negative_prompt": "dull"})
    response = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + answer["images"][0]})
    assert response.status_code == 200
    read = response.json()
    assert read["info"] == info["infotexts"][0]
    assert read["parameters"]["Prompt"] == "a red circle" and read["parameters"]["Negative prompt"] == "dull"
    assert read["parameters"]["Seed"] == "5" and read["parameters"]["Size-1"] == "64"


def test_extra_single_image_and_the_listings(client):
    small = random_picture(3, size=16)
    response = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(small), "upscaler_1": "Lanczos",
                                                                 "upscaling_resize": 2})
    assert response.status_code == 200 and decoded(response.json()["image"]).size == (32, 32)
    refused = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(small), "upscaler_1": "R-ESRGAN 4x+"})
    assert refused.status_code == 422 and "R-ESRGAN 4x+" in refused.json()["detail"]
    assert {"Lanczos", "Nearest"} <= {upscaler["name"] for upscaler in client.get("/sdapi/v1/upscalers").json()}
    assert "karras" in {schedule["name"] for schedule in client.get("/sdapi/v1/schedulers").json()}
    assert client.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
    for listing in ("sd-vae", "loras", "embeddings", "scripts", "latent-upscale-modes", "cmd-flags"):
        assert client.get(f"/sdapi/v1/{listing}").status_code == 200, listing
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200


@pytest.mark.parametrize("body, named", [
    ({**QUICK, "restore_faces": True}, "restore_faces"),
    ({**QUICK, "tiling": True}, "tiling"),
    ({**QUICK, "alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts 'ADetailer'"),  # ControlNet runs
    ({**QUICK, "steps": 0}, "steps"),
    ({**QUICK, "cfg_scale": "lots"}, "cfg_scale"),
    ({**QUICK, "width": 65}, "width 65"),
    ({**QUICK, "sampler_name": "Magic"}, "Magic"),
    ({**QUICK, "no_such_field": 1}, "no_such_field"),
])
def test_bad_values_answer_422_naming_the_field(client, body, named):
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422, response.text
    assert named in response.text
    assert "Traceback" not in response.text


def test_bad_pictures_answer_422(client):
    for init, named in (("not base64!!", "base64"), (base64.b64encode(b"no picture").decode(), "not a picture")):
        response = client.post("/sdapi/v1/img2img", json={**QUICK, "init_images": [init]})
        assert response.status_code == 422 and named in response.json()["detail"]
    response = client.post("/sdapi/v1/png-info", json={"image": "%%%"})
    assert response.status_code == 422


def test_authentication_and_size_limit(models_dir, tmp_path):
    assert cli.parse_api_auth("a:b,c:d:e") == {"a": "b", "c": "d:e"}
    with pytest.raises(ValueError):
        cli.parse_api_auth("nopassword")
    with make_client(models_dir, tmp_path, api_auth={"user": "secret"}, max_request_bytes=10_000) as client:
        response = client.get("/sdapi/v1/samplers")
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Basic"
        assert client.get("/sdapi/v1/samplers", auth=("user", "wrong")).status_code == 401
        samplers = client.get("/sdapi/v1/samplers", auth=("user", "secret")).json()
        assert {"Euler a", "DPM++ 2M", "DDIM"} <= {sampler["name"] for sampler in samplers}
        big = client.post("/sdapi/v1/png-info", json={"image": "A" * 20_000}, auth=("user", "secret"))
        assert big.status_code == 413
        streamed = client.post("/sdapi/v1/png-info", content=iter([b'{"image": "', b"A" * 20_000, b'"}']),
                               headers={"Content-Type": "application/json"}, auth=("user", "secret"))
        assert streamed.status_code == 413 and "bytes" in streamed.json()["detail"]


def run_in_thread(function, *args, **kwargs):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function(*args, **kwargs)))
    thread.start()
    return thread, result


def wait_until(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_progress_while_running_then_interrupt(client):
    thread, result = run_in_thread(client.post, "/sdapi/v1/txt2img", json={**QUICK, "steps": 1000, "n_iter": 3})
    seen = wait_until(lambda: (lambda p: p if p["progress"] > 0 and p["state"]["sampling_step"] > 1 else None)(
        client.get("/sdapi/v1/progress").json()))
    assert seen["state"]["job"] == "txt2img" and seen["state"]["sampling_steps"] >= 1000
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    assert decoded(seen["current_image"]).size == (8, 8)  # the latent's cheap preview
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    response = result["value"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) == 0
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_skip_drops_the_running_batch_only(client):
    thread, result = run_in_thread(client.post, "/sdapi/v1/txt2img", json={**QUICK, "steps": 100, "n_iter": 2})
    wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 1)
    assert client.post("/sdapi/v1/skip").status_code == 200
    thread.join(120)
    info = json.loads(result["value"].json()["info"])
    assert info["skipped"] is True and info["all_seeds"] == [101]  # the second batch keeps its own seed


def test_full_queue_answers_503_with_retry_after(models_dir, tmp_path):
    release = threading.Event()
    with make_client(models_dir, tmp_path, max_waiting=1) as client:
        queue = client.app.state.server.queue
        running = queue.submit(lambda ticket: release.wait(30), "blocker")
        wait_until(lambda: queue.running is running)
        waiting = queue.submit(lambda ticket: "second", "waiting")
        assert client.get("/sdapi/v1/progress", params={"id_task": waiting.id}).json()["state"]["queue_position"] == 1
        response = client.post("/sdapi/v1/txt2img", json=QUICK)
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
        release.set()
        assert waiting.future.result(30) == "second"


def test_queue_is_fifo_and_cancels_waiting_jobs():
    queue, order, release = JobQueue(max_waiting=2, log=lambda *args: None), [], threading.Event()
    first = queue.submit(lambda ticket: release.wait(30) and order.append("first"), "first")
    wait_until(lambda: queue.running is first)
    second = queue.submit(lambda ticket: order.append("second"), "second")
    third = queue.submit(lambda ticket: order.append("third"), "third")
    with pytest.raises(QueueFull):
        queue.submit(lambda ticket: None, "fourth")
    assert queue.cancel(second) and not queue.cancel(first)
    release.set()
    third.future.result(30)
    assert order == ["first", "third"]
    queue.close()
    queue.join(10)


def test_the_webuiapi_client_against_a_real_server(models_dir, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    app = create_app(ServerConfig(models_dir=models_dir, output_root=tmp_path, device="cpu", log=lambda *args: None,
                                  api_auth={"me": "pw"}))
    with serving(app) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3, username="me", password="pw")
        result = api.txt2img(prompt="a blue square", width=64, height=64, seed=9, batch_size=4, n_iter=2)
        assert len(result.images) == 8 and result.info["all_seeds"] == list(range(9, 17))
        assert result.images[0].info["parameters"] == result.info["infotexts"][0]
        varied = api.txt2img(prompt="a blue square", width=64, height=64, seed=9, subseed=3, subseed_strength=0.2)
        assert "Variation seed: 3" in varied.info["infotexts"][0]
        init = random_picture(2)
        redrawn = api.img2img(images=[init], prompt="a square", width=64, height=64, seed=4, denoising_strength=0.6)
        assert "Denoising strength: 0.6" in redrawn.info["infotexts"][0]
        mask = Image.new("L", (64, 64))
        mask.paste(255, (0, 0, 20, 20))
        inpainted = api.img2img(images=[init], mask_image=mask, prompt="a square", width=64, height=64, seed=4)
        assert inpainted.images[0].size == (64, 64)
        read = api.png_info(result.images[3])
        assert read.info == result.info["infotexts"][3]
        api.util_set_model("beta")
        assert api.util_get_current_model().startswith("sub/beta.safetensors")
        assert "Model: beta" in api.txt2img(prompt="x", width=64, height=64, seed=1).info["infotexts"][0]
        assert api.get_progress()["state"]["job_count"] == 0
        assert {"name", "label"} <= set(api.get_schedulers()[0])


def test_a_disconnected_clients_waiting_job_is_dropped(models_dir, tmp_path):
    app = create_app(ServerConfig(models_dir=models_dir, output_root=tmp_path, device="cpu", log=lambda *args: None))
    queue, release = app.state.server.queue, threading.Event()
    with serving(app) as port:
        blocker = queue.submit(lambda ticket: release.wait(30), "blocker")
        wait_until(lambda: queue.running is blocker)
        body = json.dumps(QUICK).encode()
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            waiting = wait_until(lambda: queue.progress()["state"]["queue_size"] == 1 and list(queue._waiting)[0])
        wait_until(lambda: waiting.state == "cancelled", 10)
        release.set()
        blocker.future.result(30)
        assert waiting.future.cancelled()


def test_serve_script_refuses_unsafe_binding_and_stops_gracefully_on_sigterm(models_dir, tmp_path, capsys):
    requests = pytest.importorskip("requests")
    for unsafe in (["--listen"], ["--server-name", "192.0.2.1"], ["--api-auth", "nopassword"]):
        with pytest.raises(SystemExit) as refused:
            run_cli(lambda: cli.main(unsafe))
        assert refused.value.code == 2
        assert "--api-auth" in capsys.readouterr().err
    assert cli.check_args(cli.parse_args(["--listen", "--api-auth", "a:b"])) == ("0.0.0.0", {"a": "b"})
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port), "--device",
                               "cpu", "--models_dir", str(models_dir), "--outdir", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_environment())
    base = f"http://127.0.0.1:{port}/sdapi/v1"
    try:
        def ready():
            try:
                return requests.get(f"{base}/progress", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(ready, 120)
        assert requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()["paths"]["/sdapi/v1/txt2img"]
        thread, result = run_in_thread(requests.post, f"{base}/txt2img", json={**QUICK, "steps": 1000, "save_images": True,
                                                                                "n_iter": 2}, timeout=120)
        wait_until(lambda: requests.get(f"{base}/progress", timeout=5).json()["state"]["sampling_step"] > 1)
        server.send_signal(signal.SIGTERM)
        thread.join(60)
        info = json.loads(result["value"].json()["info"])
        assert info["interrupted"] is True  # answered, not cut off
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    finally:
        if server.poll() is None:
            server.kill()
        stderr = server.stderr.read()
    access = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"time"')]
    assert {"method": "POST", "path": "/sdapi/v1/txt2img", "status": 200} in [
        {key: entry[key] for key in ("method", "path", "status")} for entry in access]
