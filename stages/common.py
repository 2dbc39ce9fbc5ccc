"""What every stage receives: its resolved inputs and a context to write into.

Stages are plain functions ``run(config, inputs, ctx) -> manifest``. They do not
know about Prefect, MLflow or the catalog: they read input artifacts, write
files into ``ctx.out_dir`` (a staging directory that becomes the artifact when
the stage returns) and return a JSON-safe manifest of what they produced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from opsd.pool import ModelPool

log = logging.getLogger("opsd")


@dataclass(frozen=True)
class Artifact:
    """A finished stage output: content key, folder, and the manifest its stage returned."""

    key: str
    path: Path
    manifest: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class StageContext:
    out_dir: Path
    pool: ModelPool
    show_progress: bool = True
    # Called with (name → number) while a stage runs, for live metrics (e.g. per train step).
    on_metrics: Callable[[dict[str, float], int], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def progress(self, total: int, desc: str, unit: str = "it"):
        return tqdm(
            total=total, desc=desc, unit=unit, disable=not self.show_progress, file=sys.stderr,
            dynamic_ncols=True, leave=False,
        )


def ids_hash(ids) -> str:
    """Short stable hash of a token id sequence (int32 little-endian bytes)."""
    return hashlib.blake2b(np.asarray(ids, dtype="<i4").tobytes(), digest_size=8).hexdigest()


def shard_seed(seed: int, shard: int, salt: str = "") -> int:
    digest = hashlib.sha256(f"{seed}/{shard}/{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))

