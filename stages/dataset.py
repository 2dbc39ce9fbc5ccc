"""Dataset stage: load, validate and freeze the rows a run uses.

Validation happens here, before any model is loaded, so a malformed file fails
in seconds with every problem listed. The normalised rows are stored as
Parquet; their content hash is the key every later stage builds on, so editing
the source file invalidates exactly what depends on it.
"""

from __future__ import annotations

from opsd.config import DataConfig
from opsd.data import load_rows, rows_to_table
from opsd.data.rows import Row
from opsd.stages.common import StageContext
from opsd.storage.parquet import write_table_atomic


def select(rows: list[Row], cfg: DataConfig) -> list[Row]:
    """Apply ``train_limit``/``eval_limit`` (first rows of each split, stable order)."""
    train = [r for r in rows if r.split == "train"]
    evals = [r for r in rows if r.split == "eval"]
    if cfg.train_limit is not None:
        train = train[: cfg.train_limit]
    if cfg.eval_limit is not None:
        evals = evals[: cfg.eval_limit]
    return train + evals


def load(cfg: DataConfig) -> list[Row]:
    """Validated rows for ``cfg`` (raises DatasetError listing every problem)."""
    return select(load_rows(cfg.source, seed=cfg.seed), cfg)


def run(cfg: DataConfig, rows: list[Row], ctx: StageContext) -> dict:
    table = rows_to_table(rows)
    write_table_atomic(table, ctx.out_dir / "rows.parquet")
    tasks = sorted({r.task or "" for r in rows})
    return {
        "rows": len(rows),
        "train_rows": sum(r.split == "train" for r in rows),
        "eval_rows": sum(r.split == "eval" for r in rows),
        "tasks": tasks,
        "source": cfg.source,
    }

