"""Serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img and friends, for its clients such as webuiapi) over this
project's generation layer: one model loaded at a time, one job at a time, a bounded queue. See --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import options  # noqa: E402
from ldm.server.cli import main  # noqa: E402

if __name__ == "__main__":
    options.run_cli(main)
