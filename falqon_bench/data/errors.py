"""User-facing errors: the CLI prints the message (no traceback) and exits 2."""


class BenchInputError(Exception):
    """Bad input from the user (suite file, results path, option); the message names what and where."""
