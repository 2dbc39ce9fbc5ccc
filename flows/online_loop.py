"""Online mode: every iteration samples from the *current* student.

    for it in iterations:  rollout(student_it) → teacher → train (k steps) → [evaluate]

The stages are the offline ones; what differs is residency and resumption:

* the fp32 student, its optimizer and a bf16 inference copy stay in memory for
  the whole run; after each iteration the copy's weights are refreshed in place
  (no reload), and the teacher (frozen / live / EMA / external) likewise;
* every iteration's rollouts, targets and train metrics are content-addressed
  artifacts like offline ones. Iteration ``i``'s keys chain on iteration
  ``i-1``'s train key, so rerunning the same config finds iterations
  ``0..k`` complete and only needs the student's state after ``k``: it comes
  from a rolling resume point (weights, AdamW moments, scheduler, RNG, EMA
  teacher) saved atomically after each iteration, or is replayed
  deterministically from the cached rollouts and targets.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from opsd.backends.hf import HFGenerator, HFScorer
from opsd.backends.prepack import refresh_from, release_packed
from opsd.config import PipelineConfig
from opsd.context.exposure import exposure_ratio
from opsd.data.rows import Row
from opsd.flows.runner import Pipeline, config_for_key
from opsd.pool import Policy
from opsd.training.trainer import Trainer
from opsd import teachers
from opsd.training.state import has_resume_point, load_resume_point, save_resume_point
from opsd.stages.common import Artifact, StageContext
from opsd.stages import train as train_stage
from opsd.storage.layout import canonical_json


def iteration_prompts(train_rows: list[Row], cfg: PipelineConfig, iteration: int) -> list[str]:
    """Row ids for one iteration: consecutive slices of seeded permutations (epochs)."""
    n, k = len(train_rows), cfg.online.prompts_per_iteration
    start = iteration * k
    ids = []
    for pos in range(start, start + min(k, n)):
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([cfg.online.seed, epoch]).permutation(n)
        ids.append(train_rows[perm[offset]].id)
    return ids


@torch.no_grad()
def ema_update(ema: torch.nn.Module, src: torch.nn.Module, rate: float) -> None:
    for e, s in zip(ema.state_dict().values(), src.state_dict().values()):
        if e.is_floating_point():
            e.mul_(1.0 - rate).add_(s.to(e.dtype), alpha=rate)


@dataclass
class Resident:
    """Everything an online run keeps loaded between iterations."""

    master: torch.nn.Module  # fp32 student being trained
    infer: torch.nn.Module  # low-precision copy used for sampling (and as a live teacher)
    trainer: Trainer
    generator: HFGenerator  # or a VLLMGenerator (same interface) with rollout.backend=vllm
    teacher_model: torch.nn.Module
    scorer: HFScorer  # or a VLLMScorer with teacher.backend=vllm
    ema: torch.nn.Module | None = None  # fp32 EMA weights (teacher.kind == "ema")
    state_key: str = ""  # key of the iteration whose end state the student holds
    history: list[dict] = field(default_factory=list)
    # how vLLM engines took new weights: "rollout.inplace" → count, "teacher.rebuild" → count, …
    engine_loads: dict[str, int] = field(default_factory=dict)


class OnlineLoop:
    """The resident student of an online run and the chain of its completed iterations.

    Public API (what the online flow and ``flows.steps`` call):

    * :meth:`current` — the resident models, holding the student after the last iteration of
      :attr:`chain` (loaded on first use, caught up from a resume point or by replay);
    * :meth:`teacher_policy`, :meth:`exposure`, :meth:`observe` — per-iteration teacher inputs;
    * :meth:`train_iteration` — the train stage's body for one iteration;
    * :meth:`record` — append a finished iteration to the chain (and, when it was trained in this
      process, refresh the copies and write a resume point);
    * :meth:`wait_saved` — block until the resume point being written is on disk.
    """

    def __init__(self, p: Pipeline, rows: list[Row], data: Artifact, student: Policy, teacher: Policy):
        self.p, self.cfg = p, p.cfg
        self.rows = rows
        self.train_rows = [r for r in rows if r.split == "train"]
        self.data = data
        self.base = student
        self.kind = teachers.get(self.cfg.teacher.kind)
        self.external_teacher = teacher if self.kind.needs_model else None
        self.res: Resident | None = None
        # (train key, rollouts, targets) of every iteration so far, in order
        self.chain: list[tuple[str, Artifact, Artifact]] = []
        # SD-Zero (train.reviser): iteration → its revise artifact, which its training also reads
        self.revisions: dict[int, Artifact] = {}
        self.pass_rates: dict[int, float | None] = {}
        chain = {
            "online": config_for_key(self.cfg.online),
            "rollout": config_for_key(self.cfg.rollout),
            "teacher": config_for_key(self.cfg.teacher),
            # who the teacher is (left out of the teacher stage's key, whose teacher policy key
            # carries it) decides what every iteration's student becomes
            "teacher_kind": {"kind": self.kind.name, "ema_rate": self.cfg.teacher.ema_rate},
            "train": config_for_key(self.cfg.train),
            "data": data.key,
            "base": student.key,
        }
        self.chain_id = hashlib.sha256(canonical_json(chain).encode()).hexdigest()[:16]
        self.resume_dir = p.layout.tmp / f"online-{self.chain_id}" / "resume"
        self.plan_steps = self.cfg.online.iterations * self.cfg.online.steps_per_iteration
        # the interval runs from the loop's start: a short run writes no resume point at all
        self._last_resume_save: float = time.monotonic()
        self._saver: threading.Thread | None = None  # a resume point being written
        self._save_error: BaseException | None = None

    # ------------------------------------------------------------------ residency

    def current(self) -> Resident:
        """The resident models, holding the student after the chain's last iteration."""
        res = self._prepare()
        if self.chain:
            self._bring_to(self.chain[-1][0])
        return res

    def _prepare(self) -> Resident:
        if self.res is not None:
            return self.res
        pool, cfg = self.p.pool, self.cfg
        infer = copy.deepcopy(pool.inference(self.base, cfg.rollout.dtype))
        # Teacher copies are made before the trainer takes the fp32 master over from the pool
        # (no second fp32 copy is held; the pool reloads the base from disk if asked again).
        built = self.kind.build(pool, self.base, self.external_teacher, infer, cfg.teacher.dtype)
        teacher_model, ema = built.model, built.ema
        master = pool.take_master(self.base)
        if teacher_model is master:  # an fp32 frozen teacher: the pool now holds a private copy
            teacher_model = pool.inference(self.base, cfg.teacher.dtype)
        # live-teacher objectives (jsd, student-support top-k) score with the teacher model in
        # the train step itself, against the context ids the iteration's teacher stage stored
        trainer = Trainer(master, cfg.train, pool.tokenizer(self.base).pad_token_id,
                          total_steps=self.plan_steps,
                          teacher_model=teacher_model if cfg.train.live_teacher else None,
                          teacher_batch_size=cfg.teacher.batch_size,
                          share_prefix=cfg.teacher.share_prefix)
        if cfg.rollout.backend == "vllm":
            from opsd.backends import make_generator

            generator = make_generator(cfg.rollout, pool, self.base)  # engine stays up across iterations
        else:
            generator = HFGenerator(infer, pool.tokenizer(self.base), batch_size=cfg.rollout.batch_size)
        if cfg.teacher.backend == "vllm":
            from opsd.backends import make_scorer

            start = self.external_teacher or self.base
            scorer = make_scorer(cfg.teacher, pool, Policy(start.key, start.path, "teacher"))
        else:
            scorer = HFScorer(teacher_model, batch_size=cfg.teacher.batch_size,
                              share_prefix=cfg.teacher.share_prefix)
        self.res = Resident(master, infer, trainer, generator, teacher_model, scorer, ema,
                            state_key=self.base.key)
        return self.res

    def _sync_copies(self) -> None:
        """After training: push new weights to the sampling copy and the teacher."""
        self.wait_saved()  # the EMA update changes a tensor being written
        res = self.res
        refresh_from(res.infer, res.master)
        if res.ema is not None:
            ema_update(res.ema, res.master, self.cfg.teacher.ema_rate)
            refresh_from(res.teacher_model, res.ema)
        self._sync_engines()

    def _sync_engines(self) -> None:
        """vLLM engines hold their own weights: load the new student (and a live/EMA teacher)
        into the running engines; which path ran (in place or engine rebuild) is logged."""
        res = self.res
        if self.cfg.rollout.backend == "vllm":
            how = res.generator.update_weights(res.master, weights_key=res.state_key)
            res.engine_loads[f"rollout.{how}"] = res.engine_loads.get(f"rollout.{how}", 0) + 1
            self.p.say(f"online: vLLM rollout engine took the new student weights ({how})")
        src = self.kind.new_weights(res.master, res.ema)
        if self.cfg.teacher.backend == "vllm" and src is not None:
            how = res.scorer.update_weights(src, weights_key=f"{self.kind.name}-{res.state_key}")
            res.engine_loads[f"teacher.{how}"] = res.engine_loads.get(f"teacher.{how}", 0) + 1
            self.p.say(f"online: vLLM teacher engine took the new {self.kind.name} weights ({how})")
        for engine in (res.generator, res.scorer):  # colocated engines that took no new weights
            getattr(engine, "wake_up", lambda: None)()

    def _sleep_engines(self) -> None:
        """Colocated vLLM engines (``vllm.colocate``) give the GPU to the trainer's step; an
        engine whose weights the step replaces drops them instead of offloading them."""
        res = self.res
        follows = self.kind.new_weights(res.master, res.ema) is not None
        for engine, new_weights in ((res.generator, True), (res.scorer, follows)):
            if getattr(engine, "sleep", None) and engine.sleep(new_weights):
                res.engine_loads["slept"] = res.engine_loads.get("slept", 0) + 1

    # ------------------------------------------------------------------ exposure

    def exposure(self, iteration: int) -> float | None:
        """Solution reveal ratio for this iteration's teacher pass (None: the fixed config value)."""
        # Replayed from the cached rollouts' pass rates, so a resumed run computes the same
        # ratios without extra state (opsd.context.exposure: one schedule per mode).
        return exposure_ratio(self.cfg.teacher.context.exposure, iteration,
                              self.cfg.online.iterations, self.pass_rates, self.cfg.online.seed)

    def observe(self, iteration: int, rollouts: Artifact) -> None:
        """Record an iteration's student pass rate (drives adaptive exposure)."""
        self.pass_rates[iteration] = rollouts.manifest.get("pass_rate")

    # ------------------------------------------------------------------ policies

    def teacher_policy(self, student_key: str) -> Policy:
        """The teacher scoring the rollouts of the student keyed ``student_key``."""
        return self.kind.policy(self.base, self.external_teacher, student_key,
                                self.cfg.teacher.ema_rate)

    # ------------------------------------------------------------------ state

    def _bring_to(self, target_key: str) -> None:
        """Make the resident student hold the state after the iteration keyed ``target_key``."""
        chain = self.chain
        res = self._prepare()
        if res.state_key == target_key:
            return
        self.wait_saved()  # loading or replaying changes the weights being written
        keys = [k for k, _, _ in chain]
        start = 0
        if has_resume_point(self.resume_dir):
            counters = _peek_counters(self.resume_dir)
            if counters.get("state_key") in keys[: keys.index(target_key) + 1]:
                load_resume_point(self.resume_dir, res.master, res.trainer.opt, res.trainer.sched)
                if res.ema is not None:
                    _load_ema(self.resume_dir, res.ema)
                res.state_key = counters["state_key"]
                res.trainer.state.step = counters["step"]
                res.history = counters["history"]
                start = keys.index(res.state_key) + 1
                self._sync_copies_no_ema()
                self.p.say(f"online: resumed student state after iteration {start - 1}")
        for i in range(start, keys.index(target_key) + 1):
            # Deterministic replay from cached rollouts/targets (no resume point covers it).
            self.p.say(f"online: replaying training of iteration {i} from cached targets")
            _, roll, targ = chain[i]
            self._train_steps(roll, targ, i, record=False, revisions=self.revisions.get(i))
            res.state_key = keys[i]
            self._sync_copies()

    def _sync_copies_no_ema(self) -> None:
        res = self.res
        refresh_from(res.infer, res.master)
        if res.ema is not None:
            refresh_from(res.teacher_model, res.ema)
        self._sync_engines()

    def _save_resume(self, iteration: int) -> None:
        """Start writing a resume point in a background thread.

        The write (weights + AdamW moments, ≈ 1.6 GB for a 135M model: 2-4 s on this disk)
        reads the live tensors while the next iteration samples and scores, which only read
        other tensors; everything that changes them waits for it first (:meth:`wait_saved`).
        safetensors writes without holding the GIL."""
        every = self.cfg.online.resume_every
        if not every or (iteration + 1) % every:
            return
        now = time.monotonic()
        if now - self._last_resume_save < self.cfg.online.resume_min_interval_s:
            return
        self.wait_saved()
        self._last_resume_save = now
        res = self.res
        counters = {"state_key": res.state_key, "iteration": iteration,
                    "step": res.trainer.state.step, "history": list(res.history)}
        # the RNG state as of now (the thread saves it later, after sampling moved it on)
        rng = torch.get_rng_state()

        def write() -> None:
            try:
                save_resume_point(self.resume_dir, res.master, res.trainer.opt, res.trainer.sched,
                                  counters, rng_state=rng)
                if res.ema is not None:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in _untied(res.ema).items()},
                              str(self.resume_dir / "ema.safetensors"))
            except BaseException as err:  # re-raised in the main thread by wait_saved
                self._save_error = err

        self._saver = threading.Thread(target=write, name="opsd-resume-point")
        self._saver.start()

    def wait_saved(self) -> None:
        """Block until the resume point being written (if any) is on disk; raise its error."""
        if self._saver is not None:
            self._saver.join()
            self._saver = None
        if self._save_error is not None:
            err, self._save_error = self._save_error, None
            raise err

    # ------------------------------------------------------------------ training

    def _train_steps(self, rollouts: Artifact, targets: Artifact, iteration: int, record=True,
                     revisions: Artifact | None = None) -> list[dict]:
        res = self._prepare()
        self.wait_saved()  # the optimiser step changes the weights and moments being written
        if res.infer is not res.teacher_model:
            # its weights are rebuilt from the master after the step anyway (_sync_copies):
            # free them for the step, whose memory peak is the run's
            release_packed(res.infer)
        self._sleep_engines()
        stats = train_stage.online_steps(
            res.trainer, self.cfg.train, rollouts, targets, iteration,
            self.cfg.online.steps_per_iteration, rows=self.train_rows,
            tokenizer=self.p.pool.tokenizer(self.base), revisions=revisions)
        if record:
            res.history.extend(stats)
        return stats

    def train_iteration(self, rollouts: Artifact, targets: Artifact, iteration: int,
                        ctx: StageContext, revisions: Artifact | None = None) -> dict:
        """The train stage of one iteration: the resident student, caught up with the chain,
        takes ``online.steps_per_iteration`` optimiser steps on this iteration's samples (and
        its passing ``revisions``, SD-Zero's reviser term)."""
        self.current()
        t0 = time.perf_counter()
        stats = self._train_steps(rollouts, targets, iteration, revisions=revisions)
        return train_stage.online_manifest(stats, self.cfg.train, iteration,
                                           time.perf_counter() - t0, ctx, self.res.trainer)

    def record(self, key: str, rollouts: Artifact, targets: Artifact, iteration: int, *,
               trained_here: bool, revisions: Artifact | None = None) -> None:
        """Append iteration ``iteration`` (train key ``key``) to the chain. When this process
        trained it, the resident student holds its end state: refresh the sampling and teacher
        copies and write a resume point (a reused iteration is caught up lazily instead)."""
        self.chain.append((key, rollouts, targets))
        if revisions is not None:  # a replay of this iteration trains the reviser on them too
            self.revisions[iteration] = revisions
        if trained_here:
            self.res.state_key = key
            self._sync_copies()
            self._save_resume(iteration)


def _untied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


def _load_ema(folder, ema: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    path = folder / "ema.safetensors"
    if path.exists():
        ema.load_state_dict(load_file(str(path)), strict=False)


def _peek_counters(folder) -> dict:
    import json

    from opsd.training.state import STATE_FILE

    return json.loads((folder / STATE_FILE).read_text())["counters"]
