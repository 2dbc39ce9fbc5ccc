"""vLLM colocated with the trainer (``vllm.colocate``): the sleep / wake-up / in-place update
protocol against a stand-in engine (no vLLM here: CUDA sleep mode cannot run on the CPU build,
and the real engine tests live in tests/test_vllm_backend.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from opsd.backends import vllm as vb
from opsd.config import RolloutConfig, TeacherConfig


class FakeLLM:
    def __init__(self):
        self.calls: list[tuple] = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def collective_rpc(self, name, args=()):
        self.calls.append(("rpc", name))


def fake_engine(sleep_mode: bool) -> vb._Engine:
    eng = vb._Engine.__new__(vb._Engine)  # no vllm.LLM behind it
    eng.path, eng.kwargs, eng.weights_key, eng._tmp = Path("."), {}, None, []
    if sleep_mode:
        eng.kwargs["enable_sleep_mode"] = True
    eng.llm = FakeLLM()
    return eng


def test_engine_settings_turn_sleep_mode_on_for_gpus_only():
    cfg = RolloutConfig(backend="vllm", dtype="bfloat16", vllm={"colocate": True})
    assert vb.engine_settings(cfg, on_cpu=False)["enable_sleep_mode"] is True
    assert "enable_sleep_mode" not in vb.engine_settings(cfg, on_cpu=True)
    plain = RolloutConfig(backend="vllm", dtype="bfloat16")
    assert "enable_sleep_mode" not in vb.engine_settings(plain, on_cpu=False)


def test_opsd_auto_dtype_is_resolved_before_vllm_sees_it():
    kw = vb.engine_settings(TeacherConfig(backend="vllm"), on_cpu=True)
    assert kw["dtype"] in ("float32", "bfloat16")  # never vLLM's own "auto"


def test_colocated_utilization_leaves_the_trainer_its_state():
    gib = 2**30
    # a 1.7B trainer holds 12 B/param = 20.4 GB of 141 GB: each of two engines gets < 0.4
    u = vb.colocated_utilization(0.9, 1_700_000_000, 141 * gib, engines=2)
    assert 0.3 < u < 0.45
    assert vb.colocated_utilization(0.2, 1_700_000_000, 141 * gib, engines=2) == 0.2
    assert vb.colocated_utilization(0.9, 10_000_000_000, 80 * gib) == 0.05  # does not fit: floor


def test_generator_sleeps_drops_weights_and_wakes_with_new_ones(monkeypatch):
    eng = fake_engine(sleep_mode=True)
    gen = vb.VLLMGenerator(eng)
    monkeypatch.setattr(eng, "_snapshot", lambda model: Path("/tmp/snapshot"))
    assert gen.sleep() is True and eng.asleep == 2  # new weights follow: drop, do not offload
    assert gen.sleep() is False  # already asleep
    model = torch.nn.Linear(2, 2)
    assert gen.update_weights(model, weights_key="k1") == "inplace"
    assert eng.llm.calls == [("sleep", 2), ("wake_up", ("weights",)),
                             ("rpc", "opsd_reload_weights"), ("wake_up", None)]
    assert eng.asleep is None and eng.weights_key == "k1"


def test_frozen_teacher_offloads_and_wakes_unchanged():
    eng = fake_engine(sleep_mode=True)
    scorer = vb.VLLMScorer(eng)
    assert scorer.sleep(new_weights_follow=False) and eng.asleep == 1
    scorer.wake_up()
    assert eng.llm.calls == [("sleep", 1), ("wake_up", None)] and eng.asleep is None


def test_without_sleep_mode_nothing_sleeps():
    eng = fake_engine(sleep_mode=False)
    assert vb.VLLMGenerator(eng).sleep() is False and eng.llm.calls == []


def test_checkpoint_params_reads_headers_only(tiny_model_dir):
    from opsd.models import load_model

    model = load_model(Path(tiny_model_dir))
    unique = sum(p.numel() for p in model.parameters())  # a tied head counted once
    assert vb.checkpoint_params(Path(tiny_model_dir)) == unique
