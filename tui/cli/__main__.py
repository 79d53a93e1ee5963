"""``python -m tui.cli``: the same as the ``budgeteer`` script."""

import sys

from tui.cli.program import main

sys.exit(main())
