"""``python -m hessian_blocks.cli``: the console script."""

import sys

from . import main

sys.exit(main())
