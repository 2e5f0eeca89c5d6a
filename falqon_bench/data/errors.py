"""User-facing errors: the CLI prints the message (no traceback) and exits 2."""

from __future__ import annotations

import sys
from typing import Callable

EXIT_INPUT_ERROR = 2


class BenchInputError(Exception):
    """Bad input from the user (suite file, results path, option); the message names what and where."""


def script_exit_code(body: Callable[[], None]) -> int:
    """Run a `python -m` reader's body: 0, or EXIT_INPUT_ERROR with "error: <message>" on stderr for a
    BenchInputError (a missing or corrupt results path is a ResultsError), as the CLI's commands do."""
    try:
        body()
    except BenchInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0
