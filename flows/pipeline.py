"""Deployment entry point: run a recipe file by path (what prefect.yaml schedules)."""

from __future__ import annotations

from prefect import flow

from opsd.config import load_config


@flow(name="opsd-pipeline")
def pipeline_flow(config_path: str = "configs/quickstart.yaml", overrides: list[str] | None = None,
                  data: str | None = None, root: str | None = None) -> dict:
    """Load a recipe (+ overrides) and run it in its mode; completed stages are reused."""
    cfg = load_config(config_path, overrides or [], data)
    kwargs = dict(config=cfg.model_dump(mode="json"), root=root, show_progress=False)
    if cfg.mode == "online":
        from flows.online import online_flow

        return online_flow(**kwargs)
    from flows.offline import offline_flow

    return offline_flow(**kwargs)
