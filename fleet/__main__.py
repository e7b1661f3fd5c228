"""``python -m fleet``: the same as the ``edge-fleet`` command."""

from __future__ import annotations

import sys

from fleet.cli import main

sys.exit(main())
