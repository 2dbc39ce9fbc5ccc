"""Teacher kinds (``teacher.kind``): who the teacher is and how its weights follow the student.

One strategy object per kind answers every question a flow asks about the teacher, so no flow
tests the kind's name:

    kind      weights                                  identity (content key of its outputs)
    frozen    the initial student, never updated       the base model's key
    live      the current student (OPSD, SDPO)          the student's key at this iteration
    ema       θ_T ← (1 − r) θ_T + r θ_S per iteration   "ema{r}-" + the student's key
    external  another model (plain OPD)                 that model's key

``live`` and ``ema`` only differ from ``frozen`` when the student changes between teacher passes,
which happens in online mode; offline, the teacher pass runs once before training, so they are
refused there (``online_only``) rather than silently behaving as ``frozen``. (A live teacher
inside the offline *train* stage is what the live-teacher objectives do: ``train.objective: jsd``.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from opsd.policy import Policy


@dataclass(frozen=True)
class Built:
    """What an online run keeps for its teacher: the scoring model and (ema) the fp32 average."""

    model: torch.nn.Module
    ema: torch.nn.Module | None = None


@dataclass(frozen=True)
class TeacherKind:
    name: str
    summary: str
    online_only: bool
    # the teacher's weights change with training: engines holding them must be refreshed
    follows_student: bool
    # (base, external, student_key, ema_rate) -> the teacher's Policy at this point of the run
    identity: Callable[[Policy, Policy | None, str, float], Policy]
    # (pool, base, external, student inference copy, dtype) -> Built
    build: Callable[..., Built]
    needs_model: bool = False  # teacher.model names the teacher's weights

    def policy(self, base: Policy, external: Policy | None, student_key: str,
               ema_rate: float = 0.0) -> Policy:
        return self.identity(base, external, student_key, ema_rate)

    def new_weights(self, master: torch.nn.Module, ema: torch.nn.Module | None):
        """Where the teacher's new weights come from after an optimiser step (None: unchanged)."""
        if not self.follows_student:
            return None
        return master if ema is None else ema


def _frozen(pool, base, external, infer, dtype) -> Built:
    return Built(pool.inference(base, dtype))


def _live(pool, base, external, infer, dtype) -> Built:
    return Built(infer)  # the student's own sampling copy: refreshed after every step anyway


def _ema(pool, base, external, infer, dtype) -> Built:
    return Built(copy.deepcopy(pool.inference(base, dtype)), ema=copy.deepcopy(pool.master(base)))


def _external(pool, base, external, infer, dtype) -> Built:
    return Built(pool.inference(external, dtype))


TEACHER_KINDS: dict[str, TeacherKind] = {k.name: k for k in (
    TeacherKind("frozen", "the initial student, never updated", online_only=False,
                follows_student=False,
                identity=lambda base, ext, key, rate: Policy(base.key, base.path, "teacher"),
                build=_frozen),
    TeacherKind("live", "the current student (weights shared with the sampling copy)",
                online_only=True, follows_student=True,
                identity=lambda base, ext, key, rate: Policy(key, base.path, "teacher(live)"),
                build=_live),
    TeacherKind("ema", "an exponential moving average of the student (teacher.ema_rate)",
                online_only=True, follows_student=True,
                identity=lambda base, ext, key, rate: Policy(f"ema{rate}-{key}", base.path,
                                                             "teacher(ema)"),
                build=_ema),
    TeacherKind("external", "another model with the same tokenizer (teacher.model)",
                online_only=False, follows_student=False,
                identity=lambda base, ext, key, rate: ext,
                build=_external, needs_model=True),
)}

KINDS = tuple(TEACHER_KINDS)


def get(name: str) -> TeacherKind:
    try:
        return TEACHER_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown teacher.kind {name!r}; known: {', '.join(KINDS)}") from None
