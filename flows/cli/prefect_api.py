"""The Prefect API that a command's flow runs report to, kept alive through Ctrl-C.

With PREFECT_API_URL set, flows report to that server and there is nothing to do. Without it,
Prefect's client starts a temporary local server on first use (`SubprocessASGIServer`, one per
process) as a child in the terminal's process group, so Ctrl-C killed it together with the CLI:
the flow could not record that it was interrupted ("Finished in state Running()"), and every later
API call retried against a dead server for minutes before failing with ConnectError.

`prefect_api` starts that same server before any flow runs, with SIGINT blocked in the child (the
signal mask is inherited across fork and exec; Ray starts its own processes the same way), and
stops it when the command ends. Prefect has no public option for how the temporary server is
spawned, so this is the one place that reaches for `prefect.server.api.server`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


@contextmanager
def prefect_api() -> Iterator[None]:
    """Start the temporary Prefect server unless PREFECT_API_URL names one (see the module
    docstring); stop it on exit."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses when it needs a server
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    logger.debug("temporary Prefect server at %s", server.api_url)
    try:
        yield
    finally:
        server.stop()
