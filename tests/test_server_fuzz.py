"""Fuzzing the HTTP API (ldm.server) with schemathesis against its own OpenAPI schema, in-process (ASGI) on a
tiny model: for a bounded number of generated requests per endpoint, valid and invalid, no answer is a 5xx and
no answer body holds a traceback. Bad values must answer 4xx with a message."""
import collections

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from ldm.server.app import ServerConfig, create_app  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

EXAMPLES_PER_ENDPOINT = 12
# Valid but costly values are scaled down (sampling an 8192x8192 picture with the tiny model takes hours, which
# is a legitimate request, not a fault); invalid values pass unchanged, so that their refusals are fuzzed.
CHEAP = {"width": 64, "height": 64, "steps": 2, "hr_second_pass_steps": 2, "batch_size": 2, "n_iter": 2,
         "hr_resize_x": 128, "hr_resize_y": 128, "hr_scale": 2.0, "upscaling_resize": 2.0,
         "upscaling_resize_w": 128, "upscaling_resize_h": 128, "seed_resize_from_h": 128, "seed_resize_from_w": 128}
GENERATION_DEFAULTS = {"width": 64, "height": 64, "steps": 2}  # A1111's defaults (512x512, 50 steps) cost minutes


def cheapened(body, path: str):
    if not isinstance(body, dict):
        return body
    changed = dict(body)
    if path.endswith(("/txt2img", "/img2img")):
        changed = {**GENERATION_DEFAULTS, **changed}
    for name, ceiling in CHEAP.items():
        value = changed.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and ceiling < value <= 8192:
            changed[name] = ceiling
    return changed


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(models / "Stable-diffusion", "alpha.safetensors", seed=0)
    app = create_app(ServerConfig(models_dir=models, output_root=tmp_path_factory.mktemp("out"), device="cpu",
                                  log=lambda *args: None, max_waiting=2))
    yield app
    app.state.server.shutdown()


def no_traceback(text, case):
    assert "Traceback" not in text and 'File "' not in text, \
        f"{case.method} {case.path} answered a traceback: {text[:300]}"


def fuzz(case, seen: collections.Counter):
    case.body = cheapened(case.body, case.path)
    response = case.call()
    text = response.text or ""
    assert response.status_code < 500, \
        f"{case.method} {case.path} {case.body!r:.300}: {response.status_code} {text:.300}"
    no_traceback(text, case)
    if response.status_code == 422:
        assert response.json()["detail"], response.text
    seen[case.method, case.path, response.status_code] += 1


def test_no_request_makes_a_server_error(fuzzed_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20
    seen = collections.Counter()
    for operation in operations:
        # an operation without parameters has nothing to make invalid
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body or operation.query else [])
        for mode in modes:
            run = settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None, database=None,
                           phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))(
                given(operation.as_strategy(generation_mode=mode))(lambda case: fuzz(case, seen)))
            run()
    print("\n" + "\n".join(f"{method} {path}: {status} x{count}"
                            for (method, path, status), count in sorted(seen.items())))
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/extra-single-image"):
        assert seen["POST", path, 422] > 0, f"no request to {path} was refused: the fuzzing sent only valid ones"
    assert seen["POST", "/sdapi/v1/txt2img", 200] > 0, "no fuzzed txt2img request made a picture"


def test_a_server_without_auth_ignores_authorization_headers(fuzzed_app):
    from fastapi.testclient import TestClient

    client = TestClient(fuzzed_app)
    for header in ("Basic %%%", "Basic Og==", "Bearer token"):
        assert client.get("/sdapi/v1/samplers", headers={"Authorization": header}).status_code == 200, header
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})
