"""The FastAPI app: AUTOMATIC1111's /sdapi/v1 endpoints over the job queue and the generation layer.

`create_app(ServerConfig(...))` builds it; `app.state.server` is the `Server` (queue, options, models) that
a Gradio page in the same process can share.
"""
import asyncio
import json
import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ldm.generate import hires
from ldm.generate.infotext import parse_parameters
from ldm.models.diffusion import samplers
from ldm.server import controlnet, pictures
from ldm.server.checkpoints import ModelFolders, ResidentModel
from ldm.server.errors import RequestProblem
from ldm.server.extras import Extras, Upscalers
from ldm.server.generation import Generator, response_body
from ldm.server.jobs import JobQueue, QueueClosed, QueueFull
from ldm.server.schemas import (ExtraBatchImagesRequest, ExtrasRequest, ExtraSingleImageRequest, Img2ImgRequest,
                                PngInfoRequest, Txt2ImgRequest)
from ldm.server.settings import Settings

ACCESS_LOG = logging.getLogger("ldm.server.access")
DISCONNECT_POLL_SECONDS = 0.25
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class ServerConfig:
    models_dir: Path = Path("models")
    ckpt: Path | None = None
    output_root: Path = Path(".")
    device: str = "auto"
    precision: str = "autocast"
    low_memory: bool = False
    embeddings_dir: Path | None = None
    controlnet_dirs: tuple = ()  # where ControlNets are found before <models_dir>/ControlNet (--controlnet_dir)
    api_auth: dict = field(default_factory=dict)  # user -> password; empty: no authentication
    max_waiting: int = 8
    max_request_bytes: int = 64 * 1024 * 1024
    log: object = print


class Server:
    """What every front end shares: the model folders, the resident model, the options, the queue."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.folders = ModelFolders(config.models_dir, config.ckpt)
        self.settings = Settings(self.folders, config.output_root)
        self.resident = ResidentModel(config.device, config.precision, config.low_memory, config.embeddings_dir,
                                      log=config.log)
        self.controlnets = controlnet.ControlNets(config.models_dir, config.controlnet_dirs)
        self.generator = Generator(self.folders, self.resident, self.settings, Path(config.models_dir) / "Lora",
                                   log=config.log, controlnets=self.controlnets)
        self.queue = JobQueue(config.max_waiting, log=config.log)
        self.upscalers = Upscalers(self.folders)

    def shutdown(self):
        self.queue.close(interrupt_running=True)


def _problem(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    message = _TERMINAL_CODES.sub("", message)  # torch's messages bold words for terminals
    return JSONResponse({"error": "HTTPException" if status != 422 else "RequestProblem", "detail": message},
                        status_code=status, headers=headers)


async def _await_ticket(server: Server, ticket, request: Request):
    """The job's result; a job still waiting when its client goes away is dropped."""
    future = asyncio.wrap_future(ticket.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            try:
                return future.result()
            except QueueClosed as closed:  # the server is stopping and dropped this job before it ran
                raise HTTPException(503, str(closed)) from None
        if ticket.state == "queued" and await request.is_disconnected():
            server.queue.cancel(ticket)
            server.config.log(f"client went away: job {ticket.id} ({ticket.label}) dropped from the queue")
            raise HTTPException(499, "the client disconnected")


def _submit(server: Server, work, label: str, ticket_id=None):
    try:
        return server.queue.submit(work, label, ticket_id)
    except QueueFull as full:
        raise HTTPException(503, str(full), headers={"Retry-After": str(full.retry_after)}) from None
    except QueueClosed as closed:
        raise HTTPException(503, str(closed)) from None


def _authentication(users: dict):
    if not users:  # no HTTPBasic at all: it would refuse a malformed Authorization header even then
        return lambda: None
    basic = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(basic)):
        # compare every pair, so that the time taken does not tell which user names exist
        matched = False
        for user, password in users.items():
            if credentials is not None:
                user_ok = secrets.compare_digest(credentials.username.encode(), user.encode())
                password_ok = secrets.compare_digest(credentials.password.encode(), password.encode())
                matched |= user_ok and password_ok
        if not matched:
            raise HTTPException(401, "incorrect or missing user name and password (HTTP basic, --api-auth)",
                                headers={"WWW-Authenticate": "Basic"})

    return check


class RequestLimits:
    """ASGI middleware: bodies over max_bytes answer 413 (by Content-Length, or counted while streamed), and
    every request writes one JSON line to the access log."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, received = time.monotonic(), [0], [0]
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes)

        async def counting_receive():
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_bytes:
                raise _BodyTooLarge(self.max_bytes)
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if too_large:
                raise _BodyTooLarge(self.max_bytes)
            await self.app(scope, counting_receive, recording_send)
        except _BodyTooLarge as error:
            if not status[0]:
                await _problem(error.status_code, error.detail)(scope, receive, recording_send)
        finally:
            client = scope.get("client") or ("", 0)
            ACCESS_LOG.info(json.dumps({"time": round(time.time(), 3), "client": client[0], "method": scope["method"],
                                        "path": scope["path"], "status": status[0],
                                        "ms": round(1000 * (time.monotonic() - started), 1)}))


class _BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body reading passes it on as it is (a 413), not as a parse error."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request is over {max_bytes} bytes (--max_request_mb)")


def create_app(config: ServerConfig) -> FastAPI:
    server = Server(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.shutdown()

    app = FastAPI(title="ldm server (AUTOMATIC1111-compatible API)", version="1.0", lifespan=lifespan,
                  dependencies=[Depends(_authentication(config.api_auth))])
    app.state.server = server
    app.add_middleware(RequestLimits, max_bytes=config.max_request_bytes)
    controlnet.add_routes(app, server.controlnets)

    @app.exception_handler(RequestProblem)
    async def request_problem(request, error: RequestProblem):
        return _problem(422, str(error))

    @app.exception_handler(HTTPException)
    async def http_problem(request, error: HTTPException):
        return _problem(error.status_code, str(error.detail), error.headers)

    async def generate(body, kind: str, request: Request):
        work = server.generator.work(body, kind)
        ticket = _submit(server, work, kind, body.force_task_id)
        answer = await _await_ticket(server, ticket, request)
        return response_body(body, answer)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await generate(body, "txt2img", request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: Request):
        return await generate(body, "img2img", request)

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False, id_task: str | None = None):
        snapshot = server.queue.progress(id_task)
        latent = snapshot.pop("current_latent")
        preview = None if skip_current_image else pictures.latent_preview(latent)
        return {**snapshot, "current_image": pictures.encode_png(preview) if preview is not None else None,
                "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        server.queue.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        server.queue.skip()
        return {}

    @app.get("/sdapi/v1/options")
    def get_options():
        values = server.settings.snapshot()
        current = server.folders.checkpoint(values["sd_model_checkpoint"])
        loaded = server.resident.key is not None and server.resident.key[0] == current.path
        values["sd_model_checkpoint"] = current.title(server.resident.short_hash() if loaded else None)
        values["sd_checkpoint_hash"] = server.resident.short_hash() if loaded else None
        return values

    @app.post("/sdapi/v1/options")
    async def set_options(changes: dict, request: Request):
        checked = server.settings.checked(changes)
        before = server.settings.snapshot()
        server.settings.update(checked)
        if {"sd_model_checkpoint", "sd_vae"} & set(checked):  # loaded now, as A1111 does, through the queue
            try:
                await _await_ticket(server, _submit(server, server.generator.load_work(), "load model"), request)
            except (RequestProblem, HTTPException):  # not loaded (a bad file, a full queue): the model options go back
                server.settings.update({name: before[name] for name in ("sd_model_checkpoint", "sd_vae")})
                raise
        return None

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        return {"port": None, "api_auth": bool(config.api_auth), "ckpt": str(config.ckpt) if config.ckpt else None,
                "models_dir": str(config.models_dir), "device": config.device, "precision": config.precision,
                "lowmem": config.low_memory}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        loaded_path = server.resident.key[0] if server.resident.key else None
        answer = []
        for entry in server.folders.checkpoints:
            short = server.resident.short_hash() if entry.path == loaded_path else None
            answer.append({"title": entry.title(short), "model_name": entry.stem, "hash": short, "sha256": None,
                           "filename": str(entry.path), "config": None})
        return answer

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        server.folders.refresh()
        return None

    @app.post("/sdapi/v1/refresh-vae")
    def refresh_vae():
        server.folders.refresh()
        return None

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return [{"model_name": entry.name, "filename": str(entry.path)} for entry in server.folders.vaes]

    @app.get("/sdapi/v1/samplers")
    def sampler_list():
        return [{"name": info.display_name, "aliases": [key, *info.aliases], "options": {}}
                for key, info in samplers.REGISTRY.items()]

    @app.get("/sdapi/v1/schedulers")
    def scheduler_list():
        return [{"name": key, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for key, label in samplers.SCHEDULE_NAMES.items()]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return server.upscalers.listing()

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": name} for name in hires.LATENT_UPSCALERS]

    @app.get("/sdapi/v1/loras")
    def loras():
        folder = Path(config.models_dir) / "Lora"
        files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in (".safetensors", ".pt", ".ckpt")
                       and path.is_file()) if folder.is_dir() else []
        return [{"name": path.stem, "alias": path.stem, "path": str(path), "metadata": {}} for path in files]

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        pipe = server.resident.pipeline
        found = getattr(pipe.loaded, "embeddings", None) if pipe is not None else None
        if found is None:
            return {"loaded": {}, "skipped": {}}
        loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                         "shape": int(embedding.vectors.shape[-1]), "vectors": embedding.n_vectors}
                  for name, embedding in found.embeddings.items()}
        return {"loaded": loaded, "skipped": {line: {} for line in found.skipped}}

    @app.get("/sdapi/v1/memory")
    def memory():
        ram = psutil.virtual_memory()
        answer = {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total,
                          "process_rss": psutil.Process().memory_info().rss}}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            answer["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                              "active": {"current": torch.cuda.memory_allocated(),
                                         "peak": torch.cuda.max_memory_allocated()}}
        else:
            answer["cuda"] = {"error": "no CUDA device"}
        return answer

    @app.get("/sdapi/v1/scripts")
    def scripts():  # A1111 lists its always-on scripts too: ControlNet's is the one that runs here
        return {"txt2img": [controlnet.SCRIPT_NAME], "img2img": [controlnet.SCRIPT_NAME]}

    @app.get("/sdapi/v1/face-restorers")
    def face_restorers():
        return []

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        return []

    @app.post("/sdapi/v1/png-info")
    def png_info(body: PngInfoRequest):
        if not body.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        image = pictures.decode_image(body.image, "image")
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        text = items.pop("parameters", "")
        parameters = {}
        if text:
            prompt, negative, fields = parse_parameters(text)
            parameters = {"Prompt": prompt, "Negative prompt": negative, **fields}
            width, _, height = fields.get("Size", "").partition("x")
            if width.isdigit() and height.isdigit():
                parameters.update({"Size-1": width, "Size-2": height})
        return {"info": text, "items": items, "parameters": parameters}

    async def upscaled(body: ExtrasRequest, encoded: dict, request: Request) -> list:
        """encoded: field name -> base64 picture. Decoding and resampling run off the event loop."""
        def checked():
            images = [pictures.decode_image(text, name) for name, text in encoded.items()]
            return Extras.checked(server.upscalers, body, images)

        extras = await asyncio.to_thread(checked)
        if extras.model is None:
            return await asyncio.to_thread(extras.resampled)
        return await _await_ticket(server, _submit(server, extras.x4_work(
            server.resident, server.settings.snapshot()["upscaler_x4_steps"]), "extras"), request)

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(body: ExtraSingleImageRequest, request: Request):
        results = await upscaled(body, {"image": body.image}, request)
        return {"html_info": "", "image": pictures.encode_png(results[0])}

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(body: ExtraBatchImagesRequest, request: Request):
        encoded = {f"imageList[{index}].data": item.data for index, item in enumerate(body.imageList)}
        results = await upscaled(body, encoded, request)
        return {"html_info": "", "images": [pictures.encode_png(image) for image in results]}

    return app
