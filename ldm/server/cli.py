"""The server's command line (scripts/serve.py and the ldm-serve entry point): A1111's flags where they exist."""
import importlib.util
import sys
from pathlib import Path

from ldm.generate import options
from ldm.generate.errors import UserError
from ldm.placement import PRECISIONS

LOOPBACK = "127.0.0.1"
DESCRIPTION = ("Serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img and friends, for clients such as webuiapi) over "
               "this project's generation layer: one model loaded at a time, one job at a time, a bounded queue.")


def parse_args(argv=None):
    parser = options.OneLineParser(prog="serve.py", description=DESCRIPTION)
    parser.add_argument("--port", type=int, default=7860, help="the port (default 7860, A1111's)")
    parser.add_argument("--listen", action="store_true",
                        help="bind 0.0.0.0 (every address) instead of 127.0.0.1; needs --api-auth, or --insecure")
    parser.add_argument("--server-name", "--server_name", dest="server_name", default=None, metavar="ADDRESS",
                        help="bind this address (implies --listen unless it is a loopback address)")
    parser.add_argument("--api-auth", "--api_auth", dest="api_auth", default=None, metavar="USER:PASS[,USER:PASS]",
                        help="HTTP basic authentication for every endpoint, as A1111's --api-auth")
    parser.add_argument("--insecure", action="store_true",
                        help="allow --listen without --api-auth (anyone on the network can use the server)")
    parser.add_argument("--api", action="store_true", help="accepted for A1111's command lines: the API is always on")
    parser.add_argument("--nowebui", action="store_true", help="serve the API only, without the web page at /")
    parser.add_argument("--ckpt", default=None, help="the checkpoint loaded first (default: the first in --models_dir, "
                                                     "or the embedded model when there is none)")
    parser.add_argument("--models_dir", "--models-dir", dest="models_dir", default="models", metavar="FOLDER",
                        help="checkpoints in FOLDER/Stable-diffusion and FOLDER/ldm, VAEs in FOLDER/VAE, LoRAs in "
                             "FOLDER/Lora (default models)")
    parser.add_argument("--embeddings_dir", "--embeddings-dir", dest="embeddings_dir", default=None, metavar="FOLDER",
                        help="textual-inversion embeddings (default embeddings/ when it exists)")
    parser.add_argument("--controlnet_dir", "--controlnet-dir", dest="controlnet_dir", action="append", default=[],
                        metavar="FOLDER", help="ControlNets found here before FOLDER/ControlNet of --models_dir "
                                               "(A1111's extension's flag); repeatable")
    parser.add_argument("--outdir", default=".", help="the folder save_images writes under (the options' outdir_* "
                                                      "folders are relative to it; default: the current folder)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--precision", default="autocast", choices=PRECISIONS,
                        help="full = fp32; autocast = fp16 on CUDA, fp32 on a CPU; bf16 on either")
    parser.add_argument("--lowmem", "--medvram", dest="lowmem", action="store_true",
                        help="keep one of text encoder, UNet and VAE in memory at a time")
    parser.add_argument("--queue_size", type=int, default=8,
                        help="jobs that may wait behind the running one; more answer 503 with Retry-After (default 8)")
    parser.add_argument("--max_request_mb", type=float, default=64,
                        help="refuse request bodies over this many MiB with 413 (default 64)")
    return parser.parse_args(argv)


def parse_api_auth(text: str | None) -> dict:
    """--api-auth "user:pass[,user2:pass2]" as {user: password}; ValueError naming what is wrong."""
    users = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        user, colon, password = pair.strip().partition(":")
        if not colon or not user or not password:
            raise ValueError(f"--api-auth {pair.strip()!r} is not user:password")
        users[user] = password
    return users


def check_args(args) -> tuple[str, dict]:
    """The address to bind and the users; UserError for a combination that is not safe or not valid."""
    try:
        users = parse_api_auth(args.api_auth)
    except ValueError as error:
        raise UserError(f"{error}: give user:password pairs separated by commas") from None
    host = args.server_name or ("0.0.0.0" if args.listen else LOOPBACK)
    public = host not in (LOOPBACK, "localhost", "::1")
    if public and not users and not args.insecure:
        raise UserError(f"binding {host} without --api-auth lets anyone on the network run jobs: add --api-auth "
                        "user:password, or --insecure if that is what you want")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number: use 1..65535")
    if args.queue_size < 1:
        raise UserError(f"--queue_size must be at least 1 (got {args.queue_size})")
    if not args.max_request_mb > 0:
        raise UserError(f"--max_request_mb must be above 0 (got {args.max_request_mb})")
    if args.ckpt and not Path(args.ckpt).is_file():
        raise UserError(f"--ckpt {args.ckpt}: no such file")
    missing = [folder for folder in getattr(args, "controlnet_dir", []) if not Path(folder).is_dir()]
    if missing:
        raise UserError(f"--controlnet_dir {missing[0]}: no such folder")
    return host, users


def main(argv=None):
    args = parse_args(argv)
    host, users = check_args(args)
    from ldm.server.app import ServerConfig, create_app
    from ldm.server.serving import access_log_to_stderr, uvicorn_server

    config = ServerConfig(models_dir=Path(args.models_dir), ckpt=Path(args.ckpt) if args.ckpt else None,
                          output_root=Path(args.outdir), device=args.device, precision=args.precision,
                          low_memory=args.lowmem, embeddings_dir=args.embeddings_dir, api_auth=users,
                          controlnet_dirs=tuple(args.controlnet_dir),
                          max_waiting=args.queue_size, max_request_bytes=int(args.max_request_mb * 1024 * 1024))
    app = create_app(config)
    access_log_to_stderr()
    print(f"serving the A1111 API on http://{host}:{args.port}/sdapi/v1 (docs: /docs)", flush=True)
    if not args.nowebui:
        _mount_page(app, users, f"http://{host}:{args.port}/")
    uvicorn_server(app, host, args.port).run()
    return 0


def _mount_page(app, users: dict, address: str):
    """The Gradio page at "/", when gradio is installed (the serve extra); the API alone otherwise."""
    if importlib.util.find_spec("gradio") is None:
        print("no web page: gradio is not installed (pip install -e '.[serve]'); serving the API only",
              file=sys.stderr, flush=True)
        return
    from ldm.server.page import mount_page

    mount_page(app, users)
    print(f"the web page: {address}", flush=True)


def run():
    """The console entry point (ldm-serve)."""
    options.run_cli(main)
