"""Data-parallel training under torchrun (2 processes, gloo on CPU) equals one process with the
same global batch: same loss curve, same final weights — with replicas (``sharding: ddp``) and
with FSDP2 shards (``sharding: fsdp``)."""

from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from opsd.config import PipelineConfig, TrainConfig
from opsd.stages import train as train_stage
from opsd.stages.common import StageContext
from opsd.storage.parquet import read_table


TRAIN = {"epochs": 2, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "logit_chunk": 16,
         "autocast": "none", "save_every": 0, "max_grad_norm": 0.5}

_ONE: dict[str, tuple] = {}  # one-process reference runs, shared by the ddp and fsdp tests


def _run(a, name: str, world_size: int, objective: str, **train) -> tuple[dict, dict, list[dict]]:
    cfg = TrainConfig.model_validate({**TRAIN, "objective": objective, "world_size": world_size,
                                      **train})
    out = a["base"] / f"dist-{name}"
    out.mkdir()
    ctx = StageContext(out_dir=out, pool=a["pool"], show_progress=False)
    man = train_stage.run(cfg, a["rollouts"], a["targets"], a["policy"], ctx, rollout_temperature=1.0)
    weights = load_file(str(out / "model" / "model.safetensors"))
    return man, weights, read_table(out / "metrics.parquet").to_pylist()


def _one_process(a, objective: str, **train) -> tuple[dict, dict, list[dict]]:
    key = f"{objective}-{'-'.join(f'{k}{v}' for k, v in sorted(train.items()))}"
    if key not in _ONE:
        _ONE[key] = _run(a, f"1-{key}", 1, objective, **train)
    return _ONE[key]


def _assert_same_training(a, one, two, label: str) -> None:
    (m1, w1, h1), (m2, w2, h2) = one, two
    assert m2["steps"] == m1["steps"] == len(h1) == len(h2)
    assert m2["tokens_trained"] == m1["tokens_trained"]
    loss1 = np.array([h["loss"] for h in h1])
    loss2 = np.array([h["loss"] for h in h2])
    # equal up to float summation order (the ranks reduce in a different order), which
    # lr 1e-3 on a tiny random model amplifies a little over the steps
    np.testing.assert_allclose(loss2, loss1, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose([h["grad_norm"] for h in h2], [h["grad_norm"] for h in h1], rtol=1e-3)
    np.testing.assert_allclose([h["kl"] for h in h2], [h["kl"] for h in h1], rtol=1e-3, atol=1e-4)
    # the weights moved, and moved the same way; same tensors in the checkpoint (tied once)
    assert set(w2) == set(w1)
    base = a["pool"].master(a["policy"]).state_dict()
    moved = max(float((w1[k] - base[k]).abs().max()) for k in w1 if k in base)
    assert moved > 1e-3
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"{label}: max |w| moved {moved:.2e}, max |w1 - w2| {worst:.2e}")
    assert worst < 1e-3 * max(1.0, moved) and worst < moved / 20, (worst, moved)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("objective", ["forward_kl_topk", "reverse_kl_sampled"])
def test_two_gloo_ranks_match_one_process(artifacts, objective):
    one = _one_process(artifacts, objective)
    two = _run(artifacts, f"2-{objective}", 2, objective)
    assert two[0]["world_size"] == 2 and two[0]["sharding"] == "ddp" and one[0]["steps"] == 6
    assert one[0]["sharding"] is None and one[0]["per_rank"] is None
    _assert_same_training(artifacts, one, two, f"ddp {objective}")
    n = sum(p.numel() for p in artifacts["pool"].master(artifacts["policy"]).parameters())
    held = two[0]["per_rank"]
    assert (held["params"], held["adamw_state"]) == ([n, n], [2 * n, 2 * n])
    assert not (artifacts["base"] / f"dist-2-{objective}" / "dist_spec.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("objective", ["forward_kl_topk", "reverse_kl_sampled"])
def test_fsdp_two_gloo_ranks_match_one_process(artifacts, objective):
    one = _one_process(artifacts, objective)
    # save_every: the full weights and AdamW state are gathered for resume points mid-run
    two = _run(artifacts, f"fsdp-{objective}", 2, objective, sharding="fsdp", save_every=2)
    assert two[0]["world_size"] == 2 and two[0]["sharding"] == "fsdp" and one[0]["steps"] == 6
    _assert_same_training(artifacts, one, two, f"fsdp {objective}")
    # each rank held half of the parameters and of the AdamW moments (dim-0 shards)
    n = sum(p.numel() for p in artifacts["pool"].master(artifacts["policy"]).parameters())
    held = two[0]["per_rank"]
    print(f"fsdp per-rank elements: {held} of {n} parameters")
    assert sum(held["params"]) == n and max(held["params"]) < 0.51 * n
    assert held["adamw_state"] == [2 * p for p in held["params"]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_frozen_parameters_train_the_same_on_two_ranks_and_stay_frozen(artifacts, sharding):
    """``train.trainable``: the ranks freeze the same parameters before DDP/FSDP wrap the model,
    so two ranks train exactly what one process does and the frozen ones keep the base weights."""
    one = _one_process(artifacts, "forward_kl_topk", trainable=r"\.mlp\.")
    two = _run(artifacts, f"{sharding}-mlp", 2, "forward_kl_topk", sharding=sharding,
               trainable=r"\.mlp\.")
    _assert_same_training(artifacts, one, two, f"{sharding} mlp only")
    base = artifacts["pool"].master(artifacts["policy"]).state_dict()
    for _, weights, _ in (one, two):
        moved = {k for k in weights if k in base and not torch.equal(weights[k], base[k])}
        assert moved and all(".mlp." in k for k in moved), sorted(moved)[:4]
    assert two[0]["trainable_params"] == one[0]["trainable_params"] < one[0]["params"]


@pytest.mark.timeout(300)
def test_lora_adapters_train_the_same_on_two_ddp_ranks_and_fold_into_the_weights(artifacts):
    """``train.lora``: each rank adds the same seeded adapters before DDP wraps the model, so two
    ranks train what one process does, and rank 0 writes the merged plain checkpoint."""
    lora = {"rank": 4, "alpha": 8}
    one = _one_process(artifacts, "forward_kl_topk", lora=lora)
    two = _run(artifacts, "ddp-lora", 2, "forward_kl_topk", sharding="ddp", lora=lora)
    _assert_same_training(artifacts, one, two, "ddp lora")
    base = artifacts["pool"].master(artifacts["policy"]).state_dict()
    for _, weights, _ in (one, two):
        assert set(weights) <= set(base)  # no adapter names in the checkpoint
        moved = {k for k in weights if not torch.equal(weights[k], base[k])}
        assert moved and all(k.endswith("_proj.weight") for k in moved), sorted(moved)[:4]
    assert two[0]["lora_layers"] == one[0]["lora_layers"] > 0


@pytest.mark.timeout(300)
def test_fsdp_ragged_batches_match_one_process(artifacts):
    """Batches of 5 in micro-batches of 2: one rank gets 3 examples (2 micro-batches), the other
    2 (1) — under FSDP the short rank runs a zero-weight micro-batch so the collectives match."""
    ragged = {"batch_size": 5, "micro_batch_size": 2}
    one = _one_process(artifacts, "forward_kl_topk", **ragged)
    two = _run(artifacts, "fsdp-ragged", 2, "forward_kl_topk", sharding="fsdp", **ragged)
    _assert_same_training(artifacts, one, two, "fsdp ragged")


@pytest.mark.timeout(300)
def test_fsdp_resumes_after_kill(artifacts):
    """SIGKILL a 2-rank FSDP run after its first resume point (gathered full weights + AdamW
    state, written by rank 0), rerun it: it continues from there, every rank loading its shard,
    and ends where one uninterrupted process does."""
    objective = "forward_kl_topk"
    one = _one_process(artifacts, objective)
    cfg = TrainConfig.model_validate({**TRAIN, "objective": objective, "world_size": 2,
                                      "sharding": "fsdp", "save_every": 1})
    out = artifacts["base"] / "dist-fsdp-resume"
    out.mkdir()
    ctx = StageContext(out_dir=out, pool=artifacts["pool"], show_progress=False)

    def train(errors: list) -> None:
        try:
            train_stage.run(cfg, artifacts["rollouts"], artifacts["targets"], artifacts["policy"],
                            ctx, rollout_temperature=1.0)
        except RuntimeError as e:  # the killed torchrun
            errors.append(e)

    errors: list = []
    # the session's Prefect server is a child of this process too: kill only what the run starts
    already = {p.pid for p in psutil.Process().children(recursive=True)}
    first = threading.Thread(target=train, args=(errors,))
    first.start()
    state = out / "resume" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun and its ranks: the children this run started
    for p in psutil.Process().children(recursive=True):
        if p.pid not in already:
            p.send_signal(signal.SIGKILL)
    first.join()
    assert errors and "failed" in str(errors[0]), "the run ended before it could be killed"
    saved = json.loads(state.read_text())["counters"]
    assert 1 <= saved["step"] < 6
    two_man = train_stage.run(cfg, artifacts["rollouts"], artifacts["targets"], artifacts["policy"],
                              ctx, rollout_temperature=1.0)
    h2 = read_table(out / "metrics.parquet").to_pylist()
    # the steps before the kill were not retrained: their records come from the resume point
    np.testing.assert_allclose([h["seconds"] for h in h2[: saved["step"]]],  # float32 in parquet
                               [h["seconds"] for h in saved["history"]], rtol=1e-6)
    two = (two_man, load_file(str(out / "model" / "model.safetensors")), h2)
    _assert_same_training(artifacts, one, two, f"fsdp resumed after step {saved['step']}")


def test_world_size_is_validated():
    with pytest.raises(ValueError, match="world_size"):
        PipelineConfig.model_validate({"train": {"batch_size": 1, "micro_batch_size": 1,
                                                 "world_size": 2}})
    with pytest.raises(ValueError, match="online"):
        PipelineConfig.model_validate({"mode": "online", "train": {"world_size": 2}})
    with pytest.raises(ValueError, match="sharding"):
        TrainConfig.model_validate({"world_size": 2, "sharding": "zero3"})
    assert torch.distributed.is_available()


def test_ddp_and_fsdp_use_pytorchs_own_reducers(artifacts):
    """The one-process runs above recorded no wrapper; the 2-rank ones recorded DDP's reducer
    (overlapping all-reduce) and FSDP2, and FSDP's ranks each read only their shard."""
    ddp = _run(artifacts, "wrappers-ddp", 2, "forward_kl_topk", epochs=1)[0]
    assert ddp["wrapper"] == "DistributedDataParallel"
    assert ddp["init"] == "full checkpoint on every rank"
    fsdp = _run(artifacts, "wrappers-fsdp", 2, "forward_kl_topk", epochs=1, sharding="fsdp")[0]
    assert fsdp["wrapper"].startswith("FSDP") and fsdp["init"].startswith("meta-device init")
    assert _one_process(artifacts, "forward_kl_topk")[0]["wrapper"] is None


@pytest.mark.timeout(420)
def test_two_nodes_on_localhost_match_one_process(artifacts):
    """A 2-"node" launch: this process's train stage starts torchrun with nnodes=2 and a c10d
    rendezvous on 127.0.0.1; a second torchrun joins it from the spec the stage wrote
    (``python -m opsd.stages.train_worker --node SPEC``). 2 ranks in all, one per node: the same
    training as one process."""
    import subprocess
    import sys

    from tests.helpers import free_port

    objective = "forward_kl_topk"
    one = _one_process(artifacts, objective)
    cfg = TrainConfig.model_validate({**TRAIN, "objective": objective, "world_size": 1,
                                      "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"})
    out = artifacts["base"] / "dist-two-nodes"
    out.mkdir()
    ctx = StageContext(out_dir=out, pool=artifacts["pool"], show_progress=False)
    result: dict = {}

    def head() -> None:
        try:
            result["manifest"] = train_stage.run(cfg, artifacts["rollouts"], artifacts["targets"],
                                                 artifacts["policy"], ctx, rollout_temperature=1.0)
        except BaseException as err:  # noqa: BLE001 - reported below
            result["error"] = err

    first = threading.Thread(target=head)
    first.start()
    spec = out / "dist_spec.json"
    deadline = time.monotonic() + 120
    while not spec.exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spec.exists(), result.get("error")
    node = subprocess.run([sys.executable, "-m", "opsd.stages.train_worker", "--node", str(spec)],
                          capture_output=True, text=True, timeout=400)
    first.join()
    assert node.returncode == 0, node.stdout[-2000:] + node.stderr[-2000:]
    assert "error" not in result, result.get("error")
    man = result["manifest"]
    assert man["nnodes"] == 2 and man["world_size"] == 2 and man["wrapper"] == "DistributedDataParallel"
    two = (man, load_file(str(out / "model" / "model.safetensors")),
           read_table(out / "metrics.parquet").to_pylist())
    _assert_same_training(artifacts, one, two, "2 nodes x 1 rank")
    # each node kept its own torchrun log
    assert (out / "dist.log").exists() and list(out.glob("dist-*.log"))


def test_multi_node_needs_a_rendezvous_endpoint():
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        PipelineConfig.model_validate({"train": {"nnodes": 2}})
    from opsd.training.distributed import backend_for, torchrun_command

    assert backend_for("auto", "cpu") == "gloo" and backend_for("auto", "cuda") == "nccl"
    cmd = torchrun_command("spec.json", 4, nnodes=2, rdzv_endpoint="head:29400", rdzv_id="x")
    assert "--rdzv_backend=c10d" in cmd and "--rdzv_endpoint=head:29400" in cmd
    assert "--nproc_per_node=4" in cmd and "--nnodes=2" in cmd
