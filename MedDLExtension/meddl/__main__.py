"""``python -m meddl``: the same as the ``meddl`` console script."""

import sys

from .cli import main

sys.exit(main())
