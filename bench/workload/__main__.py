"""``python -m bench.workload``: does tmem save I/O? (bench/workload/runner.py)."""

import sys

from bench.workload.runner import main

sys.exit(main())
