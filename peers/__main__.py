"""``python -m peers``: the same as ``ivshmem-peer``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
