"""The project's log records in the Prefect UI, attached to the flow or task run that wrote them.

Prefect sends its run loggers' records to its API; the project logs through its own loggers
(`flows`, `diffusion_core`, `serving`), which Prefect sends only when they are named in
PREFECT_LOGGING_EXTRA_LOGGERS at the time Prefect configures logging. `project_logs_to_prefect`
does the same for the duration of a flow run, wherever the flow runs (the CLI, a deployment's
worker), without depending on that setting: it attaches Prefect's API handler to those loggers and
removes it afterwards. Records outside a run context (none inside a flow) would only be warned
about by the handler, so it is attached only while a flow runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

PROJECT_LOGGERS = ("flows", "diffusion_core", "serving")


@contextmanager
def project_logs_to_prefect() -> Iterator[None]:
    """Send INFO and above of the project's loggers to the Prefect API while the block runs (see
    the module docstring). Nested use adds nothing: the outermost flow's handler serves its
    subflows and tasks."""
    from prefect.logging.handlers import APILogHandler

    added: list[tuple[logging.Logger, logging.Handler, int]] = []
    for name in PROJECT_LOGGERS:
        log = logging.getLogger(name)
        if any(isinstance(h, APILogHandler) for h in log.handlers):
            continue
        handler = APILogHandler(level=logging.INFO)
        log.addHandler(handler)
        added.append((log, handler, log.level))
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
    try:
        yield
    finally:
        for log, handler, level in added:
            log.removeHandler(handler)
            log.setLevel(level)
