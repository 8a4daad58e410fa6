"""``python -m diagpass``: the same command line as the ``diagpass`` console script."""

import sys

from diagpass.cli import main

sys.exit(main())
