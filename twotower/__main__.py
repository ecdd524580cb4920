"""`python -m twotower ...` is the `twotower` command."""

import sys

from twotower.cli import main

sys.exit(main())
