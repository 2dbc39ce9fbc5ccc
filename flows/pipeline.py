"""Running a recipe in its mode: the one place where ``mode`` picks a flow.

``pipeline_flow`` is the deployment entry point (what prefect.yaml schedules: a recipe by path);
``run_config`` is what the CLI and the per-stage flows call with a validated config.
"""

from __future__ import annotations

from prefect import flow

from opsd.config import PipelineConfig, load_config
from opsd.flows.offline import offline_flow
from opsd.flows.online import online_flow

FLOWS = {"offline": offline_flow, "online": online_flow}


def run_config(cfg: PipelineConfig, **flow_kwargs) -> dict:
    """Run ``cfg`` with the flow of its mode; ``flow_kwargs``: root, run_id, parent_run_id,
    start_at, force, show_progress (see ``offline_flow``)."""
    return FLOWS[cfg.mode](config=cfg.model_dump(mode="json"), **flow_kwargs)


@flow(name="opsd-pipeline")
def pipeline_flow(config_path: str = "configs/quickstart.yaml", overrides: list[str] | None = None,
                  data: str | None = None, root: str | None = None) -> dict:
    """Load a recipe (+ overrides) and run it in its mode; completed stages are reused."""
    cfg = load_config(config_path, overrides or [], data)
    return run_config(cfg, root=root, show_progress=False)
