"""``python -m visiontl`` = the ``visiontl`` command."""

import sys

from visiontl.cli.commands import main

sys.exit(main())
