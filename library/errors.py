"""User-facing errors: one line naming the file or key and what to do, no traceback."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user (path, file, argument, config key). Printed as one line."""


@contextmanager
def exit_on_user_error():
    """Wrap a command-line entry point: a UserError becomes `error: <message>` and exit code 2."""
    try:
        yield
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
