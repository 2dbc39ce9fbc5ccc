"""Prefect task runners for the shards of the rollout and teacher stages (``runner.*``).

Every missing shard becomes one Prefect task run (``rollout shard 3/8``) submitted to
the task runner ``runner.kind`` selects:

- ``threads``: ``ThreadPoolTaskRunner(workers)`` in the flow process; the shards share
  the models the flow already holds;
- ``processes``: ``ProcessPoolTaskRunner(workers)``; spawned processes, each loading the
  model(s) once and keeping them for the shards it runs;
- ``ray``: prefect-ray's ``RayTaskRunner`` — a local Ray instance with
  ``workers × cpus_per_worker`` CPUs, or the cluster at ``runner.ray_address``.

The offline flow keeps one runner open across its rollout and teacher stages (workers
keep the model they loaded for the rollouts and score with it) and closes it before
training: worker processes, their model copies and a local Ray instance are gone by then. Workers only write their shard files; the
flow process publishes the artifact and is the only writer of the DuckDB catalog.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opsd.config import RunnerConfig


class ShardWork:
    """A shard function and its job, as one task parameter.

    A plain object (not a collection or dataclass): Prefect and prefect-ray walk collection
    parameters looking for futures, which for a teacher job means every token id.
    """

    __slots__ = ("fn", "job")

    def __init__(self, fn: Callable[[Any], dict], job: Any):
        self.fn, self.job = fn, job

    def __getstate__(self):
        return (self.fn, self.job)

    def __setstate__(self, state):
        self.fn, self.job = state


@task(name="shard", task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def shard_task(work: ShardWork, name: str, threads: int | None = None) -> dict:
    """Write one shard: ``work.fn(work.job)`` (a stage's pure shard function)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out = work.fn(work.job)
    # Evidence for tests and logs: a worker leaves no catalog file (database or lock) open.
    out["catalog_files_open"] = _open_catalog_files()
    get_run_logger().info(f"{name}: {out.get('samples', '?')} samples written by "
                          f"{out.get('worker')} in {time.perf_counter() - t0:.1f}s")
    return out


def _open_catalog_files() -> list[str]:
    """Catalog files (``catalog.duckdb``, its WAL and lock) this process has open (Linux)."""
    out = []
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target).startswith("catalog.duckdb"):
            out.append(target)
    return out


class PrefectShards:
    """A :class:`stages.shards.ShardRunner` backed by a Prefect task runner.

    Used as a context manager around several stages (the offline flow wraps rollout and
    teacher), the task runner — its worker processes with the models they loaded, or the
    local Ray instance — is started at the first shard and kept until the block ends, so
    the teacher stage reuses the workers the rollout stage warmed up. Outside a ``with``
    block every ``map`` starts and stops its own.
    """

    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self.kind = cfg.kind
        self.remote = cfg.kind in ("processes", "ray")
        self._session = False
        self._stack: ExitStack | None = None
        self._runner = None

    def __getstate__(self) -> dict:
        # Prefect pickles the calling task's context (its parameters included) for every shard
        # sent to another process: a copy carries the settings, not the open runner.
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def __enter__(self) -> "PrefectShards":
        self._session = True
        return self

    def __exit__(self, *exc) -> None:
        self._session = False
        self._close()

    def _open(self):
        stack = ExitStack()
        try:
            if self.remote:
                stack.enter_context(_api_for_workers())
            self._runner = stack.enter_context(self._task_runner())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self._runner

    def _close(self) -> None:
        stack, self._stack, self._runner = self._stack, None, None
        if stack is not None:
            stack.close()

    def _task_runner(self):
        cfg = self.cfg
        if cfg.kind == "threads":
            from prefect.task_runners import ThreadPoolTaskRunner

            return ThreadPoolTaskRunner(max_workers=cfg.workers)
        if cfg.kind == "processes":
            from prefect.task_runners import ProcessPoolTaskRunner

            return ProcessPoolTaskRunner(max_workers=cfg.workers)
        from prefect_ray.task_runners import RayTaskRunner

        init: dict[str, Any] = {}
        if cfg.ray_address is None:  # a local instance sized to the workers asked for
            init = {"num_cpus": cfg.workers * cfg.cpus_per_worker, "include_dashboard": False}
        return RayTaskRunner(address=cfg.ray_address, init_kwargs=init)

    def _submit_options(self):
        if self.kind == "ray":
            from prefect_ray.context import remote_options

            return remote_options(num_cpus=self.cfg.cpus_per_worker)
        return nullcontext()

    def map(self, fn, jobs: Sequence[Any], names: Sequence[str],
            on_done: Callable[[dict], None] | None = None, label: str = "stage") -> list[dict]:
        if not jobs:
            return []
        where = self.kind if self.cfg.ray_address is None else f"ray at {self.cfg.ray_address}"
        get_run_logger().info(f"{label}: {len(jobs)} shard(s) → {where} "
                              f"({self.cfg.workers} worker(s))")
        threads = self.cfg.cpus_per_worker if self.remote else None
        results: list[dict | None] = [None] * len(jobs)
        errors: list[BaseException] = []
        runner = self._runner or self._open()
        try:
            with self._submit_options(), (_lean_task_context() if self.remote else nullcontext()):
                futures = [runner.submit(shard_task, {"work": ShardWork(fn, job), "name": name,
                                                      "threads": threads})
                           for job, name in zip(jobs, names)]
            # Wait for every shard: completed ones stay on disk for a resume even if one fails.
            for i, fut in enumerate(futures):
                try:
                    results[i] = fut.result()
                except BaseException as err:  # noqa: BLE001 - re-raised below
                    errors.append(err)
                    continue
                if on_done:
                    on_done(results[i])
        finally:
            if not self._session:
                self._close()
        if errors:
            raise errors[0]
        return [r for r in results if r is not None]


@contextmanager
def _lean_task_context():
    """Submit without the calling task's parameters in the context.

    Prefect serialises the current task-run context — parameters included — into every task
    sent to another process. Shards are submitted from inside the rollout/teacher task, whose
    parameters hold the Pipeline and its model pool (every loaded model): each shard would
    carry a pickled copy of all weights. The copy keeps the task run (the shards stay its
    children in the UI) and drops the parameters.
    """
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None:
        yield
        return
    with ctx.model_copy(update={"parameters": {}}):
        yield


@contextmanager
def _api_for_workers():
    """Point worker processes at this flow's Prefect API.

    Without a configured server the flow runs on Prefect's temporary local server; a spawned
    process or Ray worker would start a temporary server of its own (10–20 s each). With
    ``PREFECT_API_URL`` set (a real server, needed for a remote Ray cluster) nothing changes.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.client.orchestration import get_client

    url = str(get_client(sync_client=True).api_url)
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def shard_runner(cfg: RunnerConfig) -> PrefectShards:
    return PrefectShards(cfg)


__all__ = ["PrefectShards", "shard_runner", "shard_task"]
