class UserError(Exception):
    """Bad input from the command line: printed as one line naming the problem and the fix, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C during sampling: the run stops after the current step; finished images are kept."""
