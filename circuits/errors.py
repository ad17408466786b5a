"""The one error type a user can act on; the CLI prints it as one line and exits 2."""


class CircuitsError(Exception):
    """Bad input or a missing file: the message says what is wrong and what to do."""
