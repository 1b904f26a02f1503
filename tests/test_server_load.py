"""The server (scripts/serve.py) under load and faults, on a loopback port with a tiny model: 16 concurrent
clients sending 100 requests, clients that go away mid-job, SIGTERM during a job, and model files that would
run code. Bounded in count and time: one server process for the module (the SIGTERM test, last, ends it)."""
import base64
import collections
import io
import itertools
import json
import pickle
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
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")

from conftest import REPO  # noqa: E402
from helpers import script_environment  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

PROMPT = "a red circle"
QUICK = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler a", "cfg_scale": 7.0}
QUEUE_SIZE = 4
CLIENTS, REQUESTS = 16, 100
DISTINCT_SEEDS = 8
RSS_MARGIN = 24 * 2**20  # bytes the server may grow by over the load (allocator pools, thread stacks)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, seconds=60, interval=0.02):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out")


class Served:
    """scripts/serve.py in a child process; `base` is its /sdapi/v1 URL, `outdir` where it saves."""

    def __init__(self, models, outdir):
        self.port, self.outdir = free_port(), outdir
        self.base = f"http://127.0.0.1:{self.port}/sdapi/v1"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(self.port), "--device", "cpu",
             "--models_dir", str(models), "--outdir", str(outdir), "--queue_size", str(QUEUE_SIZE)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=script_environment())
        self.stderr_lines = []
        threading.Thread(target=lambda: self.stderr_lines.extend(self.process.stderr), daemon=True).start()
        wait_until(self._ready, 180, interval=0.2)

    def _ready(self):
        assert self.process.poll() is None, "".join(self.stderr_lines)
        try:
            return requests.get(f"{self.base}/progress", timeout=2).ok
        except requests.ConnectionError:
            return False

    def progress(self, **params) -> dict:
        return requests.get(f"{self.base}/progress", params={"skip_current_image": True, **params}, timeout=10).json()

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def saved(self, folder: str) -> list:
        path = self.outdir / folder / "samples"
        return sorted(path.iterdir()) if path.is_dir() else []

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(folder / "Stable-diffusion", "alpha.safetensors", seed=0)
    return folder


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    server = Served(models, tmp_path_factory.mktemp("out"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference_pictures(models):
    """Each seed's picture made alone with the Python API, as uint8 arrays."""
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(models / "Stable-diffusion" / "alpha.safetensors", device="cpu",
                                    log=lambda *args: None)
    pictures = {}
    for seed in range(1000, 1000 + DISTINCT_SEEDS):
        image = pipe(PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=7.0, sampler="Euler a",
                     seed=seed).images[0]
        pictures[seed] = np.asarray(image.convert("RGB"))
    return pictures


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def post_in_thread(url, body, results: dict, key, timeout=300):
    def send():
        try:
            results[key] = requests.post(url, json=body, timeout=timeout)
        except requests.RequestException as error:
            results[key] = error

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_sixteen_clients_a_hundred_requests(served, reference_pictures):
    assert len({picture.tobytes() for picture in reference_pictures.values()}) == DISTINCT_SEEDS  # a mix-up shows
    for seed in (1000, 1001, 1002):  # warm-up: the model is loaded, the allocator's pools are filled
        assert requests.post(f"{served.base}/txt2img", json={**QUICK, "seed": seed}, timeout=120).ok
    rss_before = served.rss()

    # a long job holds the worker while the clients' first requests arrive, so that the queue fills for sure
    gate, gate_answer = "gate", {}
    gate_thread = post_in_thread(f"{served.base}/txt2img", {**QUICK, "steps": 1000, "force_task_id": gate},
                                 gate_answer, "gate")
    wait_until(lambda: (lambda state: state["id_task"] == gate and state["sampling_step"] > 0)(
        served.progress()["state"]))

    indices, answers = itertools.count(), {}
    lock = threading.Lock()

    def client():
        with requests.Session() as session:
            while True:
                with lock:
                    index = next(indices)
                if index >= REQUESTS:
                    return
                body = {**QUICK, "seed": 1000 + index % DISTINCT_SEEDS, "force_task_id": f"load-{index}",
                        "save_images": True, "override_settings": {"outdir_txt2img_samples": "load"}}
                try:
                    response = session.post(f"{served.base}/txt2img", json=body, timeout=300)
                except requests.RequestException as error:
                    answers[index] = error
                    continue
                answers[index] = response
                if response.status_code == 503:
                    time.sleep(min(float(response.headers.get("Retry-After", 1)), 2))

    started = time.monotonic()
    clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    wait_until(lambda: served.progress()["state"]["queue_size"] == QUEUE_SIZE)
    assert requests.post(f"{served.base}/interrupt", timeout=10).ok
    for thread in clients + [gate_thread]:
        thread.join(600)
    seconds = time.monotonic() - started

    assert sorted(answers) == list(range(REQUESTS)), "a request got no answer"
    statuses = collections.Counter(getattr(answer, "status_code", repr(answer)) for answer in answers.values())
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= CLIENTS - QUEUE_SIZE - 1 and statuses[200] >= QUEUE_SIZE, statuses
    accepted_seeds = collections.Counter()
    for index, response in answers.items():
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1 and "queue is full" in response.json()["detail"]
            continue
        info = json.loads(response.json()["info"])
        seed = 1000 + index % DISTINCT_SEEDS
        assert info["id_task"] == f"load-{index}" and info["all_seeds"] == [seed]  # its own answer, once
        (image,) = response.json()["images"]
        assert np.array_equal(decoded(image), reference_pictures[seed]), f"request {index}: not seed {seed}'s picture"
        accepted_seeds[seed] += 1
    # the server saved exactly one picture per accepted request: no job lost, none run twice
    saved_seeds = collections.Counter(int(Image.open(path).text["parameters"].split("Seed: ")[1].split(",")[0])
                                      for path in served.saved("load"))
    assert saved_seeds == accepted_seeds
    assert json.loads(gate_answer["gate"].json()["info"])["interrupted"] is True
    state = served.progress()["state"]
    assert state["queue_size"] == 0 and state["job_count"] == 0
    grown = served.rss() - rss_before
    print(f"\n{REQUESTS} requests from {CLIENTS} clients in {seconds:.1f} s: {statuses[200]} answered, "
          f"{statuses[503]} refused; server RSS {rss_before / 2**20:.0f} MiB, {grown / 2**20:+.1f} MiB after")
    assert grown < RSS_MARGIN


def access_log(served) -> list:
    return [json.loads(line) for line in served.stderr_lines if line.startswith('{"time"')]


def raw_post(port: int, body: dict) -> socket.socket:
    """A POST whose answer is never read: the test closes the connection to play a client that goes away."""
    data = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return connection


def test_clients_that_go_away_mid_job(served, reference_pictures):
    saving = {"save_images": True, "override_settings": {"outdir_txt2img_samples": "gone"}}
    running = raw_post(served.port, {**QUICK, **saving, "steps": 40, "seed": 7, "force_task_id": "gone-running"})
    wait_until(lambda: served.progress()["state"]["id_task"] == "gone-running")
    waiting = raw_post(served.port, {**QUICK, **saving, "seed": 8, "force_task_id": "gone-waiting"})
    wait_until(lambda: served.progress()["state"]["queue_size"] == 1)
    waiting.close()
    running.close()
    wait_until(lambda: served.progress()["state"]["queue_size"] == 0)  # the waiting job is dropped at once
    assert served.progress()["state"]["id_task"] == "gone-running"  # while the running one goes on
    wait_until(lambda: served.progress()["state"]["job_count"] == 0, 120)
    (saved,) = served.saved("gone")  # the running job finished and saved; the dropped one never ran
    assert "Seed: 7," in Image.open(saved).text["parameters"]
    # the server goes on: the next client gets its own picture
    response = requests.post(f"{served.base}/txt2img", json={**QUICK, "seed": 1000}, timeout=120)
    assert response.ok and np.array_equal(decoded(response.json()["images"][0]), reference_pictures[1000])
    wait_until(lambda: {"path": "/sdapi/v1/txt2img", "status": 499} in
               [{key: entry[key] for key in ("path", "status")} for entry in access_log(served)], 10)


class RunsCode:
    """Unpickling it would create `marker`: proof that a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_model_files_that_would_run_code_are_refused(served, models, tmp_path):
    import torch

    marker = tmp_path / "code-ran"
    folder = models / "Stable-diffusion"
    torch.save({"state_dict": {"weight": RunsCode(marker)}}, folder / "pickled-code.ckpt")
    (folder / "raw-pickle.ckpt").write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=2))
    (folder / "foreign-target.safetensors").write_bytes((folder / "alpha.safetensors").read_bytes())
    (folder / "foreign-target.yaml").write_text("model:\n  target: subprocess.Popen\n  params:\n    args: "
                                                f"[touch, {marker}]\n")
    (models / "VAE").mkdir(exist_ok=True)
    torch.save({"state_dict": {"weight": RunsCode(marker)}}, models / "VAE" / "pickled-code.pt")
    assert requests.post(f"{served.base}/refresh-checkpoints", timeout=10).ok
    listed = {model["model_name"] for model in requests.get(f"{served.base}/sd-models", timeout=10).json()}
    assert {"pickled-code", "raw-pickle", "foreign-target"} <= listed  # listing them is fine
    for option in ({"sd_model_checkpoint": "pickled-code.ckpt"}, {"sd_model_checkpoint": "raw-pickle"},
                   {"sd_model_checkpoint": "foreign-target"}, {"sd_vae": "pickled-code.pt"}):
        for response in (requests.post(f"{served.base}/options", json=option, timeout=60),
                         requests.post(f"{served.base}/txt2img", json={**QUICK, "override_settings": option},
                                       timeout=60)):
            assert 400 <= response.status_code < 500, (option, response.text)
            detail = response.json()["detail"]
            assert "\n" not in detail and "\x1b" not in detail and "Traceback" not in detail, detail
        print(f"\n{option}: {detail}")
    assert not marker.exists()
    assert requests.get(f"{served.base}/options", timeout=10).json()["sd_model_checkpoint"].startswith("alpha")
    assert requests.post(f"{served.base}/txt2img", json={**QUICK, "seed": 1}, timeout=120).ok  # the server goes on


def test_sigterm_during_a_job_keeps_its_saved_pictures(served):
    """Last: it ends the module's server."""
    answers = {}
    body = {**QUICK, "steps": 30, "n_iter": 3, "seed": 21, "save_images": True,
            "override_settings": {"outdir_txt2img_samples": "sigterm"}}
    running = post_in_thread(f"{served.base}/txt2img", {**body, "force_task_id": "stopping"}, answers, "running")
    wait_until(lambda: served.progress()["state"]["id_task"] == "stopping")
    waiting = post_in_thread(f"{served.base}/txt2img", {**QUICK, "seed": 22}, answers, "waiting")
    wait_until(lambda: (lambda state: state["job_no"] >= 1 and state["queue_size"] == 1)(served.progress()["state"]))
    served.process.send_signal(signal.SIGTERM)
    running.join(120)
    waiting.join(120)
    assert served.process.wait(60) in (0, -signal.SIGTERM)
    stopped, refused = answers["running"], answers["waiting"]
    assert stopped.status_code == 200, stopped.text
    info = json.loads(stopped.json()["info"])
    assert info["interrupted"] is True and 1 <= len(info["infotexts"]) < 3 and info["all_seeds"][0] == 21
    saved = served.saved("sigterm")
    assert [Image.open(path).text["parameters"] for path in saved] == info["infotexts"]
    assert refused.status_code == 503 and "shut down" in refused.json()["detail"]
    assert not any("Traceback" in line for line in served.stderr_lines), "".join(served.stderr_lines)
