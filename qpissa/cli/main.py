"""Thin command line on top of the library: ``qpissa decompose | report | train | convert | merge | eval | plan | example``.

Each command parses options, calls one library function and prints a rich table.
User errors (:class:`qpissa.errors.UserError`) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import typer

from qpissa.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="QPiSSA: principal singular components as adapters, NF4 residuals.")

# Commands register themselves from their own modules (one concept per module).
# --- command modules (keep this list in sync) ---
from qpissa import cli_decompose  # noqa: E402,F401
from qpissa import cli_train  # noqa: E402,F401
from qpissa import cli_use  # noqa: E402,F401
from qpissa import cli_plan  # noqa: E402,F401
from qpissa import cli_example  # noqa: E402,F401
# --- end command modules ---


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line."""
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
