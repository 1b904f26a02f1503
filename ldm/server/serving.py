"""Running the app under uvicorn with a graceful stop: on SIGINT or SIGTERM no new job is taken, waiting jobs
are dropped, the running one stops after its current step (its answer and saved files are kept), then uvicorn
closes the connections."""
import logging
import sys

import uvicorn


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame):
        self.on_exit()
        super().handle_exit(sig, frame)


def access_log_to_stderr():
    """The access log's JSON lines on stderr (uvicorn's own access log is off)."""
    logger = logging.getLogger("ldm.server.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def uvicorn_server(app, host: str, port: int, graceful_seconds: float = 30) -> GracefulServer:
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=graceful_seconds)
    return GracefulServer(config, app.state.server.shutdown)
