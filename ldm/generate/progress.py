"""Progress bars and Ctrl-C: the run stops cleanly after the current step."""
import signal
from contextlib import contextmanager

from tqdm import tqdm

from ldm.generate.errors import Interrupted


class StopFlag:
    """Set by the first Ctrl-C; a second Ctrl-C interrupts at once as usual."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def catching_sigint(self):
        def request_stop(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        try:
            previous = signal.signal(signal.SIGINT, request_stop)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def step_callback(progress: tqdm, stop: StopFlag, preview=None):
    """The samplers' per-step callback: advance the bar, hand the step to a preview, honour a stop request."""

    def callback(info):
        if progress.total != info["total"]:  # e.g. 30 DDIM steps walk 31 timesteps, as in the originals
            progress.total = info["total"]
        progress.update(1)
        if preview is not None:
            preview(info)
        if stop.requested:
            raise Interrupted(f"step {info['i'] + 1} of {info['total']}")

    return callback


def progress_bar(total: int, description: str) -> tqdm:
    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
