"""ControlNet through the A1111 API (ldm.server.controlnet): `alwayson_scripts.controlnet.args` as the real
`webuiapi` client sends them, /controlnet/model_list, /module_list and /version, the detected maps after the
pictures, the infotext, and refusals (unknown models, names that would leave the ControlNet folder, bad fields).

The tiny model with a tiny ControlNet of its shape (configs/tiny/controlnet-tiny.yaml), every weight random
(zero convolutions included), so that a unit changes the picture.
"""
import base64
import io
import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import png_b64, randomise_, serving  # noqa: E402
from ldm.controlnet_file import save_controlnet  # noqa: E402
from ldm.generate.control import ControlUnit, fit, listed_name  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.server.app import ServerConfig, create_app  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

CONTROL_CONFIG = REPO / "configs" / "tiny" / "controlnet-tiny.yaml"
QUICK = {"prompt": "a red square", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler a", "seed": 21}
# what the server hands the Python API for QUICK at its default options (A1111's: clip skip 1, ENSD 0, CPU noise)
PYTHON_API_KEYWORDS = {"num_inference_steps": 3, "height": 64, "width": 64, "seed": 21, "sampler": "Euler a",
                       "guidance_scale": 7.0, "clip_skip": 1, "ensd": 0, "rng": "cpu"}


def write_random_controlnet(path, seed: int):
    config = OmegaConf.load(CONTROL_CONFIG).model
    network = instantiate_from_config(config.params.control_stage_config)
    randomise_(network, seed)
    save_controlnet(network, config, path)
    return path


def square_picture() -> Image.Image:
    picture = np.zeros((80, 64, 3), np.uint8)
    picture[20:50, 10:40] = 255
    return Image.fromarray(picture)


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(models / "Stable-diffusion", "alpha.safetensors", seed=0)
    write_random_controlnet(models / "ControlNet" / "control_tiny.safetensors", seed=1)
    write_random_controlnet(models / "outside.safetensors", seed=2)  # beside the folder, not in it
    return models


def quiet_app(models_dir, output_root, **config):
    return create_app(ServerConfig(models_dir=models_dir, output_root=output_root, device="cpu",
                                   log=lambda *args: None, **config))


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    with TestClient(quiet_app(models_dir, tmp_path_factory.mktemp("out"))) as test_client:
        yield test_client


def unit(**fields) -> dict:
    """A unit as webuiapi.ControlNetUnit(...).to_dict() sends it, with the tiny ControlNet and the square."""
    return {"image": png_b64(square_picture()), "mask": None, "module": "none", "model": "control_tiny",
            "weight": 1.0, "resize_mode": "Resize and Fill", "low_vram": False, "processor_res": 512,
            "threshold_a": 64, "threshold_b": 64, "guidance_start": 0.0, "guidance_end": 1.0,
            "control_mode": "Balanced", "pixel_perfect": False, "hr_option": "Both", "enabled": True, **fields}


def with_units(*units, **fields) -> dict:
    return {**QUICK, **fields, "alwayson_scripts": {"ControlNet": {"args": list(units)}}}


def refused(client, body, path="/sdapi/v1/txt2img") -> str:
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]  # a message, or pydantic's list of errors
    return detail if isinstance(detail, str) else " ".join(error["msg"] for error in detail)


# --- the real client ---------------------------------------------------------------------------------------------
def test_the_webuiapi_client_gets_the_python_apis_picture(models_dir, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    control_file = models_dir / "ControlNet" / "control_tiny.safetensors"
    with serving(quiet_app(models_dir, tmp_path)) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
        assert listed_name(control_file) in api.controlnet_model_list()
        assert "outside" not in " ".join(api.controlnet_model_list())
        assert {"none", "canny", "invert", "binary"} <= set(api.controlnet_module_list())
        assert api.controlnet_version() == 2
        inverted = api.controlnet_detect([square_picture()], module="invert (from white bg & black line)")
        assert np.array_equal(np.asarray(inverted.image.convert("RGB")), 255 - np.asarray(square_picture()))

        def generate(*units):  # alwayson_scripts given each time: webuiapi's default dict keeps earlier units
            return api.txt2img(prompt="a red square", width=64, height=64, seed=21, controlnet_units=list(units),
                               alwayson_scripts={})

        canny = dict(module="canny", model=listed_name(control_file), threshold_a=100, threshold_b=200)
        steered = generate(webuiapi.ControlNetUnit(image=square_picture(), **canny))
        plain = generate()
        weightless = generate(webuiapi.ControlNetUnit(image=square_picture(), **canny, weight=0.0))

    pipe = Pipeline.from_pretrained(models_dir / "Stable-diffusion" / "alpha.safetensors", device="cpu",
                                    log=lambda *_: None)
    expected = pipe("a red square", control=[ControlUnit(control_file, square_picture(), preprocessor="canny",
                                                         threshold_a=100, threshold_b=200, resize="resize_and_fill")],
                    **PYTHON_API_KEYWORDS)
    assert len(steered.images) == 2  # the picture, then the unit's detected map (the extension's answer)
    assert np.array_equal(np.asarray(steered.images[0].convert("RGB")), np.asarray(expected.images[0]))
    assert steered.info["infotexts"][0] == expected.infotexts[0]
    assert steered.info["extra_generation_params"]["ControlNet 0"].startswith(
        f"Module: canny, Model: {listed_name(control_file)}, Weight: 1.0, Resize Mode: Resize and Fill")
    assert len(plain.images) == 1 and "ControlNet" not in plain.info["infotexts"][0]
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(steered.images[0]))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(weightless.images[0]))


# --- the answer --------------------------------------------------------------------------------------------------
def test_detected_maps_follow_the_pictures_fitted_to_the_output(client):
    body = with_units(unit(module="invert (from white bg & black line)", resize_mode="Just Resize"),
                      unit(enabled=False, model="no such model"), None,
                      unit(module="canny", resize_mode=1, threshold_a=100, threshold_b=200, save_detected_map=False),
                      batch_size=2)
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 3 and len(info["infotexts"]) == 2  # two pictures, the first unit's map
    detected = decoded(answer["images"][2])  # the 64 x 80 square inverted, stretched to 64 x 64: rows 16..40 black
    assert detected.shape == (64, 64, 3) and (detected[18:38, 12:38] == 0).all()
    assert (detected[:14] == 255).all() and (detected[42:] == 255).all() and (detected[:, 42:] == 255).all()
    assert np.array_equal(detected, fit(255 - np.asarray(square_picture()), 64, 64, "just_resize"))
    assert set(info["extra_generation_params"]) == {"ControlNet 0", "ControlNet 1"}  # the enabled ones, renumbered
    assert "Resize Mode: Crop and Resize" in info["extra_generation_params"]["ControlNet 1"]
    assert answer["parameters"]["alwayson_scripts"]["ControlNet"]["args"][0]["image"] is None  # pictures left out


def test_img2img_takes_units_and_pixel_perfect_sets_the_processor_resolution(client):
    body = with_units(unit(module="canny", pixel_perfect=True, resize_mode="Crop and Resize"),
                      init_images=[png_b64(square_picture())], denoising_strength=0.5)
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Processor Res: 64" in infotext  # the 64-wide square covering 64 x 64: its shorter side stays 64


def test_an_empty_unit_list_is_no_control(client):
    plain = client.post("/sdapi/v1/txt2img", json=QUICK).json()
    empty = client.post("/sdapi/v1/txt2img", json=with_units()).json()
    assert plain["images"] == empty["images"]


# --- refusals ----------------------------------------------------------------------------------------------------
def test_unknown_models_and_names_outside_the_folder_are_refused(client, models_dir):
    unknown = refused(client, with_units(unit(model="no such model")))
    assert "'no such model' is not a ControlNet of this server" in unknown and "control_tiny [" in unknown
    for escaping in ("../outside", "../outside.safetensors", str(models_dir / "outside.safetensors"),
                     "ControlNet/../../outside"):
        assert "is not a ControlNet of this server" in refused(client, with_units(unit(model=escaping)))
    assert "another file" in refused(client, with_units(unit(model="control_tiny [0123abcd]")))
    assert "names no model" in refused(client, with_units(unit(model="None")))


@pytest.mark.parametrize("fields, words", [
    ({"weight": 3}, "args[0]: its weight 3.0 is outside 0..2"),
    ({"weight": "heavy"}, "weight='heavy' is not a number"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "start 0.8 is after its end 0.2"),
    ({"module": "openpose"}, "unknown ControlNet preprocessor 'openpose'"),
    ({"module": "depth_midas"}, "needs MiDaS weights"),
    ({"control_mode": "Loud"}, "unknown mode 'Loud'"),
    ({"resize_mode": 7}, "unknown resize mode 7"),
    ({"image": ""}, "has no input_image"),
    ({"image": "not base64!"}, "not valid base64"),
    ({"mask": "abc"}, "mask='abc' cannot be honoured"),
    ({"colour": 1}, "colour is not a field of a ControlNet unit"),
    ({"pixel_perfect": "yes"}, "pixel_perfect='yes' must be true or false"),
    ({"processor_res": 10}, "processor resolution 10 is outside 64..4096"),
    ({"module": 5}, "module=5 must be a name"),
    ({"model": ["control_tiny"]}, "model=['control_tiny'] must be a name"),
    ({"threshold_a": 10**30}, "threshold_a=1000000000000000000000000000000 is out of range"),
])
def test_bad_unit_fields_answer_422_naming_them(client, fields, words):
    assert words in refused(client, with_units(unit(**fields)))


def test_other_scripts_and_malformed_script_args_are_refused(client):
    other_script = {**QUICK, "alwayson_scripts": {"ADetailer": {"args": []}}}
    assert "'ADetailer' cannot be honoured" in refused(client, other_script)
    assert "must be {\"args\"" in refused(client, {**QUICK, "alwayson_scripts": {"controlnet": [unit()]}})
    assert "must be an object" in refused(client, with_units("a unit"))
    assert "send at most 10" in refused(client, with_units(*[unit()] * 11))
    hires = with_units(unit(hr_option="Low res only"), enable_hr=True, hr_scale=1.5)
    assert "hr_option='Low res only' cannot be honoured" in refused(client, hires)


def test_detect_answers_the_modules_maps(client):
    pictures = [png_b64(square_picture())] * 2
    answer = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": pictures,
                                                     "controlnet_threshold_a": 100, "controlnet_threshold_b": 200})
    assert answer.status_code == 200, answer.text
    assert answer.json()["info"] == "Success" and len(answer.json()["images"]) == 2
    edges = decoded(answer.json()["images"][0])  # at the processor resolution: 512 wide, the square's outline
    assert edges.shape == (640, 512, 3) and set(np.unique(edges)) == {0, 255} and edges[250, 200].max() == 0
    for body, words in (({"controlnet_module": "openpose", "controlnet_input_images": pictures}, "openpose"),
                        ({"controlnet_module": "canny"}, "controlnet_input_images is empty"),
                        ({"controlnet_module": "depth", "controlnet_input_images": pictures}, "MiDaS")):
        assert words in refused(client, body, "/controlnet/detect")


def test_module_list_details_and_aliases(client):
    plain = client.get("/controlnet/module_list").json()
    aliased = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert "invert" in plain["module_list"] and "invert (from white bg & black line)" in aliased["module_list"]
    assert "depth_midas" not in plain["module_list"]  # the server has no MiDaS weights
    sliders = {slider["name"]: slider["value"] for slider in plain["module_detail"]["canny"]["sliders"]}
    assert sliders == {"Preprocessor Resolution": 512, "Canny Low Threshold": 100, "Canny High Threshold": 200}
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


def test_the_serve_command_line_takes_controlnet_folders(tmp_path):
    from ldm.generate.errors import UserError
    from ldm.server import cli
    given = cli.parse_args(["--controlnet-dir", str(tmp_path), "--controlnet_dir", "b"])
    assert given.controlnet_dir == [str(tmp_path), "b"]
    cli.check_args(cli.parse_args(["--controlnet_dir", str(tmp_path)]))
    with pytest.raises(UserError, match="--controlnet_dir .*missing: no such folder"):
        cli.check_args(cli.parse_args(["--controlnet_dir", str(tmp_path / "missing")]))


def test_controlnet_dir_comes_before_the_models_folder(models_dir, tmp_path):
    write_random_controlnet(tmp_path / "control_tiny.safetensors", seed=3)  # same name, other weights
    with TestClient(quiet_app(models_dir, tmp_path, controlnet_dirs=(tmp_path,))) as client:
        listed = client.get("/controlnet/model_list").json()["model_list"]
    ours = listed_name(tmp_path / "control_tiny.safetensors")
    shadowed = listed_name(models_dir / "ControlNet" / "control_tiny.safetensors")
    assert ours != shadowed and ours in listed and shadowed not in listed
