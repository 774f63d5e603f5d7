"""Starting driver processes from tests so that they can be interrupted like from a terminal."""

from __future__ import annotations

import signal


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT (Ctrl-C).

    A shell starts background and non-interactive jobs with SIGINT *ignored*, children inherit that, and Python
    installs its KeyboardInterrupt handler only when SIGINT is at its default: a test run from such a shell
    would send a Ctrl-C that nothing sees. Restoring the default before ``exec`` makes the child's Python
    install its handler whatever the test run inherited.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
