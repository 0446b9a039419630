"""One exception type for user errors: the CLI prints its message as one line, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message names the file/tensor and what to do."""
