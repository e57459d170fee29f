"""``python -m imsm_bench``: same as the ``imsm-bench`` console script."""

import sys

from .cli import main

sys.exit(main())
