"""``python -m supsup`` runs the command-line interface."""

import sys

from supsup.cli import main

sys.exit(main())
