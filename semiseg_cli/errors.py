"""User-facing errors.

A `UserError` is bad input the user can fix (a missing file, an unknown preset key, a label value
out of range). The CLI prints its message as one line and exits non-zero without a traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names what is wrong and how to fix it, on one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
