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


def _api_lost(err: BaseException | None) -> bool:
    """True when ``err`` (or what it was raised from) is a failed connection to an HTTP API —
    Prefect's, since opsd's own stores are files."""
    import httpx

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, httpx.TransportError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _status_of_this_process(root: str | None) -> str | None:
    """The catalog status of the run this process ran under ``root`` (None if none)."""
    try:
        from opsd.storage.catalog import Catalog
        from opsd.storage.layout import Layout, resolve_root

        if not (resolve_root(root) / "catalog.duckdb").exists():
            return None
        return Catalog(Layout.at(root)).status_of_process(os.getpid())
    except Exception:  # noqa: BLE001 - a report, never a second failure
        return None


LOST = ("Prefect's API became unreachable during the run, so the Prefect UI misses the run's "
        "last states and log lines")


def _leave(code: int, drained: bool) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if drained:
        raise SystemExit(code)
    os._exit(code)  # Prefect's exit hooks would wait for the unreachable server forever


def run_then_settle(fn: Callable[[], Any], root: str | None = None,
                    timeout: float = DRAIN_SECONDS) -> Any:
    """``fn()`` (a flow), then make sure Prefect's background workers cannot keep the process
    alive. When the flow raised because Prefect's API went away, the run's own outcome in the
    catalog decides: completed → a warning and exit 0; otherwise a clear error (the published
    stages are kept: the same command resumes) and exit 1."""
    try:
        result = fn()
    except SystemExit as err:
        if not _drained(timeout):
            _leave(err.code if isinstance(err.code, int) else 1, drained=False)
        raise
    except BaseException as err:
        if _api_lost(err):
            status = _status_of_this_process(root)
            drained = _drained(timeout)
            if status == "completed":
                print(f"warning: {LOST}. The run completed: its artifacts, catalog and MLflow "
                      "records do not depend on Prefect (check with `opsd runs`, `opsd verify`).",
                      file=sys.stderr)
                _leave(0, drained)
            print(f"error: {LOST} and the flow stopped ({type(err).__name__}: {err}). The stages "
                  "finished so far are published and catalogued; once Prefect is reachable, run "
                  "the same command again to resume from them.", file=sys.stderr)
            _leave(1, drained)
        if not _drained(timeout):
            traceback.print_exception(err)
            print(f"warning: {LOST}.", file=sys.stderr)
            _leave(1, drained=False)
        raise
    if not _drained(timeout):
        print(f"warning: {LOST}. The run's artifacts, catalog and MLflow records do not depend on "
              "it and are complete (check with `opsd runs` and `opsd verify`).", file=sys.stderr)
        _leave(0, drained=False)
    return result
