"""User-facing errors.

A `CompressError` is bad input: the CLI prints its message on one line and exits
with code 2, never with a traceback. Messages name the field and what is allowed.
"""


class CompressError(ValueError):
    """Bad input from the user (recipe, arguments, model, data)."""
