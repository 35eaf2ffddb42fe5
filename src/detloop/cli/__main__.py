"""``python -m detloop.cli``."""

import sys

from detloop.cli.main import main

sys.exit(main())
