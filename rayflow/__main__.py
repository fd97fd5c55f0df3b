"""``python -m rayflow`` runs the ``rayflow`` command."""

from rayflow.cli import main

main()
