"""``python -m simdiff.cascade train-sr | sample | pack`` (see :mod:`simdiff.cascade.cli`)."""

import sys

from .cli import main

sys.exit(main())
