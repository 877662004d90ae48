"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class MmloraError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
