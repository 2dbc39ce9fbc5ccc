"""Shared fixtures: offline environment, the real built-in model, a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub, and embedded services stay quiet and local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


# The test tiers, decided here once. `make test-fast` runs neither marker: tiny random models,
# no real model weights, no servers, no Prefect flow runs, no torchrun — under two minutes.
# `make test` (CI) runs everything.
INTEGRATION_MODULES = {
    "test_bench_gpu", "test_device_pipeline",
    "test_concurrency", "test_deployment", "test_distributed", "test_fault_injection",
    "test_mlflow_ui", "test_pipeline_offline", "test_pipeline_online", "test_retention",
    "test_runners", "test_vllm_backend", "test_bad_inputs", "test_train_recipes",
    "test_online_recipes", "test_facts_recipes", "test_g_opd",
}

# single tests of otherwise fast modules that run a whole `opsd run` in a subprocess (1-2 min)
# or a whole Prefect flow in process
INTEGRATION_TESTS = {
    "test_prefect_server_killed_mid_run_loses_nothing_and_the_run_exits",
    "test_a_full_disk_fails_clearly_publishes_nothing_and_the_rerun_resumes",
    "test_each_row_is_scored_by_the_teacher_it_was_routed_to",  # test_mopd
    "test_the_mopd_recipe_runs_end_to_end",
    "test_the_caopd_recipe_revises_what_teacher_and_student_see",  # test_caopd
    "test_an_extended_run_replays_the_reviser_from_the_stored_revisions",  # test_sd_zero
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in INTEGRATION_MODULES or item.originalname in INTEGRATION_TESTS:
            item.add_marker(pytest.mark.integration)


def pytest_configure(config):
    # One Prefect home per test session: no state leaks from or into ~/.prefect.
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="opsd-prefect-home-"))
    os.environ.setdefault("PREFECT_HOME", str(home))
    config._opsd_prefect_home = home


def pytest_unconfigure(config):
    import shutil

    home = getattr(config, "_opsd_prefect_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


_SERVICE_SETTINGS = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")


@pytest.fixture(autouse=True)
def _services_stay_where_they_were():
    """A test that points MLflow or Prefect somewhere else must not take every later test with
    it: ``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI, which opsd's tracker honours (CI
    once ran 35 tests against one test's store and a server that had stopped)."""
    import sys

    before = {k: os.environ.get(k) for k in _SERVICE_SETTINGS}
    yield
    for key, value in before.items():
        if os.environ.get(key) != value:
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])


@pytest.fixture(autouse=True)
def _prefect_server_outlives_each_test():
    """The in-process flow runs of the session share one temporary Prefect server (Prefect
    starts it on the first flow run). If it dies during a test, that test errors with the
    server's exit code and the next flow run starts a new server — instead of every later
    Prefect test failing with "connection refused", as one CI run did (35 tests)."""
    import sys

    yield
    if "prefect.server.api.server" not in sys.modules:
        return
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        proc = getattr(server, "server_process", None)
        if server.running and proc is not None and proc.poll() is not None:
            server.running = False  # start() launches a new one on the next flow run
            pytest.fail(f"the test session's temporary Prefect server (port {server.port}, pid "
                        f"{proc.pid}) exited with code {proc.returncode} during this test",
                        pytrace=False)


@pytest.fixture(scope="session")
def smol_path() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the model cache."""
    from opsd.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (shapes only)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_path)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    """Rollouts and teacher targets of a tiny random model on a 6-question dataset (plain stage
    functions, no flow): what the objective tests train on."""
    import shutil

    from opsd.config import PipelineConfig
    from opsd.data import load_rows
    from opsd.pool import ModelPool, base_policy
    from opsd.stages import rollout as rollout_stage
    from opsd.stages import teacher as teacher_stage
    from opsd.stages.common import Artifact, StageContext
    from tests.helpers import objectives_dataset

    base = tmp_path_factory.mktemp("objectives")
    rows = load_rows(str(objectives_dataset(base / "data.jsonl")))
    cfg = PipelineConfig.model_validate({
        "model": {"name": str(tiny_model_dir)},
        "rollout": {"n": 4, "max_new_tokens": 8, "batch_size": 8, "dtype": "float32", "seed": 3},
        "teacher": {"topk": 5, "dtype": "float32"},
    })
    pool = ModelPool()
    policy = base_policy(Path(tiny_model_dir))

    def ctx(name):
        (base / name).mkdir()
        return StageContext(out_dir=base / name, pool=pool, show_progress=False)

    rollout_stage.run(cfg.rollout, rows, policy, ctx("rollout"))
    rollouts = Artifact("rk", base / "rollout")
    teacher_stage.run(cfg.teacher, rows, rollouts, policy, ctx("teacher"))
    targets = Artifact("tk", base / "teacher")
    yield {"rows": rows, "rollouts": rollouts, "targets": targets, "policy": policy, "pool": pool,
           "base": base}
    shutil.rmtree(base, ignore_errors=True)  # small CI disks
