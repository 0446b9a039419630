"""The typer application every command module registers on (its own module, so nothing imports back up)."""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="QPiSSA: principal singular components as adapters, NF4 residuals.")
