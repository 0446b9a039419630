"""Entry point: register every command on :data:`qpissa.cli.app.app` and run it.

User errors (:class:`qpissa.errors.UserError`, a full disk included) become one line on stderr and exit code 2;
Ctrl-C one line (what was kept, how to resume: :func:`qpissa.atomic.output_folder`) and exit code 130.
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
from qpissa.atomic import disk_full
from qpissa.errors import UserError


def main() -> None:
    """Run the app, turning user errors into one clear line."""
    try:
        app()
    except UserError as err:
        _say(f"error: {err}")
        sys.exit(2)
    except SystemExit as done:  # typer turns Ctrl-C into a silent exit 130; say what was kept, how to resume
        if done.code == 130:
            _say(_interrupt_line(done))
        raise
    except KeyboardInterrupt as err:
        _say(str(err) or "interrupted")
        sys.exit(130)
    except Exception as err:
        if not disk_full(err):  # a writer outside any output_folder: still one line
            raise
        _say(f"error: no space left on device ({err}); free space and rerun")
        sys.exit(2)


def _interrupt_line(err: BaseException | None) -> str:
    """The message of the Ctrl-C behind typer's exit (:class:`qpissa.atomic.Interrupted` says what was kept)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, KeyboardInterrupt):
            return str(err) or "interrupted"
        err = err.__cause__ or err.__context__
    return "interrupted"


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: lines from several ranks never interleave
    sys.stderr.flush()


if __name__ == "__main__":
    main()
