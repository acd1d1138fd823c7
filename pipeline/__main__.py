"""``python -m pipeline``: the same command line as the ``entropy-pipeline`` script."""

import sys

from pipeline.cli import main

sys.exit(main())
