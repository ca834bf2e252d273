"""``python -m gateway``: the only place that calls ``sys.exit``."""

import sys

from gateway.cli import main

sys.exit(main())
