"""The Prefect API that a command's flow runs report to, kept alive through Ctrl-C.

With PREFECT_API_URL set, flows report to that server and there is nothing to do. Without it,
Prefect's client starts a temporary local server on first use (`SubprocessASGIServer`, one per
process) as a child in the terminal's process group, so Ctrl-C killed it together with the CLI:
the flow could not record that it was interrupted ("Finished in state Running()"), and every later
API call retried against a dead server for minutes before failing with ConnectError.

`prefect_api` starts that same server before any flow runs, with SIGINT blocked in the child (the
signal mask is inherited across fork and exec; Ray starts its own processes the same way), and
stops it when the command ends, after Prefect's background senders of logs and events have
delivered what they hold (as Prefect's own test harness does): sent later, they would retry
against a stopped server at exit. Prefect has no public option for how the temporary server is
spawned, so this is the one place that reaches for `prefect.server.api.server`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Prefect's own default (20 s) is too short for a first start on a busy machine, which migrates a
# new database: a slow start should not fail a run.
MIN_STARTUP_TIMEOUT_S = 120


@contextmanager
def prefect_api() -> Iterator[None]:
    """Start the temporary Prefect server unless PREFECT_API_URL names one (see the module
    docstring); stop it on exit."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses when it needs a server
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start(max(MIN_STARTUP_TIMEOUT_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    logger.debug("temporary Prefect server at %s", server.api_url)
    try:
        yield
    finally:
        _deliver_pending_logs_and_events()
        server.stop()


def _deliver_pending_logs_and_events(timeout_s: float = 10.0) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - the run is over; its last records are best effort
            logger.debug("Prefect %s not drained: %s", worker.__name__, type(err).__name__)
