"""Thin command line on top of the library: ``qpissa decompose | report | train | convert | merge | eval | plan | example``.

Each command parses options (derived from the config dataclasses, see :mod:`qpissa.cli.options`),
calls one library function and prints a rich table. :func:`main` is the ``qpissa`` entry point.
"""
from __future__ import annotations


def main() -> None:
    """Entry point (``qpissa`` and ``python -m qpissa``); see :func:`qpissa.cli.entry.main`."""
    try:
        from qpissa.cli.entry import main as run
    except KeyboardInterrupt:  # Ctrl-C while torch imports: nothing was started
        import sys

        sys.stderr.write("interrupted: nothing was started\n")
        raise SystemExit(130) from None
    run()
