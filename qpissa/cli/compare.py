"""CLI command ``qpissa compare``: options from :class:`CompareConfig`, call :func:`qpissa.compare.compare`,
print the summary table."""
from __future__ import annotations

from typing import Optional

import typer

from qpissa.cli.app import app
from qpissa.cli.options import Options, help_of, with_options, write_config
from qpissa.compare.config import CompareConfig


@app.command("compare")
@with_options(config_file=True, options=Options(CompareConfig, exclude=("model", "output", "progress"), toggles=False))
def compare_command(
    model: Optional[str] = typer.Argument(None, help=help_of(CompareConfig, "model") + " (not needed with --report)"),
    output: str = typer.Option(..., "--output", "-o", help=help_of(CompareConfig, "output")),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bars"),
    options: dict = None,  # type: ignore[assignment]  (CompareConfig's fields, see with_options)
    resolved: dict = None,  # type: ignore[assignment]  (every option's final value → STUDY/config.yaml)
) -> None:
    """Methods × seeds (× learning rates) → decompose, train, evaluate; a table with error bars and a plot."""
    from pathlib import Path

    from qpissa.compare.study import compare
    from qpissa.errors import UserError

    if not options["report"]:
        missing = [f"--{k.replace('_', '-')}" for k in ("data", "eval_data") if not options[k]]
        if model is None or missing:
            raise UserError(f"qpissa compare needs MODEL{', ' + ', '.join(missing) if missing else ''}: "
                            "e.g. qpissa compare MODEL --data TRAIN --eval-data HELDOUT -o STUDY")
    compare(CompareConfig(model=model or "", output=output, **options, progress=not no_progress))
    if not options["report"]:
        write_config(Path(output) / "config.yaml", {k: v for k, v in resolved.items() if k != "report"}, "compare")
    print((Path(output) / "summary.md").read_text(), end="")
