"""``python -m qpissa`` runs the CLI (the same as the ``qpissa`` command)."""
from qpissa.cli import main

main()
