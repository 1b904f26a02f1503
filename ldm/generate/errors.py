import os
import signal
import sys


class UserError(Exception):
    """Bad input from the command line: printed as one line naming the problem and the fix, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C during sampling: the run stops after the current step; finished images are kept."""


class Skipped(Interrupted):
    """A server's Skip (A1111's): the current batch stops and is dropped, the run goes on with the next one."""


def exit_quietly_on_ctrl_c(line: str = "interrupted by Ctrl-C while starting: nothing was saved"):
    """Ctrl-C in the seconds a script spends importing torch exits 130 with one line instead of a traceback.

    Called first thing by the scripts; options.run_cli puts Python's own handler back when main() starts,
    and from then on handles Ctrl-C itself.
    """
    def exit_quietly(signum, frame):
        print(line, file=sys.stderr, flush=True)
        # Not sys.exit: some libraries guard optional imports with a bare except, which would swallow
        # SystemExit and let the script run on. Nothing has been written yet, so nothing is lost.
        os._exit(130)

    signal.signal(signal.SIGINT, exit_quietly)
