"""``python -m secondorder.cli``: the same as the ``secondorder`` command."""

import sys

from secondorder.cli import main

sys.exit(main())
