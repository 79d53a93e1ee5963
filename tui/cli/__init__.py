"""The ``budgeteer`` command line: opens the dashboard by default, and scripts the engine.

A contract (see the README): every command takes ``--db`` (env ``BUDGETEER_DB``),
prints human tables by default and JSON with ``--json``, exits 0 on success, 2 on bad
usage or bad input and 1 on any other failure, with one clear sentence on stderr and
never a traceback (``BUDGETEER_DEBUG=1`` shows one).

One module per command group, each with a ``register(sub, common)`` that adds its commands;
``program`` lists the groups once and runs a command; ``common`` holds what they share.
"""

from tui.cli.program import build_parser, main

__all__ = ["build_parser", "main"]
