"""One device decision (``device``), the fast dtype chosen from what the device is, and models
that stay where the run put them (CPU here; the CUDA variants are marked ``gpu`` and skipped
without a CUDA device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opsd import device as devmod
from opsd.config import PipelineConfig
from opsd.device import DeviceError, MemoryWatch, auto_dtype, resolve_device
from opsd.pool import ModelPool, base_policy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has (or lacks) AMX."""

    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(devmod, "cpu_flags", lambda: frozenset(flags))

    return set_flags


def test_device_key_is_validated_and_resolved():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        PipelineConfig.model_validate({"device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda:0")
    assert PipelineConfig.model_validate({"device": "cuda:1"}).device == "cuda:1"  # checked at run


def test_auto_dtype_follows_the_cpu(cpu_with):
    cpu_with("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    assert auto_dtype(torch.device("cpu")).dtype == "bfloat16"
    cpu_with("avx512f", "avx512_bf16")  # the CI kind: bf16 matmul at half fp32's speed
    choice = auto_dtype(torch.device("cpu"))
    assert choice.dtype == "float32" and "AMX" in choice.reason


def test_resolved_config_amx_equals_todays_bf16_defaults(cpu_with):
    """On an AMX CPU the defaults resolve to what they were before `auto` existed (bf16
    rollout/teacher/eval, bf16 autocast): the same settings, the same content keys."""
    from opsd.flows.runner import config_for_key

    cpu_with("amx_bf16")
    auto, notes = PipelineConfig.model_validate({"device": "cpu"}).resolved()
    explicit = PipelineConfig.model_validate({
        "device": "cpu", "rollout": {"dtype": "bfloat16"}, "teacher": {"dtype": "bfloat16"},
        "eval": {"dtype": "bfloat16"}, "train": {"autocast": "bfloat16"}})
    for section in ("rollout", "teacher", "eval", "train", "retention"):
        assert config_for_key(getattr(auto, section)) == config_for_key(getattr(explicit, section))
    assert auto.device == "cpu" and any("amx_bf16" in n for n in notes)
    assert auto.retention.dtype == "float32"  # an explicit default is left alone


def test_resolved_config_without_amx_is_fp32_and_keys_differ(cpu_with):
    from opsd.flows.runner import config_for_key

    cpu_with("avx512_bf16")
    fp32, notes = PipelineConfig.model_validate({"device": "cpu"}).resolved()
    assert (fp32.rollout.dtype, fp32.teacher.dtype, fp32.eval.dtype) == ("float32",) * 3
    assert fp32.train.autocast == "none"
    cpu_with("amx_bf16")
    bf16, _ = PipelineConfig.model_validate({"device": "cpu"}).resolved()
    # outputs of different dtypes never share a key; the device itself is not in any key
    assert config_for_key(fp32.rollout) != config_for_key(bf16.rollout)
    assert "device" not in config_for_key(fp32.rollout)
    assert any("no AMX" in n for n in notes)


def test_explicit_dtypes_are_kept(cpu_with):
    cpu_with()  # no AMX
    cfg, _ = PipelineConfig.model_validate({"rollout": {"dtype": "bfloat16"},
                                            "train": {"autocast": "bfloat16"}}).resolved()
    assert cfg.rollout.dtype == "bfloat16" and cfg.train.autocast == "bfloat16"


def test_memory_watch_reports_the_stage_peak():
    with MemoryWatch(torch.device("cpu")) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        del block
    f = mem.fields()
    assert f["device"] == "cpu"
    if f["peak_memory_gib"] is not None:  # Linux: VmHWM, reset for the block
        assert f["peak_memory_gib"] > 0.06 and "VmHWM" in f["peak_memory_source"]


def test_pool_models_live_on_the_pools_device(tiny_model_dir):
    pool = ModelPool(device="cpu")
    policy = base_policy(Path(tiny_model_dir))
    for dtype in ("auto", "float32", "bfloat16"):
        m = pool.inference(policy, dtype)
        assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert pool.inference(policy, "auto") is pool.inference(policy, pool.dtype("auto"))
    moved = pool.master(policy)
    other = ModelPool(device="meta")
    with pytest.raises(ValueError, match="move it explicitly"):
        other.adopt(policy, moved)


@needs_cuda
@pytest.mark.gpu
def test_cuda_pool_generates_and_scores_on_the_gpu(tiny_model_dir):
    """CUDA: inference copies load straight onto the GPU in their dtype (no fp32 master there),
    sampling and scoring run on it and agree with the CPU within bf16 rounding."""
    from opsd.backends.hf import HFGenerator, HFScorer, SamplingParams

    policy = base_policy(Path(tiny_model_dir))
    gpu, cpu = ModelPool(device="cuda"), ModelPool(device="cpu")
    mg = gpu.inference(policy, "float32")
    assert next(mg.parameters()).is_cuda and policy.key not in gpu.masters
    tok = gpu.tokenizer(policy)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    a = HFGenerator(mg, tok).generate(prompts, params)
    b = HFGenerator(cpu.inference(policy, "float32"), tok).generate(prompts, params)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    ta = HFScorer(mg).score(prompts, [g.response_ids for g in a[::2]], topk=4)
    tb = HFScorer(cpu.inference(policy, "float32")).score(prompts, [g.response_ids for g in b[::2]],
                                                         topk=4)
    for x, y in zip(ta, tb):
        assert x.sampled_logprob_R.device.type == "cpu"
        torch.testing.assert_close(x.sampled_logprob_R, y.sampled_logprob_R, atol=1e-3, rtol=1e-3)


@needs_cuda
@pytest.mark.gpu
def test_cuda_trainer_step_uses_fused_adamw_and_autocast(tiny_model_dir):
    from opsd.config import TrainConfig
    from opsd.training.trainer import Trainer
    from tests.helpers import synthetic_examples

    pool = ModelPool(device="cuda")
    model = pool.take_master(base_policy(Path(tiny_model_dir)))
    tr = Trainer(model, TrainConfig(batch_size=4, micro_batch_size=2), pad_id=0, total_steps=2)
    assert tr.opt.defaults.get("fused") and tr.checkpointing.summary()["setting"] == "auto"
    st = tr.step(synthetic_examples(4, 8, 8, model.config.vocab_size, 4))
    assert st.loss == st.loss and next(model.parameters()).is_cuda


def test_compiled_layers_train_like_eager_ones(tiny_model_dir, monkeypatch):
    """train.compile wires torch.compile into every decoder layer (here with the tracing-only
    'eager' backend: the wiring, not inductor's speed) and the step is the eager step's."""
    from opsd.config import TrainConfig
    from opsd.models import load_model
    from opsd.training.trainer import Trainer
    from tests.helpers import synthetic_examples

    monkeypatch.setenv("OPSD_COMPILE_BACKEND", "eager")
    examples = synthetic_examples(4, 6, 6, 512, 4)
    stats = []
    for compiled in (False, True):
        model = load_model(Path(tiny_model_dir))
        cfg = TrainConfig(batch_size=4, micro_batch_size=2, autocast="none", compile=compiled,
                          lr=1e-3)
        tr = Trainer(model, cfg, pad_id=0, total_steps=1)
        stats.append(tr.step(examples))
        layers = model.get_decoder().layers
        assert all(getattr(l, "_compiled_call_impl", None) is not None for l in layers) == compiled
    assert abs(stats[0].loss - stats[1].loss) < 1e-5
    assert abs(stats[0].grad_norm - stats[1].grad_norm) < 1e-4 * max(1.0, stats[0].grad_norm)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_missing_device_is_refused_before_anything_runs(tiny_model_dir, tmp_path):
    from opsd.config import ConfigError
    from opsd.flows.steps import check_inputs
    from tests.helpers import tiny_config, write_dataset

    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "data.jsonl"))
    with pytest.raises(ConfigError, match="no CUDA device"):
        check_inputs(PipelineConfig.model_validate({**cfg, "device": "cuda"}))
