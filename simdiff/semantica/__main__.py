"""``python -m simdiff.semantica train | sample | eval`` (see :mod:`simdiff.semantica.sample`)."""

import sys

from .sample import main

sys.exit(main())
