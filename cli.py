"""How every command line reports a user's mistake: one line naming the culprit and the fix.

A wrong flag, a missing file or a bad dataset is the user's to fix, and a traceback buries the
one line that says how. `main_guard` prints that line (to stderr, exit status 2); the traceback
comes back with --debug on the command line or PI_DEBUG=1 in the environment. Errors of our
own making (anything but the kinds below) keep their traceback.
"""

import argparse
import os
import sys
from contextlib import contextmanager

USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError)


def debug_requested(argv=None):
    """--debug on the command line (removed from it) or PI_DEBUG=1."""
    argv = sys.argv if argv is None else argv
    if "--debug" in argv:
        argv.remove("--debug")
        return True
    return os.environ.get("PI_DEBUG", "") not in ("", "0")


@contextmanager
def main_guard():
    debug = debug_requested()
    try:
        yield
    except USER_ERRORS as e:
        if debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError quotes its message
        print(f"error: {message}\n(the traceback: run again with --debug)", file=sys.stderr)
        sys.exit(2)


def at_least(low, kind=int):
    """An argparse type: a number of `kind` >= low (argparse then names the flag in its one-line error)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value
    return parse


def above(low):
    """An argparse type: a float > low."""
    def parse(text):
        value = at_least(-float("inf"), float)(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"{text} must be above {low}")
        return value
    return parse
