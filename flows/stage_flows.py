"""One Prefect flow per stage, so any stage can be rerun alone (also as a deployment).

Each reruns its stage of an existing run — with that run's config plus
overrides — and the stages that depend on it; upstream artifacts are reused
from the catalog and must exist. The result is a new run whose parent is the
source run.
"""

from __future__ import annotations

from prefect import flow

from opsd.config import apply_overrides, config_from_dict
from opsd.flows.pipeline import run_config
from opsd.flows.steps import STAGE_ORDER, force_labels
from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout


class RunNotFound(ValueError):
    """The run to rerun a stage of is not in the catalog."""


def rerun(stage: str, run_id: str, force: bool = False, overrides: list[str] | None = None,
          root: str | None = None, show_progress: bool = True) -> dict:
    """Rerun ``stage`` of run ``run_id`` (config + ``overrides``) and everything after it."""
    if stage not in STAGE_ORDER:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_ORDER)}")
    layout = Layout.at(root)
    src = Catalog(layout).run(run_id)
    if src is None:
        raise RunNotFound(f"no run {run_id!r} in the catalog at {layout.root}; see `opsd runs`")
    cfg = config_from_dict(apply_overrides(src["config"], overrides or []),
                           f"run {src['run_id']} + --set")
    return run_config(cfg, root=str(layout.root), parent_run_id=src["run_id"],
                      start_at=None if stage == "evaluate" else stage,
                      force=force_labels(stage) if force else [], show_progress=show_progress)


@flow(name="opsd-stage-rollout")
def rollout_flow(run_id: str, force: bool = False, overrides: list[str] | None = None,
                 root: str | None = None) -> dict:
    """Resample the student's rollouts of a run, then teacher, train and evaluate."""
    return rerun("rollout", run_id, force, overrides, root)


@flow(name="opsd-stage-teacher")
def teacher_flow(run_id: str, force: bool = False, overrides: list[str] | None = None,
                 root: str | None = None) -> dict:
    """Recompute teacher targets of a run (e.g. another top-k or context), then train and evaluate."""
    return rerun("teacher", run_id, force, overrides, root)


@flow(name="opsd-stage-train")
def train_flow(run_id: str, force: bool = False, overrides: list[str] | None = None,
               root: str | None = None) -> dict:
    """Retrain on a run's cached targets (e.g. another objective), then evaluate."""
    return rerun("train", run_id, force, overrides, root)


@flow(name="opsd-stage-evaluate")
def evaluate_flow(run_id: str, force: bool = False, overrides: list[str] | None = None,
                  root: str | None = None) -> dict:
    """Re-evaluate a run's policies (e.g. with sampled avg@k)."""
    return rerun("evaluate", run_id, force, overrides, root)
