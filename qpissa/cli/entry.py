"""Entry point: register every command on :data:`qpissa.cli.app.app` and run it.

User errors (:class:`qpissa.errors.UserError`) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

# each module registers its commands; this order is the order of `qpissa --help`
from qpissa.cli import decompose  # noqa: F401,I001
from qpissa.cli import train  # noqa: F401
from qpissa.cli import use  # noqa: F401
from qpissa.cli import plan  # noqa: F401
from qpissa.cli import example  # noqa: F401
from qpissa.cli import compare  # noqa: F401
from qpissa.cli.app import app
from qpissa.errors import UserError


def main() -> None:
    """Run the app, turning user errors into one clear line."""
    try:
        app()
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")  # one write: lines from several ranks never interleave
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
