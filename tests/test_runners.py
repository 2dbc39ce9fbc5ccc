"""Sharded rollout/teacher stages on Prefect task runners (runner.*), and vLLM engine settings.

The determinism test runs the offline flow's own rollout and teacher tasks inside a real
Prefect flow, once per runner — threads with 1 and 2 workers, processes with 2, Ray with 2 —
each into a fresh OPSD home, on a tiny random model, and requires the published Parquet rows
to be identical (bitwise) to a plain in-process run of the stage functions.
"""

from __future__ import annotations

import shutil

import os
import sys
import types

import pytest
from prefect import flow

from opsd.flows import steps
from opsd.config import ConfigError, config_from_dict, load_config
from opsd.flows.runner import Pipeline
from opsd.pool import ModelPool
from opsd.stages import dataset as dataset_stage
from opsd.stages import rollout as rollout_stage
from opsd.stages import teacher as teacher_stage
from opsd.stages.common import Artifact, StageContext
from opsd.storage.parquet import completed_shards, read_table


def _raw(model_dir) -> dict:
    return {
        "name": "runners", "model": {"name": str(model_dir)},
        "data": {"source": "behaviours", "train_limit": 8, "eval_limit": 1},
        # 4 rollout shards of 2 prompts; 16 samples → 6 teacher shards of 3; guidance makes
        # the workers run a second model role in lockstep (the teacher reading its
        # demonstrations; a random model's teacher and student agree too well to intervene)
        "rollout": {"n": 2, "max_new_tokens": 6, "shard_size": 2, "batch_size": 4,
                    "guidance": {"enabled": True, "threshold": 0.5, "min_teacher_prob": 0.0}},
        "teacher": {"topk": 4, "shard_size": 3, "batch_size": 4},
        "tracking": {"log_model": False},
    }


# ----------------------------------------------------------------------------- config


def test_runner_config_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="runner.kind.*'threads', 'processes' or 'ray'"):
        load_config(None, ["runner.kind=dask"])
    with pytest.raises(ConfigError, match="runner.workers"):
        load_config(None, ["runner.workers=0"])
    with pytest.raises(ConfigError, match="runner.ray_address is set but runner.kind is 'threads'"):
        load_config(None, ["runner.ray_address=auto"])
    with pytest.raises(ConfigError, match="offline mode only"):
        load_config(None, ["mode=online", "runner.kind=ray"])
    with pytest.raises(ConfigError, match="unknown key; allowed here: cpus_per_worker, kind"):
        load_config(None, ["runner.nodes=3"])
    cfg = load_config(None, ["runner.kind=ray", "runner.workers=4", "runner.ray_address=auto"])
    assert (cfg.runner.kind, cfg.runner.workers, cfg.runner.ray_address) == ("ray", 4, "auto")
    assert load_config(None).runner.kind == "threads"


def test_missing_prefect_ray_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # import prefect_ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'opsd\[ray\]'"):
        steps.check_runner(load_config(None, ["runner.kind=ray"]))
    steps.check_runner(load_config(None, ["runner.kind=processes"]))


# ----------------------------------------------------------------------------- vLLM settings


def test_vllm_parallel_settings_reach_engine_kwargs(monkeypatch, tiny_model_dir):
    """rollout.vllm / teacher.vllm → the keyword arguments of ``vllm.LLM(...)``.

    vLLM is not installed in the main environment: a stand-in ``vllm`` module records the
    constructor's arguments instead of starting an engine (tests/test_vllm_backend.py starts
    real engines where vLLM is installed)."""
    from opsd.backends import vllm as backend

    built: list[dict] = []

    class LLM:  # records what opsd's _Engine passes to vllm.LLM
        def __init__(self, **kwargs):
            built.append(kwargs)

    platform = types.SimpleNamespace(is_cpu=lambda: False)
    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    fake.platforms = types.ModuleType("vllm.platforms")
    fake.platforms.current_platform = platform
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", fake.platforms)

    cfg = load_config(None, [
        "rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=4",
        "rollout.vllm.pipeline_parallel_size=2", "rollout.vllm.gpu_memory_utilization=0.8",
        "teacher.backend=vllm", "teacher.topk=50", "teacher.vllm.tensor_parallel_size=2",
        "teacher.vllm.data_parallel_size=2",
        "teacher.vllm.distributed_executor_backend=external_launcher",
        "teacher.vllm.max_model_len=1024",
    ])
    policy = steps.base_policy(tiny_model_dir)
    try:
        backend.VLLMGenerator.for_policy(cfg.rollout, policy)
        backend.VLLMScorer.for_policy(cfg.teacher, policy)
    finally:
        backend._LIVE.clear()
    roll, teach = built
    assert roll["tensor_parallel_size"] == 4 and roll["pipeline_parallel_size"] == 2
    assert roll["gpu_memory_utilization"] == 0.8 and "data_parallel_size" not in roll
    assert roll["logprobs_mode"] == "processed_logprobs" and roll["model"] == str(tiny_model_dir)
    assert teach["tensor_parallel_size"] == 2 and teach["data_parallel_size"] == 2
    assert teach["distributed_executor_backend"] == "external_launcher"
    assert teach["max_model_len"] == 1024 and teach["max_logprobs"] == 50
    assert "pipeline_parallel_size" not in teach

    # defaults: exactly vLLM's own for the parallel sizes; refused combinations fail early
    kw = backend.engine_settings(load_config(None).rollout, on_cpu=True)
    assert kw["tensor_parallel_size"] == 1 and kw["kv_cache_memory_bytes"] == 2 * 2**30
    assert not {"data_parallel_size", "pipeline_parallel_size", "distributed_executor_backend"} & set(kw)
    with pytest.raises(ConfigError, match="external_launcher"):
        load_config(None, ["rollout.vllm.data_parallel_size=2"])


# ----------------------------------------------------------------------------- sharded stages


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (RayTaskRunner reuses a running one)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@flow(name="opsd-test-shards", persist_result=False)
def shard_flow(config: dict, root: str) -> dict:
    """The offline flow's rollout and teacher tasks, on the runner the config selects."""
    from opsd.flows.offline import rollout_task, teacher_task
    from opsd.flows.shards import shard_runner

    cfg = config_from_dict(config)
    rows = dataset_stage.load(cfg.data)
    student, teacher = steps.resolve_policies(cfg)
    p = Pipeline(cfg, root, track=False, show_progress=False)
    p.start()
    data = steps.dataset_step(p, rows)
    p.pool.inference(student, cfg.rollout.dtype)  # as after evaluate/before: models in the pool
    with shard_runner(cfg.runner) as shards:  # as flows/offline.py: one runner, both stages
        rollouts = rollout_task(p, rows, data, student, teacher, None, [], shards)
        targets = teacher_task(p, rows, data, rollouts, teacher, None, None, [], shards)
    p.finish("completed")
    return {"rollouts": rollouts, "targets": targets}


@pytest.fixture(scope="module")
def inline_reference(tiny_model_dir, tmp_path_factory):
    """The stage functions called directly, in this process, shard after shard."""
    cfg = config_from_dict(_raw(tiny_model_dir))
    rows = dataset_stage.load(cfg.data)
    train = [r for r in rows if r.split == "train"]
    student, teacher = steps.resolve_policies(cfg)
    base = tmp_path_factory.mktemp("inline")
    pool = ModelPool()
    rctx = StageContext(out_dir=base / "rollout", pool=pool, show_progress=False)
    rman = rollout_stage.run(cfg.rollout, train, student, rctx, teacher=teacher,
                             context=cfg.teacher.context)
    tctx = StageContext(out_dir=base / "teacher", pool=pool, show_progress=False)
    tman = teacher_stage.run(cfg.teacher, rows, Artifact("r", rctx.out_dir), teacher, tctx)
    assert rman["shards"]["total"] == 4 and tman["shards"]["total"] == 6
    yield read_table(rctx.out_dir), read_table(tctx.out_dir)
    shutil.rmtree(base, ignore_errors=True)  # small CI disks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,workers", [("threads", 1), ("threads", 2), ("processes", 2),
                                          ("ray", 2)])
def test_sharded_stages_identical_on_every_runner(kind, workers, tiny_model_dir, tmp_path,
                                                  inline_reference, request):
    if kind == "ray":
        request.getfixturevalue("local_ray")
    raw = _raw(tiny_model_dir)
    raw["runner"] = {"kind": kind, "workers": workers}
    if kind != "threads":
        # Remote workers compute with the reference's thread count: on some CPUs fp32 matmul
        # results depend on it (an AMD Zen 4 VM sampled other tokens with 1 thread than with 2),
        # and what this test checks is the runner, not the thread count.
        import torch

        raw["runner"]["cpus_per_worker"] = torch.get_num_threads()
    out = shard_flow(raw, str(tmp_path / "home"))
    rollouts, targets = out["rollouts"], out["targets"]
    ref_rollouts, ref_targets = inline_reference

    got_r, got_t = read_table(rollouts.path), read_table(targets.path)
    assert got_r.num_rows == 16 and got_t.num_rows == 16
    assert got_r.equals(ref_rollouts), f"{kind}/{workers}: rollouts differ from the in-process run"
    # the reference's rollouts were not a catalogued artifact: its rollout_key is a placeholder
    assert set(got_t.column("rollout_key").to_pylist()) == {rollouts.key}
    assert got_t.drop_columns(["rollout_key"]).equals(ref_targets.drop_columns(["rollout_key"])), \
        f"{kind}/{workers}: teacher targets differ"
    # published whole: every shard in the artifact, none left in staging
    assert sorted(completed_shards(rollouts.path)) == [0, 1, 2, 3]
    assert sorted(completed_shards(targets.path)) == list(range(6))

    for art, n in ((rollouts, 4), (targets, 6)):
        sh = art.manifest["shards"]
        assert (sh["total"], sh["computed"], sh["runner"]) == (n, n, kind)
        if kind == "threads":
            assert sh["workers"] == [f"{os.uname().nodename}:{os.getpid()}"]
        else:  # other processes did the work, and none of them opened the catalog
            assert sh["workers"] and all(not w.endswith(f":{os.getpid()}") for w in sh["workers"])
            assert sh["catalog_open_in_workers"] == []
    print(kind, workers, "workers:", rollouts.manifest["shards"]["workers"],
          targets.manifest["shards"]["workers"])


def test_remote_shards_do_not_carry_the_calling_tasks_parameters():
    """Prefect serialises the calling task's context into every task sent to another process;
    the rollout task's parameters hold the Pipeline and every model it has loaded."""
    from prefect import task
    from prefect.context import serialize_context

    from opsd.flows.shards import _lean_task_context

    @task(persist_result=False)
    def outer(pipeline_with_models):
        full = serialize_context()["task_run_context"]
        with _lean_task_context():
            lean = serialize_context()["task_run_context"]
        return full, lean

    @flow(name="opsd-test-lean-context", persist_result=False)
    def run():
        return outer(object())

    full, lean = run()
    assert "pipeline_with_models" in full["parameters"]
    assert not lean.get("parameters")
    assert lean["task_run"]["id"] == full["task_run"]["id"]  # shards stay children of the stage's task


def test_resume_runs_only_missing_shards(tiny_model_dir, tmp_path, inline_reference):
    """A killed stage leaves whole shards; the next attempt computes only the missing ones
    (here on 2 threads) and the merged rows are still the reference's."""
    cfg = config_from_dict({**_raw(tiny_model_dir), "runner": {"kind": "threads", "workers": 2}})
    rows = [r for r in dataset_stage.load(cfg.data) if r.split == "train"]
    student, teacher = steps.resolve_policies(cfg)
    out = tmp_path / "rollout"
    out.mkdir()
    ref = inline_reference[0]
    # shards 0 and 2 survived a crash (written by an earlier attempt)
    import pyarrow.parquet as pq

    for i in (0, 2):
        pq.write_table(ref.slice(i * 4, 4), out / f"part-{i:05d}.parquet")
    (out / ".part-00001.parquet.tmp-123").write_bytes(b"half a shard")

    @flow(name="opsd-test-resume", persist_result=False)
    def resume() -> dict:
        from opsd.flows.shards import shard_runner

        ctx = StageContext(out_dir=out, pool=ModelPool(), show_progress=False)
        return rollout_stage.run(cfg.rollout, rows, student, ctx, teacher=teacher,
                                 context=cfg.teacher.context,
                                 shards=shard_runner(cfg.runner))

    man = resume()
    assert (man["shards"]["total"], man["shards"]["computed"]) == (4, 2)
    assert read_table(out).equals(ref)
