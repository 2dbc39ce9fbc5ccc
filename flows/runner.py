"""One pipeline run: keys, caching, the catalog and MLflow around pure stages.

Flows (Prefect) decide *which* stages run in what order; this module decides
*whether* a stage needs to run (its content key is already complete in the
catalog → reuse), gives it a staging directory, publishes the result
atomically and records it in DuckDB and MLflow. Every stage execution is
recorded — including reuse — so a run's catalog entry and MLflow parent run
always list all of its stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import yaml
from filelock import FileLock, Timeout

from opsd.config import PipelineConfig
from opsd.device import MemoryWatch, empty_cache, resolve_device
from opsd.memory import release_free_memory
from opsd.pool import ModelPool
from opsd.stages.common import Artifact, StageContext, write_manifest
from opsd.storage.catalog import Catalog
from opsd.flows.track import GuardedTracker, catch_up_lost
from opsd.storage.integrity import check_artifact
from opsd.storage.layout import (Layout, artifact_digest, canonical_json, disk_full,
                                 drop_partial_writes, stage_key)
from opsd.storage.tracking import Tracker, flatten, recipe_tags

log = logging.getLogger("opsd")

StageFn = Callable[[StageContext], dict]


class UpstreamMissing(RuntimeError):
    pass


class ArtifactDamaged(UpstreamMissing):
    """An artifact a stage must reuse no longer matches the hashes recorded at publication."""


class DiskFull(RuntimeError):
    """A stage ran out of space under the artifact root (nothing of it was published)."""


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def config_hash(cfg: PipelineConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in flatten(d).items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and v == v:
            out[f"{prefix}{k}"] = float(v)
    return out


@dataclass
class StageRecord:
    label: str
    stage: str
    key: str
    cached: bool
    seconds: float


class Pipeline:
    def __init__(
        self,
        cfg: PipelineConfig,
        root: str | Path | None = None,
        run_id: str | None = None,
        *,
        parent_run_id: str | None = None,
        show_progress: bool = True,
        track: bool = True,
        logger: Callable[[str], None] | None = None,
    ):
        self._say = logger or (lambda msg: log.info(msg))
        # the device and every `auto` dtype decided once for the run; the resolved values are
        # what the stages run with and what enters their keys (opsd.config.resolve_for_device)
        self.cfg, decisions = cfg.resolved()
        for line in decisions:
            self.say(f"device: {line}")
        self.layout = Layout.at(root)
        self.catalog = Catalog(self.layout)
        self.run_id = run_id or new_run_id()
        self._started = False  # the run has its catalog row
        self._tracking_lost: str | None = None  # why MLflow stopped taking this run's records
        self.tracker = self._open_tracker() if track else None
        self.parent_run_id = parent_run_id
        self.pool = ModelPool(device=resolve_device(self.cfg.device))
        self.show_progress = show_progress
        self.records: list[StageRecord] = []
        self.mlflow_run_id: str | None = None
        self._computed: set[str] = set()  # keys of the artifacts this process computed
        self._extras: dict[str, dict] = {}  # key → in-memory results of that stage (StageContext.extras)
        self._t0 = time.perf_counter()
        self._free_at_start: int | None = None  # bytes free under the root when a stage started

    # ------------------------------------------------------------------ lifecycle

    def say(self, msg: str) -> None:
        self._say(msg)

    def _open_tracker(self) -> GuardedTracker | None:
        """MLflow for this run; a store that fails (now or mid-run) costs the run its MLflow
        records, never its artifacts (see flows/track.py)."""
        try:
            tracker = Tracker(self.layout.mlflow_db, self.layout.mlflow_artifacts)
        except Exception as err:  # noqa: BLE001 - any store failure
            self._lose_tracking(f"{type(err).__name__}: {err}".splitlines()[0][:500])
            return None
        return GuardedTracker(tracker, self._lose_tracking)

    def _lose_tracking(self, reason: str) -> None:
        if self._tracking_lost is None:
            self.say(f"warning: MLflow tracking stopped for run {self.run_id} ({reason}); the run "
                     "goes on and its artifacts are published and catalogued as usual. Once the "
                     f"store works, `opsd track --run {self.run_id}` (or the next run) logs what "
                     "MLflow missed")
        self._tracking_lost = reason
        if self._started:  # else start() records it with the run
            self.catalog.update_run(self.run_id, tracking=f"lost: {reason}")

    def start(self, prefect_flow_run_id: str | None = None, kind: str = "pipeline") -> None:
        cfg_dict = json.loads(self.cfg.model_dump_json())
        run_dir = self.layout.run_dir(self.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        for dead in self.catalog.reap_dead_runs():
            self.say(f"run {dead} had died without finishing (killed); marked as such")
        self.layout.clear_trash()  # replaced artifacts a killed publish had not yet deleted
        existing = self.catalog.run(self.run_id)
        if existing is None:
            self.catalog.start_run(self.run_id, self.cfg.name, self.cfg.mode, cfg_dict,
                                   config_hash(self.cfg), self.parent_run_id, prefect_flow_run_id)
        else:  # resuming a run id: keep its history, mark it running again
            self.catalog.update_run(self.run_id, status="running", error=None)
        self._started = True
        if self._tracking_lost is not None:
            self.catalog.update_run(self.run_id, tracking=f"lost: {self._tracking_lost}")
        if self.tracker:
            tags = {"opsd.run_id": self.run_id, "opsd.mode": self.cfg.mode, "opsd.kind": kind,
                    **recipe_tags(cfg_dict)}
            if self.parent_run_id:
                tags["opsd.parent_run_id"] = self.parent_run_id
            self.mlflow_run_id = self.tracker.start_pipeline(
                f"{self.cfg.name}-{self.run_id}", cfg_dict, tags
            )
            self.tracker.log_artifact(self.mlflow_run_id, run_dir / "config.yaml")
            self.catalog.update_run(self.run_id, mlflow_run_id=self.mlflow_run_id)
            if self._tracking_lost is None:  # the store works: log what earlier runs lost
                catch_up_lost(self.layout, self.say, skip=self.run_id)
        self.say(f"run {self.run_id}: root {self.layout.root}")

    def finish(self, status: str, metrics: dict[str, float] | None = None, error: str | None = None):
        metrics = dict(metrics or {})
        metrics["wall_seconds"] = time.perf_counter() - self._t0
        metrics["stages_cached"] = float(sum(r.cached for r in self.records))
        metrics["stages_run"] = float(sum(not r.cached for r in self.records))
        self.catalog.finish_run(self.run_id, status, metrics, error)
        if self.tracker and self.mlflow_run_id:
            self.tracker.finish_pipeline(metrics, "FINISHED" if status == "completed" else "FAILED")
        return metrics

    @contextmanager
    def failing_on_error(self, cleanup: Callable[[], None] | None = None):
        """Mark the run failed (catalog + MLflow) when the block raises, after ``cleanup``."""
        try:
            yield
        except BaseException as err:
            if cleanup is not None:
                try:
                    cleanup()
                except BaseException:  # noqa: BLE001 - the run's own error is the one to report
                    pass
            try:
                self.finish("failed", error=f"{type(err).__name__}: {err}"[:2000])
            except Exception as also:  # noqa: BLE001 - e.g. a full disk under the catalog too
                log.warning("run %s: could not record the failure (%s); the next run marks it "
                            "killed", self.run_id, also)
            raise

    # ------------------------------------------------------------------ stages

    def key(self, stage: str, config: Any, inputs: dict[str, str]) -> str:
        return stage_key(stage, config, inputs)

    def stage(
        self,
        label: str,
        stage: str,
        config: Any,
        inputs: dict[str, str],
        fn: StageFn,
        *,
        force: bool = False,
        require_cached: bool = False,
        kind: str | None = None,
        after: Callable[[Artifact, str | None], None] | None = None,
    ) -> Artifact:
        """Run ``fn`` unless an artifact with the same key is complete; return the artifact.

        ``after(artifact, mlflow_run_id)`` runs for fresh *and* reused artifacts
        (logging plots/tables to the stage's MLflow run).
        """
        key = self.key(stage, config, inputs)
        # One process computes a key at a time: a concurrent run needing the same artifact
        # waits for it and then reuses it, instead of writing the same staging dir.
        with self._key_lock(stage, key, label):
            return self._stage(label, stage, key, config, inputs, fn, force=force,
                               require_cached=require_cached, kind=kind, after=after)

    @contextmanager
    def _key_lock(self, stage: str, key: str, label: str):
        # Lock files stay (unlinking one another process waits on would split the lock).
        locks = self.layout.tmp / "locks"
        locks.mkdir(exist_ok=True)
        lock = FileLock(locks / f"{stage}-{key}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.say(f"stage {label}: another run is computing key {key}; waiting to reuse it")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _stage(self, label, stage, key, config, inputs, fn, *, force, require_cached, kind, after):
        t0 = time.perf_counter()
        path = self.layout.artifact_dir(stage, key)
        announced = False
        if require_cached:
            found = None if force else self.catalog.artifact(key)
            if found is None:
                raise UpstreamMissing(
                    f"stage {label} (key {key}) is not in the catalog at {self.layout.root}; "
                    "run the whole pipeline first (opsd run CONFIG)"
                )
            self._intact(label, stage, found, refuse=True)
            self.catalog.start_stage(self.run_id, label, stage, key)
        else:
            # one catalog transaction: look up, mark running, announce the artifact
            found, announced = self.catalog.begin_stage(self.run_id, label, stage, key,
                                                        reuse=not force, kind=kind or stage, path=path)
            if found is not None:
                found = self._intact(label, stage, found, refuse=False)
        stage_run = None
        if self.tracker:
            stage_run = self.tracker.start_stage(
                label, {"config": config, "inputs": inputs},
                {"opsd.key": key, "opsd.cached": str(found is not None).lower(),
                 "opsd.run_id": self.run_id},
            )
        if found is not None:
            art = Artifact(key, Path(found["path"]), found["manifest"])
            self._record(label, stage, key, True, time.perf_counter() - t0, stage_run, art)
            self.say(f"stage {label}: reused {key} (cached; {len(found.get('files') or {})} files, "
                     f"{found.get('bytes') or 0} bytes checked against their hashes in "
                     f"{found['check_seconds']:.2f}s)")
            if after:
                after(art, stage_run)
            return art
        self.say(f"stage {label}: running (key {key})")
        staging = self.layout.staging_dir(stage, key)
        if force and staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)  # existing shards of a killed attempt survive
        # a stage that fills the disk needed more than this: its message says so
        self._free_at_start = shutil.disk_usage(staging).free
        ctx = StageContext(out_dir=staging, pool=self.pool, show_progress=self.show_progress)
        if self.tracker and stage_run:
            tracker, rid = self.tracker, stage_run
            ctx.on_metrics = lambda m, step: tracker.log_metrics(rid, m, step)
        try:
            # the device and its peak memory during the stage go into the manifest (and MLflow)
            with MemoryWatch(self.pool.device) as mem:
                manifest = fn(ctx)
            release_free_memory()  # the stage's working buffers, before the next stage's
            empty_cache(self.pool.device)  # and the accelerator's cached blocks
            manifest = {**manifest, **mem.fields()}
        except BaseException as err:
            self._stage_failed(label, stage, staging, t0, stage_run, err)
            raise
        manifest = {**manifest, "stage": stage, "label": label, "key": key,
                    "inputs": inputs, "run_id": self.run_id}
        try:
            # a killed attempt's half-written temporaries (a resume point, a shard) are no part
            # of the artifact
            for leftover in drop_partial_writes(staging):
                self.say(f"stage {label}: dropped {leftover}, left by an interrupted write")
            write_manifest(staging, manifest)
            # Announce, move, confirm: a kill at any point leaves either no folder or a folder
            # the catalog knows as 'publishing' (never reused; the next run recomputes and
            # replaces it). The announcement went with the stage's start (begin_stage) unless a
            # complete artifact is being recomputed; the confirmation goes with the stage's end
            # (_record). The per-file hashes let every later reader check what it reuses.
            content = artifact_digest(staging)
            rows = int(manifest.get("samples", manifest.get("rows", manifest.get("steps", 0))) or 0)
            record = dict(key=key, stage=stage, kind=kind or stage, path=path, rows=rows,
                          nbytes=content.nbytes, content_hash=content.digest,
                          producer_run_id=self.run_id, manifest=manifest, files=content.files)
            if not announced:
                self.catalog.record_artifact(**record, status="publishing")
            path = self.layout.publish(stage, key)
            art = Artifact(key, path, manifest)
            self._computed.add(key)
            self._extras[key] = ctx.extras
            self._record(label, stage, key, False, time.perf_counter() - t0, stage_run, art,
                         publish=record)
        except BaseException as err:
            self._stage_failed(label, stage, staging, t0, stage_run, err)
            raise
        self.say(f"stage {label}: done in {time.perf_counter() - t0:.1f}s → {path}")
        if after:
            after(art, stage_run)
        return art

    def _intact(self, label: str, stage: str, found: dict, *, refuse: bool) -> dict | None:
        """``found`` when its files still match the hashes recorded at publication. Otherwise
        every damaged file is reported, the catalog stops offering the artifact, and the stage
        recomputes it (None) — or, for an upstream this run must reuse (``refuse``), the run
        stops with the command that recomputes it. Never is a damaged artifact used."""
        t0 = time.perf_counter()
        damage = check_artifact(found)
        found["check_seconds"] = time.perf_counter() - t0
        if not damage:
            return found
        for d in damage:
            self.say(f"stage {label}: artifact {found['key']} is damaged: {d}")
        self.catalog.mark_damaged(found["key"])
        if refuse:
            producer = found.get("producer_run_id") or "RUN_ID"
            raise ArtifactDamaged(
                f"stage {label}: the artifact this run must reuse, {found['path']}, changed after "
                f"it was published ({len(damage)} problem(s), first: {damage[0]}); it was not "
                f"used. Recompute it: opsd stage {stage} --run {producer} --root {self.layout.root}")
        self.say(f"stage {label}: not reusing the damaged artifact; recomputing it")
        return None

    def _stage_failed(self, label: str, stage: str, staging: Path, t0: float,
                      stage_run: str | None, err: BaseException) -> None:
        """Record a failed stage (catalog, MLflow); a disk that filled up becomes a
        :class:`DiskFull` naming the root and the space needed (raised from ``err``)."""
        msg = f"{type(err).__name__}: {err}"
        try:
            self.catalog.finish_stage(self.run_id, label, "failed", seconds=time.perf_counter() - t0,
                                      mlflow_run_id=stage_run, error=msg[:2000])
        except Exception as also:  # noqa: BLE001 - a full disk may refuse the catalog write too
            log.warning("stage %s: could not record its failure in the catalog (%s); the next "
                        "run marks it killed", label, also)
        if self.tracker and stage_run:
            self.tracker.log_text(stage_run, traceback.format_exc(), "error.txt")
            self.tracker.end(stage_run, "FAILED")
        reason = disk_full(err)
        if reason is not None:
            raise DiskFull(self._disk_full_message(label, stage, staging, reason)) from err

    def _disk_full_message(self, label: str, stage: str, staging: Path, reason: str) -> str:
        root = self.layout.root
        written = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) \
            if staging.exists() else 0
        free = shutil.disk_usage(root).free
        try:
            earlier = self.catalog.largest_artifact(stage)
        except Exception:  # noqa: BLE001 - the catalog's snapshot may need space too
            earlier = None
        at_start = self._free_at_start
        if earlier and earlier > written:
            need = (f"It needs about {_size(earlier - written)} more ({_size(earlier)} in all, the "
                    f"largest earlier '{stage}' artifact here)")
        elif at_start is not None and at_start > free:
            need = (f"It needs more than the {_size(at_start)} that were free when it started: it "
                    "filled them")
        else:
            need = (f"It needs more than the {_size(written)} it had written (no earlier "
                    f"'{stage}' artifact here as large to estimate from)")
        if "file too large" in reason.lower():
            where = ("a file reached this process's file-size limit (`ulimit -f`); raise the "
                     "limit")
        else:
            where = f"{_size(free)} are free there now; free space"
        return (f"stage {label} ran out of space under the artifact root {root} ({reason}). It had "
                f"written {_size(written)} to {staging}. {need}. Nothing of this stage was "
                f"published: {where} (or point --root / OPSD_HOME at a larger disk) and run the "
                "same command again; published stages are reused and the shards and resume "
                f"points in {staging} are kept.")

    def computed(self, art: Artifact) -> bool:
        """True when this process computed ``art`` (False: reused from the catalog)."""
        return art.key in self._computed

    def take_extras(self, art: Artifact) -> dict:
        """The in-memory results a stage left beside ``art`` (a trained model, …), handed over
        once (the pipeline keeps no reference); empty for a reused artifact."""
        return self._extras.pop(art.key, {})

    def _record(self, label, stage, key, cached, seconds, stage_run, art: Artifact,
                publish: dict | None = None) -> None:
        """The stage's end in the catalog (``publish``: its new artifact becomes complete in the
        same transaction) and in MLflow."""
        self.records.append(StageRecord(label, stage, key, cached, seconds))
        self.catalog.finish_stage(self.run_id, label, "cached" if cached else "completed",
                                  cached=cached, seconds=seconds, mlflow_run_id=stage_run,
                                  artifact=publish)
        if self.tracker and stage_run:
            self.tracker.log_metrics(stage_run, _numbers(art.manifest))
            self.tracker.set_tags(stage_run, {"opsd.artifact_path": str(art.path)})
            self.tracker.log_dict(stage_run, art.manifest, "manifest.json")
            self.tracker.end(stage_run)

    def log_parent(self, fn: Callable[[Tracker, str], None]) -> None:
        if self.tracker and self.mlflow_run_id:
            fn(self.tracker, self.mlflow_run_id)


def _size(nbytes: int) -> str:
    """Bytes for a message: exact, and in MiB/GiB when large."""
    if nbytes >= 1 << 30:
        return f"{nbytes} bytes ({nbytes / (1 << 30):.1f} GiB)"
    if nbytes >= 1 << 20:
        return f"{nbytes} bytes ({nbytes / (1 << 20):.1f} MiB)"
    return f"{nbytes} bytes"


def config_for_key(section: Any) -> dict:
    """A config section as hashed into a stage's key: each field declares whether it enters
    (``opsd.config.RunOnly`` fields and the settings of features that are off do not)."""
    return json.loads(canonical_json(section.key_dict()))
