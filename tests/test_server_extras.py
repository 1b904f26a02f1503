"""/sdapi/v1/extra-single-image and /extra-batch-images (ldm.server.extras): Lanczos and Nearest at once,
the x4 upscaler (a tiny x4 checkpoint in the models folder) as a queue job through ldm.pipeline's upscale."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import png_b64  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.server.app import ServerConfig, create_app  # noqa: E402
from ldm.server.extras import is_x4_checkpoint  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

UPSCALE_CONFIG = REPO / "configs" / "tiny" / "upscale-tiny.yaml"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(folder / "Stable-diffusion", "alpha.safetensors", seed=0)
    write_tiny_checkpoint(folder / "Stable-diffusion", "upscaler.safetensors", seed=0, config=UPSCALE_CONFIG)
    return folder


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    app = create_app(ServerConfig(models_dir=models, output_root=tmp_path_factory.mktemp("out"), device="cpu",
                                  log=lambda *args: None))
    with TestClient(app) as test_client:
        yield test_client


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def picture(seed: int, size=(16, 12)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_x4_checkpoints_are_found_without_loading(models, tmp_path):
    assert is_x4_checkpoint(models / "Stable-diffusion" / "upscaler.safetensors")  # by the config beside it
    assert not is_x4_checkpoint(models / "Stable-diffusion" / "alpha.safetensors")
    for channels, expected in ((7, True), (4, False)):  # by the .safetensors header alone
        path = tmp_path / f"unet-{channels}.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, channels, 3, 3)}, str(path))
        assert is_x4_checkpoint(path) is expected
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    assert not is_x4_checkpoint(tmp_path / "broken.safetensors")


def test_pixel_upscalers_answer_at_once(client):
    small = picture(1)
    response = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(small), "upscaler_1": "Nearest",
                                                                 "upscaling_resize": 3})
    assert response.status_code == 200, response.text
    assert np.array_equal(np.asarray(decoded(response.json()["image"])), np.asarray(small.resize((48, 36),
                                                                                                 Image.NEAREST)))
    batch = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": png_b64(picture(2)), "name": "a"}, {"data": png_b64(picture(3, (8, 8))), "name": "b"}],
        "resize_mode": 1, "upscaling_resize_w": 20, "upscaling_resize_h": 10, "upscaler_1": "Lanczos"})
    assert batch.status_code == 200, batch.text
    assert [decoded(image).size for image in batch.json()["images"]] == [(20, 10), (20, 10)]


def test_the_x4_upscaler_runs_through_the_pipeline(client, models):
    listed = {upscaler["name"]: upscaler for upscaler in client.get("/sdapi/v1/upscalers").json()}
    assert {"None", "Lanczos", "Nearest", "upscaler"} <= set(listed) and listed["upscaler"]["scale"] == 4
    assert client.post("/sdapi/v1/options", json={"upscaler_x4_steps": 3}).status_code == 200
    small = picture(4)
    response = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(small), "upscaler_1": "upscaler",
                                                                 "upscaling_resize": 4})
    assert response.status_code == 200, response.text
    upscaled = decoded(response.json()["image"])
    pipe = Pipeline.from_pretrained(models / "Stable-diffusion" / "upscaler.safetensors", device="cpu",
                                    log=lambda *args: None)
    alone = pipe.upscale("", image=small, num_inference_steps=3, seed=0).images[0].convert("RGB")
    assert upscaled.size == (64, 48) and np.array_equal(np.asarray(upscaled), np.asarray(alone))
    batch = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": png_b64(small), "name": "a"}, {"data": png_b64(picture(5)), "name": "b"}],
        "upscaler_1": "upscaler.safetensors", "upscaling_resize": 2})
    assert batch.status_code == 200, batch.text
    first, second = (decoded(image) for image in batch.json()["images"])
    assert first.size == second.size == (32, 24)
    assert np.array_equal(np.asarray(first), np.asarray(alone.resize((32, 24), Image.LANCZOS)))
    # one model resident: the next generation loads the text-to-image model back
    generated = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2})
    assert generated.status_code == 200 and client.app.state.server.resident.key[0].name == "alpha.safetensors"


def test_unknown_upscalers_and_bad_pictures_answer_422(client):
    for body, named in (({"image": png_b64(picture(6)), "upscaler_1": "R-ESRGAN 4x+"}, "upscaler"),
                        ({"image": png_b64(picture(6)), "upscaler_2": "SwinIR"}, "upscaler_2"),
                        ({"image": "%%%"}, "base64")):
        response = client.post("/sdapi/v1/extra-single-image", json=body)
        assert response.status_code == 422 and named in response.json()["detail"], response.text
    response = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": "AAAA", "name": "a"}]})
    assert response.status_code == 422 and "imageList[0].data" in response.json()["detail"]
