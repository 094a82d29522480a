"""``python -m supsup`` runs the command-line interface."""

from supsup.cli import app

app()
