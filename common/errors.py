"""One exception type for bad user input, so entry points can print it as one line without a traceback."""


class InputError(ValueError):
    """A file, row, column or config key is not what the project expects; the message says which."""
