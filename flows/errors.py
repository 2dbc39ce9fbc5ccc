"""Turn known user errors into one clear message and exit code 2 (no traceback)."""

from __future__ import annotations

import sys
from contextlib import contextmanager


def _user_error_types() -> tuple[type[BaseException], ...]:
    from opsd.backends import BackendUnavailable
    from opsd.config import ConfigError
    from opsd.context.render import ContextError
    from opsd.data import DatasetError
    from opsd.models import ModelError
    from opsd.flows.runner import DiskFull, UpstreamMissing
    from opsd.storage.layout import InvalidName, RootError
    from opsd.stages.teacher import RolloutMismatch
    from opsd.stages.train import TargetMismatch

    return (ConfigError, DatasetError, ModelError, ContextError, BackendUnavailable,
            UpstreamMissing, RolloutMismatch, TargetMismatch, DiskFull, RootError,
            InvalidName)


@contextmanager
def user_errors():
    try:
        yield
    except _user_error_types() as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
