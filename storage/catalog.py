"""The DuckDB catalog: the source of truth for what exists.

DuckDB admits one writing process per file, and a reader cannot open a file
another process is writing. opsd therefore never holds the live file open for
long: every write opens, writes and closes under an exclusive ``flock``;
every read takes the lock only to copy the (small) database into a private
snapshot and queries that. Two pipeline runs can write the same catalog, and
``opsd query``/``opsd runs`` work while a run writes, without waiting on it.
The bulky data stays in Parquet; the catalog's views read it in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
from filelock import FileLock, Timeout

from opsd.storage.layout import Layout, pid_alive

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs(
        run_id VARCHAR PRIMARY KEY, name VARCHAR, mode VARCHAR, status VARCHAR,
        config_json VARCHAR, config_hash VARCHAR, created_at TIMESTAMP, finished_at TIMESTAMP,
        mlflow_run_id VARCHAR, prefect_flow_run_id VARCHAR, parent_run_id VARCHAR,
        metrics_json VARCHAR, error VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS stages(
        run_id VARCHAR, label VARCHAR, stage VARCHAR, key VARCHAR, status VARCHAR,
        cached BOOLEAN, started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE,
        mlflow_run_id VARCHAR, error VARCHAR, PRIMARY KEY(run_id, label))""",
    # Which process runs a run: a run whose process died (SIGKILL, power loss) is marked
    # 'killed' by the next run instead of staying 'running' forever.
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR",
    """CREATE TABLE IF NOT EXISTS artifacts(
        key VARCHAR PRIMARY KEY, stage VARCHAR, kind VARCHAR, path VARCHAR, rows BIGINT,
        bytes BIGINT, hash VARCHAR, status VARCHAR, created_at TIMESTAMP,
        producer_run_id VARCHAR, manifest_json VARCHAR)""",
    # the SQL each Parquet view was last created with (a view is recreated when it changes)
    "CREATE TABLE IF NOT EXISTS view_defs(view_name VARCHAR PRIMARY KEY, sql_hash VARCHAR)",
    # {file inside the artifact: [bytes, sha256]} at publication: a reader checks the files it
    # reuses and names a damaged one (storage/integrity.py); NULL for older artifacts
    "ALTER TABLE artifacts ADD COLUMN IF NOT EXISTS files_json VARCHAR",
    # NULL/'ok', or why MLflow could not be written during the run ('lost: ...'): such a run's
    # tracking is caught up from the catalog later (`opsd track --run ID`, or the next run)
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS tracking VARCHAR",
]

ARTIFACT_COLUMNS = ("key, stage, kind, path, rows, bytes, hash, status, created_at, producer_run_id, "
                    "manifest_json, files_json")

# view name → (stage folder, file glob inside an artifact)
PARQUET_VIEWS = {
    "rollouts": ("rollout", "part-*.parquet"),
    "teacher_targets": ("teacher", "part-*.parquet"),
    "eval_samples": ("evaluate", "part-*.parquet"),
    "train_metrics": ("train", "metrics.parquet"),
    "skills": ("summarise", "skills.parquet"),
    "revisions": ("revise", "part-*.parquet"),
}

TEACHER_TOKENS_VIEW = """
CREATE OR REPLACE VIEW teacher_tokens AS
SELECT t.artifact_key AS teacher_key, r.artifact_key AS rollout_key, t.sample_id, t.row_id,
       r.task,
       unnest(range(t.n_tokens)) AS pos,
       unnest(r.response_ids) AS token_id,
       unnest(t.sampled_logprobs) AS teacher_logprob,
       unnest(r.behaviour_logprobs) AS student_logprob,
       unnest(t.tail_mass) AS tail_mass
FROM teacher_targets t JOIN rollouts r
  ON r.artifact_key = t.rollout_key AND r.sample_id = t.sample_id
"""


class CatalogBusy(RuntimeError):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Catalog:
    """The catalog of one artifact root (``layout``). ``lock_timeout``: how long a write waits
    for another process's transaction (default ``$OPSD_CATALOG_TIMEOUT`` or 600 s)."""

    def __init__(self, layout: Layout, lock_timeout: float | None = None):
        self.path = layout.catalog
        self.artifacts_root = layout.artifacts
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout = env_catalog_timeout() if lock_timeout is None else lock_timeout
        with self._write() as con:
            for stmt in SCHEMA:
                con.execute(stmt)

    # ------------------------------------------------------------------ locking

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.lock_path, timeout=self.lock_timeout, poll_interval=0.05):
                yield
        except Timeout:
            raise CatalogBusy(f"catalog {self.path} stayed locked for {self.lock_timeout:.0f}s; "
                              "another opsd process holds it (raise OPSD_CATALOG_TIMEOUT to wait "
                              "longer)") from None

    @contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._locked():
            con = self._connect(self.path)
            try:
                con.execute("BEGIN TRANSACTION")
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            finally:
                con.close()

    def _connect(self, path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        # A process outside opsd (a DuckDB shell, a notebook) may hold the file: retry.
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                return duckdb.connect(str(path), read_only=read_only)
            except duckdb.IOException as err:
                if "lock" not in str(err).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @contextmanager
    def snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A private, consistent copy of the catalog for reading (never blocks writers)."""
        tmpdir = Path(tempfile.mkdtemp(prefix="opsd-catalog-"))
        try:
            copy = tmpdir / "catalog.duckdb"
            with self._locked():
                shutil.copy2(self.path, copy)
                wal = self.path.with_name(self.path.name + ".wal")
                if wal.exists():
                    shutil.copy2(wal, copy.with_name(copy.name + ".wal"))
            con = duckdb.connect(str(copy))
            try:
                yield con
            finally:
                con.close()
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    # ------------------------------------------------------------------ runs

    def start_run(self, run_id: str, name: str, mode: str, config: dict, config_hash: str,
                  parent_run_id: str | None = None, prefect_flow_run_id: str | None = None) -> None:
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO runs (run_id, name, mode, status, config_json, config_hash, "
                "created_at, finished_at, mlflow_run_id, prefect_flow_run_id, parent_run_id, "
                "metrics_json, error, pid, host) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [run_id, name, mode, "running", json.dumps(config, sort_keys=True), config_hash,
                 _now(), None, None, prefect_flow_run_id, parent_run_id, "{}", None,
                 os.getpid(), socket.gethostname()],
            )

    def reap_dead_runs(self) -> list[str]:
        """Mark runs (and their stages) whose process on this host is gone as 'killed'."""
        host = socket.gethostname()
        with self._write() as con:
            rows = con.execute(
                "SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?", [host]
            ).fetchall()
            dead = [rid for rid, pid in rows if pid is not None and not pid_alive(pid)]
            for rid in dead:
                con.execute("UPDATE runs SET status='killed', finished_at=? WHERE run_id=?", [_now(), rid])
                con.execute("UPDATE stages SET status='killed', finished_at=? "
                            "WHERE run_id=? AND status='running'", [_now(), rid])
        return dead

    def update_run(self, run_id: str, **fields: Any) -> None:
        allowed = {"status", "mlflow_run_id", "prefect_flow_run_id", "metrics_json", "error",
                   "finished_at", "tracking"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update run fields {sorted(bad)}")
        if "metrics_json" in fields and not isinstance(fields["metrics_json"], str):
            fields["metrics_json"] = json.dumps(fields["metrics_json"], sort_keys=True)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._write() as con:
            con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*fields.values(), run_id])

    def finish_run(self, run_id: str, status: str, metrics: dict | None = None,
                   error: str | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "finished_at": _now(), "error": error}
        if metrics is not None:
            fields["metrics_json"] = metrics
        self.update_run(run_id, **fields)

    def status_of_process(self, pid: int) -> str | None:
        """Status of the latest run that process ``pid`` of this host started (None if none)."""
        _, rows = self.query("SELECT status FROM runs WHERE pid = ? AND host = ? "
                             "ORDER BY created_at DESC LIMIT 1", [pid, socket.gethostname()])
        return rows[0][0] if rows else None

    def runs_with_lost_tracking(self) -> list[str]:
        """Runs whose MLflow tracking was interrupted (``tracking`` starts with 'lost')."""
        _, rows = self.query("SELECT run_id FROM runs WHERE tracking LIKE 'lost%' "
                             "AND status != 'running' ORDER BY created_at")
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ stages

    def set_stage_mlflow_run(self, run_id: str, label: str, mlflow_run_id: str) -> None:
        with self._write() as con:
            con.execute("UPDATE stages SET mlflow_run_id=? WHERE run_id=? AND label=?",
                        [mlflow_run_id, run_id, label])

    def start_stage(self, run_id: str, label: str, stage: str, key: str) -> None:
        with self._write() as con:
            self._insert_stage(con, run_id, label, stage, key)

    @staticmethod
    def _insert_stage(con, run_id: str, label: str, stage: str, key: str) -> None:
        con.execute(
            "INSERT OR REPLACE INTO stages VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [run_id, label, stage, key, "running", False, _now(), None, None, None, None],
        )

    def begin_stage(self, run_id: str, label: str, stage: str, key: str, *, reuse: bool,
                    kind: str, path: Path) -> tuple[dict | None, bool]:
        """One transaction at a stage's start: look the key up (``reuse``), mark the stage
        running and, when the stage will compute, announce its artifact as 'publishing'.

        Returns ``(complete artifact or None, announced)``. Nothing is announced over a complete
        artifact being recomputed (``reuse=False``): it stays usable until the new one is
        published (:meth:`record_artifact` 'publishing' right before the move, then)."""
        with self._write() as con:
            found = self._artifact_in(con, key) if reuse else None
            self._insert_stage(con, run_id, label, stage, key)
            announced = False
            if found is None:
                status = con.execute("SELECT status FROM artifacts WHERE key=?", [key]).fetchone()
                if status is None or status[0] != "complete":
                    con.execute(
                        f"INSERT OR REPLACE INTO artifacts ({ARTIFACT_COLUMNS}) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        [key, stage, kind, str(path), None, None, None, "publishing", _now(),
                         run_id, "{}", None],
                    )
                    announced = True
        return found, announced

    def finish_stage(self, run_id: str, label: str, status: str, *, cached: bool = False,
                     seconds: float | None = None, mlflow_run_id: str | None = None,
                     error: str | None = None, artifact: dict | None = None) -> None:
        """Mark the stage finished; with ``artifact`` (the keyword arguments of
        :meth:`record_artifact`) its published artifact becomes complete in the same
        transaction. A failed stage's announced artifact is marked failed."""
        with self._write() as con:
            if artifact is not None:
                self._record_artifact(con, **artifact, status="complete")
            con.execute(
                "UPDATE stages SET status=?, cached=?, finished_at=?, seconds=?, mlflow_run_id=?, "
                "error=? WHERE run_id=? AND label=?",
                [status, cached, _now(), seconds, mlflow_run_id, error, run_id, label],
            )
            if status == "failed":
                con.execute("UPDATE artifacts SET status='failed' WHERE status='publishing' AND key="
                            "(SELECT key FROM stages WHERE run_id=? AND label=?)", [run_id, label])

    # ------------------------------------------------------------------ artifacts

    def record_artifact(self, key: str, stage: str, kind: str, path: Path, rows: int, nbytes: int,
                        content_hash: str, producer_run_id: str, manifest: dict,
                        status: str = "complete", files: dict | None = None) -> None:
        with self._write() as con:
            self._record_artifact(con, key, stage, kind, path, rows, nbytes, content_hash,
                                  producer_run_id, manifest, status, files)

    def _record_artifact(self, con, key: str, stage: str, kind: str, path: Path, rows: int,
                         nbytes: int, content_hash: str, producer_run_id: str, manifest: dict,
                         status: str = "complete", files: dict | None = None) -> None:
        con.execute(
            f"INSERT OR REPLACE INTO artifacts ({ARTIFACT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [key, stage, kind, str(path), rows, nbytes, content_hash, status, _now(),
             producer_run_id, json.dumps(manifest, sort_keys=True, default=str),
             json.dumps(files, sort_keys=True) if files is not None else None],
        )
        if status == "complete":
            self._refresh_views(con)

    def invalidate_artifact(self, key: str) -> None:
        with self._write() as con:
            con.execute("UPDATE artifacts SET status='invalid' WHERE key=?", [key])

    def mark_damaged(self, key: str) -> None:
        """A complete artifact whose files no longer match their hashes: never reused again; the
        next stage that needs the key recomputes it and replaces the folder."""
        with self._write() as con:
            con.execute("UPDATE artifacts SET status='corrupt' WHERE key=? AND status='complete'",
                        [key])

    def artifact(self, key: str) -> dict | None:
        """The complete artifact with this key, as catalogued (its files are not checked here:
        :func:`opsd.storage.integrity.check_artifact` compares them with ``files``/``hash``)."""
        with self._write() as con:  # tiny read; the lock keeps it consistent with writers
            return self._artifact_in(con, key)

    _RECORD_SQL = ("SELECT key, stage, kind, path, rows, bytes, hash, manifest_json, files_json, "
                   "status, producer_run_id FROM artifacts")

    @staticmethod
    def _record(row) -> dict:
        return {
            "key": row[0], "stage": row[1], "kind": row[2], "path": row[3], "rows": row[4],
            "bytes": row[5], "hash": row[6], "manifest": json.loads(row[7] or "{}"),
            "files": json.loads(row[8]) if row[8] else None, "status": row[9],
            "producer_run_id": row[10],
        }

    @classmethod
    def _artifact_in(cls, con, key: str) -> dict | None:
        row = con.execute(f"{cls._RECORD_SQL} WHERE key=? AND status='complete'", [key]).fetchone()
        return None if row is None else cls._record(row)

    def largest_artifact(self, stage: str) -> int | None:
        """Bytes of the largest complete artifact of ``stage`` (a space estimate), if any."""
        _, rows = self.query("SELECT max(bytes) FROM artifacts WHERE stage=? AND status='complete'",
                             [stage])
        return rows[0][0] if rows and rows[0][0] else None

    def artifact_records(self, run_id: str | None = None) -> list[dict]:
        """Every artifact row (any status), or those of the stages of ``run_id``, oldest first."""
        sql, params = self._RECORD_SQL, []
        if run_id is not None:
            sql += " WHERE key IN (SELECT key FROM stages WHERE run_id = ?)"
            params = [run_id]
        _, rows = self.query(sql + " ORDER BY created_at", params)
        return [self._record(r) for r in rows]

    # ------------------------------------------------------------------ views

    def _view_sql(self) -> dict[str, str]:
        """The views that have files to read, with their SQL."""
        out = {}
        for view, (stage, pattern) in PARQUET_VIEWS.items():
            folder = self.artifacts_root / stage
            if not any(folder.glob(f"*/{pattern}")):
                continue
            glob = str(folder / "*" / pattern).replace("'", "''")
            out[view] = (
                f"CREATE OR REPLACE VIEW {view} AS SELECT * EXCLUDE (filename), "
                f"regexp_extract(filename, '/{stage}/([^/]+)/[^/]+$', 1) AS artifact_key "
                f"FROM read_parquet('{glob}', union_by_name=true, filename=true)"
            )
        if {"rollouts", "teacher_targets"} <= set(out):
            out["teacher_tokens"] = TEACHER_TOKENS_VIEW
        return out

    def _refresh_views(self, con: duckdb.DuckDBPyConnection, force: bool = False) -> None:
        """(Re)create the Parquet views whose SQL changed or that do not exist yet.

        A view re-globs its files (and unions new columns) at every query, so a new artifact
        needs no new view; creating one makes DuckDB read every matching file's footer, a cost
        that grows with the artifacts (it was paid after every stage)."""
        want = self._view_sql()
        have = dict(con.execute("SELECT view_name, sql_hash FROM view_defs").fetchall())
        for view, sql in want.items():  # dicts keep order: teacher_tokens after its inputs
            digest = hashlib.sha256(sql.encode()).hexdigest()[:16]
            if force or have.get(view) != digest:
                con.execute(sql)
                con.execute("INSERT OR REPLACE INTO view_defs VALUES (?, ?)", [view, digest])

    def refresh_views(self) -> None:
        with self._write() as con:
            self._refresh_views(con, force=True)

    # ------------------------------------------------------------------ reading

    def query(self, sql: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        with self.snapshot() as con:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description] if cur.description else []
            return cols, cur.fetchall()

    def runs(self) -> list[dict]:
        cols, rows = self.query("SELECT * FROM runs ORDER BY created_at")
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            d["metrics"] = json.loads(d.pop("metrics_json") or "{}")
            d.pop("pid", None)
            d.pop("host", None)
            d["config"] = json.loads(d.pop("config_json") or "{}")
            out.append(d)
        return out

    def run(self, run_id: str) -> dict | None:
        matches = [r for r in self.runs() if r["run_id"] == run_id or r["run_id"].startswith(run_id)]
        if len(matches) > 1:
            raise ValueError(f"run id prefix {run_id!r} is ambiguous: {[m['run_id'] for m in matches]}")
        return matches[0] if matches else None

    def stages(self, run_id: str) -> list[dict]:
        cols, rows = self.query(
            "SELECT * FROM stages WHERE run_id=? ORDER BY started_at", [run_id]
        )
        return [dict(zip(cols, r)) for r in rows]

    def views(self) -> list[str]:
        _, rows = self.query("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1")
        return [r[0] for r in rows]


def env_catalog_timeout() -> float:
    return float(os.environ.get("OPSD_CATALOG_TIMEOUT", "600"))
