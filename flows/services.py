"""Leaving Prefect cleanly when its API went away during a run.

Prefect 3 runs flows and tasks in the client process: when its server dies mid-run (the
temporary local server killed, a remote API down), the run itself goes on and finishes — opsd's
artifacts, catalog and MLflow do not depend on Prefect — but the events and log lines Prefect
queued for the server cannot be sent, and at interpreter exit Prefect waits for them forever
(measured: a finished ``opsd run`` still hanging minutes later in ``_QueueServiceBase.drain``).
:func:`run_then_settle` drains those queues with a time limit after the flow; when they cannot
drain, it says what was lost and ends the process with the run's own exit code.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable

DRAIN_SECONDS = 20.0


def _drained(timeout: float) -> bool:
    """Stop Prefect's event and API-log workers, sending what they hold; False when they did not
    finish within ``timeout`` (their server is unreachable)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:  # Prefect moved them: nothing known to wait for
        return True
    for service in (EventsWorker, APILogWorker):
        _, pending = service.drain_all(timeout=timeout, at_exit=False)
        if pending:
            return False
    return True


def _leave(code: int) -> None:
    print("warning: Prefect's API became unreachable during the run, so the Prefect UI misses "
          "the run's last task states and log lines. The run's artifacts, catalog and MLflow "
          "records do not depend on it and are complete (check with `opsd runs` and "
          "`opsd verify`). Exiting without waiting for Prefect.", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # Prefect's exit hooks would wait for the unreachable server forever


def run_then_settle(fn: Callable[[], Any], timeout: float = DRAIN_SECONDS) -> Any:
    """``fn()``, then make sure Prefect's background workers cannot keep the process alive."""
    try:
        result = fn()
    except SystemExit as err:
        if not _drained(timeout):
            _leave(err.code if isinstance(err.code, int) else 1)
        raise
    except BaseException as err:
        if not _drained(timeout):
            traceback.print_exception(err)
            _leave(1)
        raise
    if not _drained(timeout):
        _leave(0)
    return result
