"""``python -m charforge.recipes.cli ...`` = the ``charforge`` command."""

import sys

from . import main

sys.exit(main())
