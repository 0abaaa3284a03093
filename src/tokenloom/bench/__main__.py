"""``python -m tokenloom.bench serve | throughput | report``."""

from __future__ import annotations

import sys

from tokenloom.bench.cli import main

sys.exit(main())
