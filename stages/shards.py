"""Where a sharded stage's shards run: here, or wherever the flow's runner sends them.

The rollout and teacher stages split their work into shards (``shard_size``), each
written atomically as ``part-NNNNN.parquet`` and seeded by its index alone. For every
shard still missing the stage builds a *job* — a small picklable description: the
config, its slice of the inputs, the model paths and the file to write — and a pure
function turns the job into the shard file. A :class:`ShardRunner` decides where
those functions run:

- :class:`InlineShards` (the default; also what tests and scripts get): one after the
  other in this process, with the models this process already holds;
- the Prefect runners of ``flows/shards.py`` (``runner.kind`` threads, processes or
  Ray): one Prefect task per shard. A *remote* runner (processes, Ray) runs the
  module-level ``run_shard`` of the stage in another process, which loads the models
  itself (:func:`worker_pool`), so each worker holds its own copy of the weights.

Shards are named by index and read back sorted, so the merged artifact is the same
whatever ran them and in which order. Jobs never carry the pipeline or the catalog:
only the flow process writes the DuckDB catalog.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence

from opsd.pool import ModelPool


class ShardRunner(Protocol):
    kind: str
    # True when jobs run in other processes: ``fn`` must then be a module-level function and
    # the models are loaded in the worker, not taken from the caller.
    remote: bool

    def map(self, fn: Callable[[Any], dict], jobs: Sequence[Any], names: Sequence[str],
            on_done: Callable[[dict], None] | None = None, label: str = "stage") -> list[dict]:
        """``fn(job)`` for every job; results in job order. Every job runs (or fails) before an
        error is raised, so completed shards are on disk for a resume."""
        ...


class InlineShards:
    """Shards one after the other in the calling process."""

    kind = "inline"
    remote = False

    def map(self, fn, jobs, names, on_done=None, label: str = "stage") -> list[dict]:
        out = []
        for job in jobs:
            res = fn(job)
            if on_done:
                on_done(res)
            out.append(res)
        return out


def dispatch(runner: ShardRunner, jobs: Sequence[Any], names: Sequence[str], *,
             remote_fn: Callable[[Any], dict], local_fn: Callable[[], Callable[[Any], dict]],
             resident: bool, progress: Callable[[int], Any], label: str
             ) -> tuple[ShardRunner, list[dict]]:
    """Run a sharded stage's missing ``jobs``; returns (the runner that ran them, results).

    A remote runner (processes, Ray) gets ``remote_fn`` (module level: each worker loads its
    own models) unless this process already holds the stage's engine (``resident``: online
    mode's resident models, a vLLM engine): then the shards stay here, one after the other.
    Locally ``local_fn()`` builds the function (it loads or takes the engine only now, so a
    stage whose shards are all on disk loads nothing). ``progress(n)`` counts finished samples
    of remote shards; local shards report their own progress."""
    if runner.remote and jobs and not resident:
        return runner, runner.map(remote_fn, jobs, names, label=label,
                                  on_done=lambda r: progress(r["samples"]))
    if runner.remote:
        runner = InlineShards()
    if not jobs:
        return runner, []
    return runner, runner.map(local_fn(), jobs, names, label=label)


_POOL: ModelPool | None = None


def worker_pool(device: str = "cpu") -> ModelPool:
    """This worker process's models on ``device`` (the run's, carried by the job), kept between
    the shards it runs (a process or Ray worker loads each model once, not once per shard)."""
    global _POOL
    if _POOL is None or str(_POOL.device) != str(device):
        _POOL = ModelPool(device=device)
    return _POOL


def free_masters(pool: ModelPool) -> None:
    """A worker only runs inference: once its engines hold their (bf16) inference copies, drop
    the fp32 masters they were cast from (a 7B model's fp32 weights are 28 GB). An fp32
    inference copy *is* the master and stays referenced by the copy."""
    pool.masters.clear()


def worker_id() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def summary(runner: ShardRunner, total: int, results: list[dict]) -> dict:
    """The manifest's ``shards`` entry: how many shards, how many computed now, and where."""
    return {
        "total": total,
        "computed": len(results),
        "runner": runner.kind,
        "workers": sorted({r["worker"] for r in results if r.get("worker")}),
        # set by flows/shards.py: catalog files a worker process still had open after its shard
        # (only the flow process writes the catalog)
        "catalog_open_in_workers": (sorted({f for r in results for f in r.get("catalog_files_open", ())})
                                    if runner.remote else None),
    }
