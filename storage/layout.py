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

import errno
import hashlib
import json
import os
import re
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

    def clear_trash(self) -> list[Path]:
        """Remove what a killed publish left in ``tmp/``: the previous version of a recomputed
        artifact, moved aside (``trash-<stage>-<key>-<pid>``) but not yet deleted."""
        gone = []
        for d in self.tmp.glob("trash-*"):
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d)
        return gone

    def run_dir(self, run_id: str) -> Path:
        return self.runs / check_run_id(run_id)

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


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# opsd's atomic writers name their temporaries "<name>.tmp-<pid or hex>" and a replaced version
# "<name>.old-<pid>" (this module, storage.parquet, training.state, models): a killed write
# leaves one behind in a staging folder, where it must not become part of the artifact.
_PARTIAL = re.compile(r".+\.(tmp|old)-[0-9a-f]+")


def drop_partial_writes(folder: Path) -> list[str]:
    """Delete the leftovers of writes cut short inside ``folder``; returns their paths."""
    found = sorted((p for p in folder.rglob("*") if _PARTIAL.fullmatch(p.name)),
                   key=lambda p: len(p.parts))
    gone = []
    for p in found:
        if not p.exists() and not p.is_symlink():  # inside a folder already removed
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        gone.append(str(p.relative_to(folder)))
    return gone


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that it either exists whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dir_stats(path: Path) -> tuple[int, str]:
    """(total bytes, content hash) of a directory's files, in name order.

    The hash artifacts were catalogued with before per-file hashes existed
    (:func:`artifact_digest`); kept to verify those."""
    total, h = 0, hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        total += f.stat().st_size
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return total, h.hexdigest()[:16]


# ------------------------------------------------------------------ content hashes

_BLOCK = 1 << 20


@dataclass(frozen=True)
class ArtifactDigest:
    """What the catalog stores about an artifact's content at publication.

    ``files`` maps each file's path inside the artifact to ``[bytes, sha256 hex]``: a reader
    names the damaged file, and a missing or truncated file is found with a ``stat`` before
    anything is hashed. ``digest`` (16 hex chars) hashes that listing, so it changes with any
    file's name, size or content."""

    nbytes: int
    digest: str
    files: dict[str, list]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def listing_digest(files: dict[str, list]) -> str:
    """The artifact-level hash of a per-file listing (see :class:`ArtifactDigest`)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        size, sha = files[rel]
        h.update(f"{rel}\0{size}\0{sha}\n".encode())
    return h.hexdigest()[:16]


def artifact_digest(path: Path) -> ArtifactDigest:
    """Sizes and SHA-256 of every file under ``path`` (one read of each file)."""
    files: dict[str, list] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        files[f.relative_to(path).as_posix()] = [f.stat().st_size, file_sha256(f)]
    return ArtifactDigest(sum(size for size, _ in files.values()), listing_digest(files), files)


# ------------------------------------------------------------------ names that become paths

# A run id names a folder (runs/<id>/): it may not climb out of it or hide in it.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InvalidName(ValueError):
    """A user-given name that would become a path but is not a plain file name."""


def check_run_id(run_id: str) -> str:
    """``run_id`` unchanged when it is a plain name (letters, digits, '.', '_', '-'; no '..')."""
    if not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise InvalidName(f"run id {run_id!r} is not allowed: it names a folder under runs/, so "
                          "use only letters, digits, '.', '_' and '-' (at most 128, no '..')")
    return run_id


# ------------------------------------------------------------------ the root itself


class RootError(ValueError):
    """An artifact root that cannot be used (a file, not writable)."""


def check_root(root: str | os.PathLike | None = None) -> Path:
    """Refuse an unusable artifact root before anything runs, writing nothing (not even a
    probe file): the root (or, when it does not exist yet, its nearest existing parent) must be
    a directory this process may write to (``access(2)`` also answers for read-only mounts)."""
    path = resolve_root(root)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise RootError(f"the artifact root {path} {what}, not a folder; give --root "
                        "(or OPSD_HOME) a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_mount(existing) else "no write permission"
        raise RootError(f"cannot write to the artifact root {path} ({why} at {existing}); give "
                        "--root (or OPSD_HOME) a writable folder")
    return path


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ------------------------------------------------------------------ full disks

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# how libraries that do not raise OSError say it (safetensors' Rust writer, DuckDB, a torchrun
# rank's log tail in a RuntimeError)
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large", "storagefull")


def disk_full(err: BaseException | None) -> str | None:
    """Why ``err`` — or an exception it was raised from — is a write that ran out of space
    (a full file system, a quota, the process's file-size limit); None when it is not."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            where = f" writing {err.filename}" if err.filename else ""
            return f"{err.strerror or os.strerror(err.errno)}{where}"
        text = str(err).lower()
        for phrase in _FULL_TEXT:
            if phrase in text:
                return "file too large" if phrase == "file too large" else \
                    ("no space left on device" if phrase == "storagefull" else phrase)
        err = err.__cause__ or err.__context__
    return None
