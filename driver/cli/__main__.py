"""``python -m charforge.driver.cli``: the driver's commands (without the recipes' groups)."""

import sys

from .app import main

sys.exit(main())
