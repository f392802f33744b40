"""``python -m simdiff ...`` runs the ``simdiff`` command line."""

import sys

from simdiff.cli import main

sys.exit(main())
