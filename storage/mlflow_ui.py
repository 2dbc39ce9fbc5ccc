"""`opsd ui`: an MLflow server owned by the command, and the URLs it lands on.

Owned: the server starts in its own session (process group), so a terminal's Ctrl-C reaches
only `opsd ui`, which then stops the whole group — the `mlflow server` launcher, its uvicorn
worker and, when they run, the job runner and its huey consumers — and waits for them; SIGTERM
and SIGHUP do the same. MLflow's job execution (the queue behind GenAI judges and scorers, ≈ 2.3
GiB in 8 processes here) is off unless the caller's environment turns it on: opsd queues no jobs.

Landing: MLflow 3.17 keeps the "GenAI" / "Model training" choice per browser and opens on
GenAI; the URL parameter ``workflowType=machine_learning`` selects the model-training view for
that page, and ``viewStateShareKey`` applies the shared runs view that the tracker writes
(recipe, objective and headline metrics as columns: :func:`opsd.storage.tracking.runs_view_state`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from types import FrameType

from opsd.storage.tracking import RUNS_VIEW_KEY

JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_MODEL_TRAINING = "workflowType=machine_learning"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, model-training view, opsd's columns."""
    return f"{base}/#/experiments/{experiment_id}/runs?{_MODEL_TRAINING}&viewStateShareKey={RUNS_VIEW_KEY}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page (overview, metrics, nested stage runs, artifacts), model-training view."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{_MODEL_TRAINING}"


def browse_host(host: str) -> str:
    """The host to put in a URL: a wildcard bind address is reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens there (its /health would answer for our server)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(1.0)
        return s.connect_ex((browse_host(host), port)) == 0


def server_command(backend_uri: str, artifact_uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--default-artifact-root", artifact_uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the caller's, with MLflow's job workers off by default."""
    out = dict(os.environ if env is None else env)
    out.setdefault(JOB_EXECUTION_ENV, "false")
    return out


class StopRequested(Exception):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) arrived while the server ran."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise StopRequested(signum)


class OwnedServer:
    """An ``mlflow server`` process group that this process starts, waits on and stops.

    Use as a context manager: leaving the block (normally, by an exception, or by a stop
    signal turned into :class:`StopRequested`) stops every process of the group.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], health_url: str):
        self.cmd, self.env, self.health_url = cmd, env, health_url
        self.proc: subprocess.Popen | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "OwnedServer":
        # handlers first: a signal that lands while the server starts still stops it
        self._previous = {s: signal.signal(s, _raise_stop) for s in _STOP_SIGNALS}
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self.stop()
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
        return exc[0] is StopRequested  # a requested stop is a clean exit

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Return once the server answers on its health URL; raise if it exits or stalls."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not answer {self.health_url} "
                                       f"within {timeout:.0f} s")
                time.sleep(0.5)

    def wait(self) -> int:
        """Block until the server exits by itself (a stop signal raises StopRequested)."""
        return self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the group and to every descendant, SIGKILL to what is left after ``grace``.

        Descendants are also signalled one by one: a worker that left the group (a new
        session of its own) is still a child of this tree when the stop begins.
        """
        if self.proc is None:
            return
        for s in _STOP_SIGNALS:  # a second Ctrl-C must not abandon the cleanup halfway
            signal.signal(s, signal.SIG_IGN)
        family = _descendants(self.proc.pid)
        _signal_all(self.proc.pid, family, signal.SIGTERM)
        if not _wait_gone(self.proc, family, grace):
            _signal_all(self.proc.pid, family, signal.SIGKILL)
            _wait_gone(self.proc, family, 5.0)
        self.proc.wait()


def _descendants(pid: int) -> list:
    """psutil handles of every process below ``pid`` (empty without psutil)."""
    try:
        import psutil
    except ImportError:  # the process group alone is then the tree
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_all(group: int, procs: list, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.send_signal(signum)
        except Exception:  # already gone (psutil.NoSuchProcess) or not ours to signal
            pass


def _wait_gone(proc: subprocess.Popen, procs: list, timeout: float) -> bool:
    """Wait up to ``timeout`` for the launcher and ``procs`` to exit; whether all did."""
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    while any(_running(p) for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _running(p) -> bool:
    """Alive and not a zombie: an orphan that exited waits for its new parent to reap it, and
    in a container that parent (PID 1) may never do so."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
