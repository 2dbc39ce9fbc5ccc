"""Where everything lives under one artifact root, and how artifacts are named.

::

    <root>/
      catalog.duckdb            runs, stages, artifacts + SQL views over the Parquet
      mlflow.db, mlartifacts/   MLflow tracking store (SQLite) and artifact store
      artifacts/<stage>/<key>/  finished, immutable, content-addressed stage outputs
      tmp/<stage>-<key>/        an unfinished stage: completed shards survive a crash
      runs/<run_id>/            the resolved config of each pipeline run

An artifact's key hashes (stage name, the stage's config, the keys of its
inputs, the code version). A stage writes into ``tmp/`` and the directory is
renamed into ``artifacts/`` only when every file is written, so a killed stage
never leaves something under ``artifacts/`` that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

ENV_ROOT = "OPSD_HOME"
DEFAULT_ROOT = "opsd-home"

# Directories whose source defines what a stage computes. Editing any file in them
# changes every key: stale artifacts are never silently reused for new code.
_CODE_DIRS = ("opsd", "stages", "storage")


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$OPSD_HOME``, else ``./opsd-home``."""
    chosen = root if root is not None else os.environ.get(ENV_ROOT, DEFAULT_ROOT)
    return Path(chosen).expanduser().resolve()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package sources (override with ``OPSD_CODE_VERSION``)."""
    override = os.environ.get("OPSD_CODE_VERSION")
    if override:
        return override
    base = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        for f in sorted((base / d).rglob("*.py")):
            h.update(str(f.relative_to(base)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, config: Any, inputs: dict[str, str], version: str | None = None) -> str:
    """Content address of a stage output: 20 hex chars of a SHA-256."""
    payload = canonical_json(
        {"stage": stage, "config": config, "inputs": inputs, "code": version or code_version()}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> "Layout":
        layout = cls(resolve_root(root))
        for d in (layout.root, layout.artifacts, layout.tmp, layout.runs):
            d.mkdir(parents=True, exist_ok=True)
        return layout

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.artifacts / stage / key

    def staging_dir(self, stage: str, key: str) -> Path:
        return self.tmp / f"{stage}-{key}"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def publish(self, stage: str, key: str) -> Path:
        """Atomically move a finished staging dir into ``artifacts/``.

        A forced recompute replaces the old directory: the old one is first moved
        aside (rename, atomic), then removed, so readers see either whole version.
        """
        src, dst = self.staging_dir(stage, key), self.artifact_dir(stage, key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            trash = self.tmp / f"trash-{stage}-{key}-{os.getpid()}"
            os.replace(dst, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(src, dst)
        _fsync_dir(dst.parent)
        return dst


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that it either exists whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dir_stats(path: Path) -> tuple[int, str]:
    """(total bytes, content hash) of a directory's files, in name order."""
    total, h = 0, hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        total += f.stat().st_size
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return total, h.hexdigest()[:16]
