"""``python -m visiontl`` = the ``visiontl`` command."""

import sys

from visiontl.cli import main

sys.exit(main())
