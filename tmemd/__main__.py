"""``python -m tmemd``."""

import sys

from tmemd.cli import main

sys.exit(main())
