"""Typed pipeline configuration.

One YAML recipe maps onto :class:`PipelineConfig`. Every field carries help text
(shown by ``opsd config fields``) and a range where one makes sense, so a
typo or an out-of-range value is refused before any compute, with the allowed
range in the message. ``--set a.b=value`` overrides are applied to the raw
mapping before validation, so they obey exactly the same rules.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opsd import teachers as teacher_kinds
from opsd import routing
from opsd.context import consensus as consensus_rules
from opsd.device import DEVICE_PATTERN, auto_dtype, resolve_device
from opsd.objectives import registry as objective_registry


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what and how to fix it."""


def RunOnly(default: Any = ..., **kwargs: Any) -> Any:  # noqa: N802 - used like pydantic's Field
    """A field that changes how (or how fast, how safely) a stage runs, not what it computes: it is
    left out of every content key (:meth:`_Strict.key_dict`), so changing it reuses artifacts."""
    return Field(default, json_schema_extra={"in_key": False}, **kwargs)


def in_key(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("in_key") is False)


class _Strict(BaseModel):
    # Unknown keys are almost always typos ("learning_rate" for "lr"): refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def irrelevant(self) -> set[str]:
        """Fields that cannot change this section's outputs given its other values (the settings
        of an engine or feature that is off); left out of content keys like run-only fields."""
        return set()

    def key_dict(self) -> dict[str, Any]:
        """This section as it enters a stage's content key: JSON values, without the fields
        declared :func:`RunOnly` and those :meth:`irrelevant` now (recursively)."""
        return _key_view(self, json.loads(self.model_dump_json()))


def _key_view(model: _Strict, d: dict[str, Any]) -> dict[str, Any]:
    drop = model.irrelevant()
    for name in type(model).model_fields:
        if name in drop or not in_key(type(model), name):
            d.pop(name, None)
        elif isinstance(getattr(model, name), _Strict):
            d[name] = _key_view(getattr(model, name), d[name])
    return d


class ModelConfig(_Strict):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Built-in model name (smollm2-135m-instruct), a local Hugging Face folder, "
        "or a hub id (needs a network or a populated HF cache).",
    )
    revision: str | None = Field(None, description="Hub revision; ignored for local folders.")


class DataConfig(_Strict):
    source: str = Field(
        "behaviours",
        description="Dataset: a .jsonl/.json/.parquet path, 'behaviours[:rule,...]', or "
        "'reasoning_gym:<task>'.",
    )
    train_limit: int | None = Field(None, ge=1, description="Use at most this many train rows.")
    eval_limit: int | None = Field(None, ge=1, description="Use at most this many eval rows.")
    seed: int = Field(0, description="Seed for built-in suites that generate rows.")


KNOWN_VIEWS = ("system", "demonstrations", "sibling", "solution", "answer", "skills", "feedback",
               "attempt", "confidence")


class ExposureConfig(_Strict):
    """Partial exposure of the reference solution (opsd.context.exposure)."""

    mode: Literal["fixed", "linear", "adaptive", "atesd"] = Field(
        "fixed",
        description="fixed: always `ratio`; linear: from `start` to `end` over online iterations; "
        "adaptive: move the ratio each iteration toward the student's needs (more when its "
        "pass rate is below `target_pass`, less when above); atesd: ATESD's Beta-policy "
        "controller, one sampled ratio held for `hold` iterations, trained on the discounted "
        "learning progress of the student's pass rate (online mode).",
    )
    ratio: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the solution revealed (fixed).")
    start: float = Field(0.0, ge=0.0, le=1.0, description="Ratio at the first iteration (linear).")
    end: float = Field(1.0, ge=0.0, le=1.0, description="Ratio at the last iteration (linear).")
    target_pass: float = Field(0.5, ge=0.0, le=1.0, description="Adaptive: pass rate to hold.")
    step: float = Field(0.1, gt=0.0, le=1.0, description="Adaptive: ratio change per iteration.")
    hold: int = Field(2, ge=1, le=1000, description="atesd: iterations one sampled ratio is held.")
    horizon: int = Field(
        2, ge=1, le=100, description="atesd: windows of future learning progress credited to a "
        "decision (H).")
    discount: float = Field(0.5, ge=0.0, le=1.0, description="atesd: discount of later progress.")
    controller_lr: float = Field(
        2.0, gt=0.0, le=1000.0, description="atesd: REINFORCE step size of the controller.")

    def irrelevant(self) -> set[str]:
        # the controller's settings (added after content keys existed) only count for atesd
        return set() if self.mode == "atesd" else {"hold", "horizon", "discount", "controller_lr"}


class ContextConfig(_Strict):
    """What privileged information (PI) the teacher sees, and how it is rendered.

    Views, rendered in the listed order when a row (or the run) provides them:
    ``system`` rule, ``demonstrations`` and ``sibling`` (as real chat turns),
    ``solution`` (revealed by ``exposure``), ``answer``, ``skills`` (from the
    summarise stage), ``feedback`` (verifier feedback on the student's own
    attempt, SDPO/RLTF-SD), ``attempt`` (the student's reply and its reward,
    SD-Zero reviser). Text views go into one system message via the templates.
    """

    views: list[str] = Field(
        default_factory=lambda: ["system", "demonstrations", "solution", "answer", "skills"],
        description="PI views to render, in order, when present (see the class docs).",
    )
    solution_template: str = Field(
        "Here is a reference solution:\n{solution}\n\nUse it to answer the next question.",
        description="Template for the 'solution' view; {solution} is replaced.",
    )
    answer_template: str = Field(
        "The correct final answer is: {answer}", description="Template for the 'answer' view."
    )
    skills_template: str = Field(
        "Lessons learned from earlier attempts:\n{skills}", description="Template for 'skills'."
    )
    feedback_template: str = Field(
        "An earlier reply to the next question was:\n{attempt}\n\nFeedback on it: {feedback}",
        description="Template for 'feedback'; {attempt} and {feedback} are replaced.",
    )
    attempt_template: str = Field(
        "An earlier reply to the next question was {verdict} (reward {reward}):\n{attempt}\n\n"
        "Write a reply that is correct.",
        description="Template for 'attempt' (reviser); {attempt}, {verdict}, {reward}.",
    )
    confidence_template: str = Field(
        "The empirical confidence for this question is {confidence}. Output this exact value.",
        description="Template for 'confidence' (CaOPD's teacher note, arXiv:2604.16830): "
        "{confidence} is the pass rate of the prompt's rollouts (confidence.decimals digits).",
    )
    sibling_as: Literal["turn", "text"] = Field(
        "turn", description="Render a successful sibling as an earlier exchange or as text."
    )
    sibling_template: str = Field(
        "A correct reply to the next question:\n{sibling}", description="Template (sibling_as=text)."
    )
    exposure: ExposureConfig = Field(default_factory=ExposureConfig)
    consensus: Literal[consensus_rules.MODES] = Field(  # type: ignore[valid-type]
        "none",
        description="Multi-view teacher: score the response under each view set in "
        "`consensus_views` separately and combine the distributions (opsd.context.consensus): "
        "mean_logprob = normalised geometric mean, mean_prob = mixture, gated_residual = AVSD's "
        "consensus plus the first view set's residual, gated by the views' agreement.",
    )
    consensus_tau: float = Field(
        1.0, gt=0.0, le=100.0, description="gated_residual: gate temperature tau in nats "
        "(g = exp(-D/tau), D = the views' mean KL from their consensus).",
    )
    consensus_views: list[list[str]] = Field(
        default_factory=list, description="The view sets scored separately for consensus."
    )

    @field_validator("views")
    @classmethod
    def _known_views(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in KNOWN_VIEWS]
        if bad:
            raise ValueError(f"unknown view(s) {bad}; known views: {', '.join(KNOWN_VIEWS)}")
        return v

    def irrelevant(self) -> set[str]:
        # consensus_tau was added after content keys existed: out of the key unless it is used
        out = set() if self.consensus == "gated_residual" else {"consensus_tau"}
        if "confidence" not in {*self.views, *(v for vs in self.consensus_views for v in vs)}:
            out.add("confidence_template")  # likewise: only a context showing the view uses it
        return out

    @model_validator(mode="after")
    def _consensus_ok(self) -> "ContextConfig":
        if self.consensus != "none" and len(self.consensus_views) < 2:
            raise ValueError("consensus needs at least two view sets in consensus_views")
        for vs in self.consensus_views:
            self._known_views(vs)
        return self


class SummariseConfig(_Strict):
    """Skill-SD: summarise rollouts into lessons the teacher sees as the 'skills' view."""

    enabled: bool = Field(False, description="Run the summarise stage before each teacher pass.")
    group_by: Literal["task", "prompt"] = Field("task", description="One summary per task or prompt.")
    max_examples: int = Field(6, ge=1, le=64, description="Rollouts shown to the summariser per group.")
    exclude_self: bool = Field(
        False, description="Skill-SD: never build a sample's lessons from that sample: each group "
        "is split into two folds and each fold gets the lessons written from the other's attempts.",
    )
    max_new_tokens: int = Field(96, ge=8, le=4096, description="Length cap of a summary.")
    template: str = Field(
        "Below are attempts at the same kind of request, each marked as passing or failing a "
        "check.\n\n{examples}\n\nIn at most three short bullet points, state what the passing "
        "replies do that the failing ones do not (what worked, mistakes to avoid, the workflow).",
        description="Summarisation prompt; {examples} is replaced by the attempts.",
    )

    def irrelevant(self) -> set[str]:
        return set() if self.exclude_self else {"exclude_self"}  # keys of earlier recipes stay


class GuidanceConfig(_Strict):
    """Teacher-guided rollouts (see opsd.backends.hf.Guidance)."""

    enabled: bool = Field(
        False,
        description="Run the teacher in lockstep while sampling and let it replace tokens it "
        "strongly rejects (fixes offline mode's exposure problem for multi-token phrases).",
    )
    threshold: float = Field(
        3.0, gt=0.0, description="Intervene when log pT(y) - log pS(y) < -threshold (nats)."
    )
    min_teacher_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="...and the teacher's top token has at least this mass."
    )
    max_per_sample: int = Field(4, ge=1, description="At most this many teacher tokens per reply.")
    mode: Literal["replace", "mix"] = Field(
        "replace", description="replace: the teacher replaces the tokens it strongly rejects "
        "(threshold, min_teacher_prob, max_per_sample); mix: MixSD (Liu et al. 2026) - every "
        "token is drawn from the mixture mix * pT + (1 - mix) * pS of the teacher's conditional "
        "(privileged context: the 'expert') and the student's own (the 'naive' prior); train "
        "on those replies with objective nll (configs/facts/mixsd.yaml).",
    )
    mix: float = Field(
        0.5, gt=0.0, le=1.0, description="mode=mix: the weight of the teacher's conditional in "
        "the mixture (the expected share of reply tokens it draws).",
    )

    def irrelevant(self) -> set[str]:
        # mode and mix were added after content keys existed: out of the key unless mixing
        if self.mode == "mix":
            return {"threshold", "min_teacher_prob", "max_per_sample"}
        return {"mode", "mix"}


class VLLMEngineConfig(_Strict):
    """vLLM engine settings (read only when the stage's backend is ``vllm``; see docs/vllm.md).

    These become ``vllm.LLM(...)`` keyword arguments; the parallel sizes are vLLM's own and
    apply to the one engine a stage runs in the flow process.
    """

    tensor_parallel_size: int = Field(
        1, ge=1, le=1024, description="GPUs one engine shards every layer over (vLLM tensor "
        "parallelism)."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, le=1024, description="Pipeline stages one engine splits the layers into."
    )
    data_parallel_size: int = Field(
        1, ge=1, le=1024, description="vLLM data-parallel replicas. vLLM's offline LLM API accepts "
        "> 1 only with distributed_executor_backend=external_launcher (one launched process per "
        "replica); to spread shards over processes or a Ray cluster with the hf backend, use "
        "runner.kind instead."
    )
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(
        None, description="How vLLM starts its workers when a parallel size is > 1 (None: vLLM's "
        "choice: mp on one node, ray across nodes)."
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="Share of accelerator memory one engine may take; on CPU "
        "the share of host memory the worker checks it may reserve (leave room for a second engine "
        "and the trainer)."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + response in tokens (None: the model's limit)."
    )
    enforce_eager: bool | None = Field(
        None, description="No torch.compile / CUDA graphs (None: eager on CPU, compiled on GPU)."
    )
    kv_cache_gib: float | None = Field(
        None, gt=0.0, description="KV cache size in GiB (None: 2 GiB on CPU; on GPU sized from "
        "gpu_memory_utilization)."
    )
    colocate: bool = RunOnly(
        False,
        description="Online mode on one GPU: the engine shares the device with the trainer. It "
        "sleeps while the trainer steps (vLLM sleep mode: KV cache freed, weights dropped when "
        "new ones follow, else offloaded to host memory), wakes up and takes the new weights in "
        "place, and its gpu_memory_utilization is lowered so that the trainer's resident fp32 "
        "weights and AdamW moments (12 bytes per parameter) fit beside it. CUDA only: on CPU "
        "vLLM the flag is logged and ignored (no sleep mode there).",
    )

    @model_validator(mode="after")
    def _dp_needs_launcher(self) -> "VLLMEngineConfig":
        if self.data_parallel_size > 1 and self.distributed_executor_backend != "external_launcher":
            raise ValueError(
                "data_parallel_size > 1 needs distributed_executor_backend=external_launcher: vLLM's "
                "offline LLM API refuses in-process data parallelism (it may hang); to run shards "
                "on several engines/processes use runner.kind=processes or ray with the hf backend, "
                "or tensor_parallel_size for one engine over several GPUs")
        return self


class BRTSConfig(_Strict):
    """BRTS (Zhang et al. 2026, arXiv:2605.09725): best-of-N teacher replies as extra training
    samples (the paper's teacher-context branch; selection in :mod:`opsd.selection`).

    Per prompt the teacher (the model reading its privileged context) samples ``n`` replies; the
    verifier ranks them correct first, ties broken by the student's mean per-token
    log-likelihood of the reply (the most student-likely is the least off-policy). When none
    passes, the recovery step samples ``recovery_tries`` replies from the teacher also shown the
    ground truth (``recovery_views``) and keeps the most student-likely passing one; failing
    that, ``fallback``. The chosen reply is stored as one more sample of its prompt (sample
    index ``rollout.n``, the teacher's behaviour log-probs), the choice and its reasons in the
    rollout artifact's ``selection-*.parquet``; ``train.weighting.teacher_reply`` is the paper's
    coefficient of its loss.
    """

    n: int = Field(
        0, ge=0, le=64,
        description="Teacher replies sampled per prompt (tier 1 of the selection); 0: BRTS off.")
    recovery_tries: int = Field(
        1, ge=0, le=64,
        description="Recovery step (tier 2): replies sampled, for a prompt none of whose n teacher "
        "replies passes, from the teacher whose context also holds recovery_views (the ground "
        "truth); only passing ones are kept. 0: no recovery step.")
    recovery_views: list[str] = Field(
        default_factory=lambda: ["solution", "answer"],
        description="Views added to teacher.context.views for the recovery prompt (those a row "
        "has); a row with none of them has nothing to recover with and skips tier 2.")
    fallback: Literal["most_likely", "skip"] = Field(
        "most_likely",
        description="Tier 3, no passing reply at all: most_likely keeps the tier-1 reply the "
        "student finds most likely (no correctness guarantee; the paper's default); skip stores "
        "no teacher reply for the prompt.")
    temperature: float = Field(
        0.7, ge=0.0, le=10.0, description="Sampling temperature of the teacher's replies (the "
        "paper's 0.7); 0 is greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus mass of the teacher's replies.")

    @field_validator("recovery_views")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in KNOWN_VIEWS]
        if bad:
            raise ValueError(f"unknown view(s) {bad}; known views: {', '.join(KNOWN_VIEWS)}")
        return v


class RolloutConfig(_Strict):
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation engine.")
    n: int = Field(2, ge=1, le=256, description="Samples per prompt (group size).")
    temperature: float = Field(
        1.0, ge=0.0, le=10.0, description="Sampling temperature; 0 means greedy."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(64, ge=1, le=32768, description="Response length cap.")
    batch_size: int = Field(64, ge=1, description="Sequences generated together.")
    shard_size: int = Field(
        256, ge=1, description="Prompts per stored shard; a killed stage resumes per shard."
    )
    seed: int = Field(0, description="Sampling seed; with the same seed a rerun is identical.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype for generation (weights copied once). auto: the fast "
        "dtype of the run's device (opsd.device: bf16 on CUDA and on CPUs with AMX, fp32 on CPUs "
        "without); the resolved dtype is what enters content keys."
    )
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    sample_from: Literal["student", "teacher"] = Field(
        "student",
        description="teacher: sample the replies from the teacher *with* its privileged context while "
        "storing the student's prompt ids (off-policy data for the sft baseline; offline only).",
    )
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, description="vLLM engine settings (backend=vllm only)."
    )
    rescue_tries: int = Field(
        0, ge=0, le=64,
        description="KEPO's knowledge-enhanced exploration (arXiv:2602.00400): for a prompt none of "
        "whose n replies passes its verifier, sample up to this many replies from the model reading "
        "the teacher's privileged context (the hint) and put the first that passes in place of the "
        "prompt's last reply (prompt ids stay the student's; its behaviour log-probs and guided "
        "positions are the hinted sampler's), so GRPO's group has a reward-positive sample. "
        "0: off. hf backend.",
    )
    rescue_behaviour: Literal["sampler", "student"] = Field(
        "sampler",
        description="Behaviour log-probs stored with a rescued reply (rescue_tries > 0), the "
        "denominator of the reward term's ratio rho_t = pS(y_t)/p_behaviour(y_t). sampler: the "
        "hinted sampler's (the exact importance ratio; a reply the student alone would not write "
        "has rho ~ pS/p_hint << 1, so PPO's surrogate gives it almost no gradient); student: the "
        "student's own log-probs of the reply on its plain prompt at sampling time (the reply "
        "enters GRPO as if the current policy had sampled it: rho = 1 at the first step). hf "
        "backend.",
    )
    brts: BRTSConfig = Field(
        default_factory=BRTSConfig,
        description="BRTS best-of-N teacher replies as extra samples (brts.n > 0; hf backend).",
    )

    def needs_teacher(self) -> bool:
        """Whether sampling reads the teacher and its privileged context (guidance, sampling from
        the teacher, KEPO's hinted rescue)."""
        return (self.guidance.enabled or self.sample_from == "teacher" or self.rescue_tries > 0
                or self.brts.n > 0)

    def needs_teacher_model(self) -> bool:
        """Whether the teacher's resident model decodes beside the student's engine (guidance)
        or after it (KEPO's hinted rescue); sample_from=teacher uses a teacher engine instead."""
        return self.guidance.enabled or self.rescue_tries > 0 or self.brts.n > 0

    def irrelevant(self) -> set[str]:
        out = set()
        if self.backend != "vllm":
            out.add("vllm")  # the settings of an engine that does not run
        if not self.guidance.enabled:
            out.add("guidance")
        if self.sample_from == "student":
            out.add("sample_from")  # the default: keys of recipes older than the field stay
        if not self.rescue_tries:
            out.add("rescue_tries")
        if not self.rescue_tries or self.rescue_behaviour == "sampler":
            out.add("rescue_behaviour")  # the default: keys of recipes older than the field stay
        if not self.brts.n:
            out.add("brts")  # off: keys of recipes older than the field stay
        return out


class NamedTeacher(_Strict):
    """One teacher of a multi-teacher run (MOPD, arXiv:2606.30406): a model, or the student's
    own initial weights (``model: null``, 'self'), each with the privileged views it reads."""

    name: str = Field(..., min_length=1, description="The name routes and reports use.")
    model: ModelConfig | None = Field(
        None, description="The teacher's weights (same tokenizer as the student). None: 'self', "
        "the student's initial weights.")
    views: list[str] | None = Field(
        None, description="PI views this teacher reads (teacher.context's templates); None: "
        "teacher.context.views. [] : no privileged context (a plain domain expert).")

    @field_validator("views")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        bad = [x for x in v or [] if x not in KNOWN_VIEWS]
        if bad:
            raise ValueError(f"unknown view(s) {bad}; known views: {', '.join(KNOWN_VIEWS)}")
        return v


class RouteConfig(_Strict):
    """Which named teacher scores a row (opsd.routing): ``map[field(row)]``, else ``default``."""

    by: Literal[routing.FIELDS] = Field(  # type: ignore[valid-type]
        "task", description="Row field routed on: task, or data_source (row.metadata, verl's name).")
    map: dict[str, str] = Field(
        default_factory=dict, description="Field value -> teacher name.")
    default: str | None = Field(
        None, description="Teacher of rows whose value is not in map (None: the first teacher).")


class TeacherConfig(_Strict):
    model: ModelConfig | None = Field(
        None, description="External teacher (plain OPD). None: the student's own weights."
    )
    kind: Literal[teacher_kinds.KINDS] = RunOnly(  # type: ignore[valid-type]
        "frozen",
        description="frozen: initial weights; live: current student; ema: EMA of the student "
        "(live and ema: online mode); external: teacher.model (opsd.teachers).",
    )
    ema_rate: float = RunOnly(0.05, gt=0.0, le=1.0, description="EMA update rate per iteration.")
    backend: Literal["hf", "vllm"] = Field("hf", description="Scoring engine.")
    topk: int = Field(20, ge=1, le=1024, description="Teacher top-k stored per response token.")
    batch_size: int = RunOnly(32, ge=1, description="Sequences scored together.")
    shard_size: int = RunOnly(512, ge=1, description="Samples per stored shard.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Scoring dtype (auto: as rollout.dtype).")
    share_prefix: bool = Field(
        True,
        description="Encode a privileged prefix shared by many rows once and reuse its "
        "KV cache, and the whole context of a question once for all of its samples (packed "
        "rows); exact up to float rounding. false: every row encoded on its own.",
    )
    context: ContextConfig = Field(default_factory=ContextConfig)
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, description="vLLM engine settings (backend=vllm only)."
    )
    reference: ModelConfig | None = Field(
        None, description="G-OPD's reference model pRef (Yang et al. 2026, arXiv:2602.12125) of "
        "train.advantage.reward_scale: scored on the student's prompt and sampled tokens in the "
        "teacher stage (reference.parquet). The paper's choice for strong-to-weak distillation is "
        "the teacher's pre-RL base model. None: pRef is the behaviour policy.",
    )
    negative_view: Literal["solution", "answer"] | None = Field(
        None,
        description="CEPO's wrong-answer teacher (Heakl et al. 2026, arXiv:2605.19436): score every "
        "sample a second time with this view's value (the ground truth, in teacher.context.views) "
        "replaced by the reply of a rejected (failing) sibling of the same prompt - the worst by "
        "reward, never the sample itself - into negative.parquet (negative log-probs and the "
        "contrast log pT+ - log pT-); a sample without one is scored with its own context "
        "(contrast 0). Read by train.rewards.credit=cepo. None: no second pass.",
    )
    teachers: list[NamedTeacher] = Field(
        default_factory=list, description="MOPD (Ma et al. 2026, arXiv:2606.30406): several named "
        "teachers, each row scored by the one teacher.route picks (offline, frozen teachers). "
        "Empty: the one teacher of teacher.kind/teacher.model.")
    route: RouteConfig = Field(default_factory=RouteConfig,
                               description="MOPD: which named teacher scores each row.")

    def irrelevant(self) -> set[str]:
        out = set() if self.backend == "vllm" else {"vllm"}
        if self.reference is None:
            out.add("reference")  # keys of recipes older than the field stay
        if self.negative_view is None:
            out.add("negative_view")  # keys of recipes older than the field stay
        if not self.teachers:
            out |= {"teachers", "route"}  # keys of single-teacher recipes stay
        return out

    def default_teacher(self) -> str | None:
        """MOPD: the teacher of rows the route table does not name (None without teachers)."""
        if not self.teachers:
            return None
        return self.route.default or self.teachers[0].name

    @model_validator(mode="after")
    def _teachers_ok(self) -> "TeacherConfig":
        if not self.teachers:
            if self.route.map or self.route.default:
                raise ValueError("teacher.route needs teacher.teachers (the named teachers it picks)")
            return self
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher.teachers: duplicate names in {names}")
        unknown = sorted({n for n in [*self.route.map.values(), self.route.default] if n}
                         - set(names))
        if unknown:
            raise ValueError(f"teacher.route names unknown teacher(s) {unknown}; teachers: {names}")
        if self.model is not None or self.kind != "frozen":
            raise ValueError("teacher.teachers replaces teacher.model/teacher.kind: leave them unset "
                             "(each named teacher is frozen: a model, or 'self' with model: null)")
        if self.context.consensus != "none":
            raise ValueError("teacher.teachers with teacher.context.consensus is not supported: "
                             "a row is scored by one routed teacher")
        if self.negative_view is not None:
            raise ValueError("teacher.teachers with teacher.negative_view is not supported: CEPO's "
                             "second pass scores with one teacher, not the routed ones")
        return self


# The objectives and what each needs live in one place: opsd.objectives.registry.
OBJECTIVES = objective_registry.NAMES


class DivergenceConfig(_Strict):
    """How the per-token divergence of ``train.objective`` is formed (opsd.objectives.divergences)."""

    topk_support: Literal["teacher", "student"] = Field(
        "teacher",
        description="Support of the top-k divergences: 'teacher' = the teacher's cached top-k ids "
        "(works offline from the targets); 'student' = the student's own top-k ids at each step "
        "(needs the teacher's log-probs on them: the teacher then runs live during training).",
    )
    topk_tail: Literal["tail", "renorm"] = Field(
        "tail",
        description="Top-k divergences: 'tail' adds one rest-of-vocabulary class of mass 1 - sum(top-k) "
        "(exact KL of the coarsened distributions); 'renorm' renormalises both distributions on the "
        "top-k ids and drops the rest.",
    )
    jsd_beta: float = Field(
        0.5, ge=0.0, le=1.0,
        description="objective=jsd: generalized JSD(beta) of GKD (Agarwal et al. 2024): 0 = forward "
        "KL(T||S), 1 = reverse KL(S||T), between: beta KL(T||M) + (1-beta) KL(S||M), "
        "M = beta T + (1-beta) S.",
    )
    clip: float | None = Field(
        None, gt=0.0,
        description="Per-token divergence clipping (OPSD, Zhao et al. 2026): clamp divergence terms at "
        "this value (nats); a clamped term gives no gradient. None disables.",
    )
    clip_mode: Literal["element", "token"] = Field(
        "element",
        description="element: clamp each vocabulary (or top-k class) term before summing, as the OPSD "
        "code does; token: clamp the per-token divergence. reverse_kl_sampled clips its advantage "
        "to [-clip, clip] in both modes.",
    )
    topk: int | None = Field(
        None, ge=1, le=4096,
        description="topk_support=student: size of the student's top-k support (default: teacher.topk "
        "as stored in the targets).",
    )


class AdvantageConfig(_Strict):
    """The per-token advantage of reverse_kl_sampled (policy-gradient form of on-policy distillation)."""

    reward_scale: float = Field(
        1.0, gt=0.0, le=100.0,
        description="G-OPD reward scale lambda (Yang et al. 2026; lambda > 1 is ExOPD reward "
        "extrapolation): A_t = lambda (log pT - log pRef) - (log pS - log pRef), pRef = the behaviour "
        "policy's log-prob of y_t (the initial student in offline mode) or, with teacher.reference, "
        "that model's. 1 = plain OPD (pRef cancels).",
    )
    baseline: Literal["none", "vopd"] = Field(
        "none",
        description="vOPD control variate (Oh et al. 2026): subtract the detached per-token value "
        "V_t = -KL(pS||pT)_t from A_t (unbiased, lower variance); the KL is taken over the teacher's "
        "cached top-k + tail bucket (the paper's top-k approximation).",
    )


class WeightingConfig(_Strict):
    """Per-token weights of the distillation term (opsd.objectives.weighting)."""

    position: Literal["none", "linear", "sigmoid", "iw_opd"] = Field(
        "none",
        description="Position weights. linear: w_min + (1-w_min) u; sigmoid (PW-OPSD, Liu et al. 2026): "
        "w_min + (1-w_min) sigmoid((u - tau)/scale), u = (t+0.5)/L the relative position in the reply; "
        "iw_opd (Xie et al. 2026): 1 + gamma (1 - sum_{s<t}|A_s| / sum_s |A_s|), A = log pT - log "
        "pBehaviour (decreasing).",
    )
    position_min: float = Field(0.2, ge=0.0, le=1.0, description="w_min of linear/sigmoid weights.")
    position_tau: float = Field(0.5, ge=0.0, le=1.0, description="sigmoid: midpoint u of the ramp.")
    position_scale: float = Field(0.1, gt=0.0, le=10.0, description="sigmoid: width of the ramp.")
    iw_gamma: float = Field(0.5, ge=0.0, le=100.0, description="iw_opd: gamma.")
    normalize: bool = Field(
        True,
        description="Rescale linear/sigmoid/iw_opd weights to mean 1 within each reply (the reply's "
        "total weight stays its token count; only the shape changes).",
    )
    skip_first: int = Field(0, ge=0, description="Give the first n tokens of every reply weight 0.")
    entropy: Literal["none", "student", "teacher"] = Field(
        "none",
        description="Entropy-aware weights (SRPO, Li et al. 2026): w_t ~ exp(-H_t / entropy_tau), "
        "normalised to mean 1 over the micro-batch, so confident targets count more. teacher: the "
        "teacher's entropy (top-k + tail bucket from the cache, exact with a live teacher).",
    )
    entropy_tau: float = Field(1.0, gt=0.0, le=100.0, description="Temperature of entropy weights (nats).")
    teacher_reply: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Weight of the distillation term on samples the teacher wrote (BRTS's chosen "
        "replies, rollout.brts): the paper's L = L_student-context + lambda L_teacher-context "
        "(lambda 0.05 in arXiv:2605.09725). Student samples keep weight 1.",
    )

    def irrelevant(self) -> set[str]:
        # added after content keys existed: out of the key at its default
        return {"teacher_reply"} if self.teacher_reply == 1.0 else set()


class SelectionConfig(_Strict):
    """TIP token selection (Xu et al. 2026): train on informative tokens only."""

    mode: Literal["none", "tip"] = Field(
        "none",
        description="tip: keep the top `entropy_fraction` of tokens by student entropy plus the "
        "low-entropy tokens whose teacher-student divergence is in the top `divergence_fraction` "
        "(overconfident and wrong); kept tokens are reweighted so the micro-batch's total weight is "
        "unchanged.",
    )
    entropy_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share kept by student entropy.")
    divergence_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Divergence quantile (top share) for low-entropy tokens."
    )


class RewardConfig(_Strict):
    """Mixing distillation with verifier rewards (group = the samples of one dataset row)."""

    rl_weight: float = Field(
        0.0, ge=0.0, le=100.0,
        description="Weight of the reward term: GRPO -A_i log pS(y_t), A_i = (r_i - mean_g r) / "
        "(std_g r + eps) the group-normalised verifier reward of sample i (Shao et al. 2024); with "
        "routing=scope the MLE term of passing replies.",
    )
    distill_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the distillation term.")
    routing: Literal["none", "srpo", "scope", "kepo"] = Field(
        "none",
        description="Route samples by correctness. srpo (Li et al. 2026): passed -> GRPO, failed -> "
        "distillation. scope (Zheng et al. 2026): failed -> distillation weighted by "
        "group-softmax(-log PPL_teacher / tau); passed -> MLE weighted by group-softmax("
        "log PPL_student / tau). kepo (KEPO, arXiv:2602.00400): GRPO on every sample, "
        "distillation only on passed ones (quality-gated: a failed reply's context is flawed, "
        "its teacher targets noise); pair with rollout.rescue_tries.",
    )
    scope_tau: float = Field(1.0, gt=0.0, le=100.0, description="scope: softmax temperature.")
    advantage_eps: float = Field(1e-4, gt=0.0, description="eps in the GRPO advantage denominator.")
    ppo_clip: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Reward term as PPO/GRPO's clipped surrogate -min(rho_t A, clip(rho_t, 1-eps, "
        "1+eps) A), rho_t = pS(y_t)/p_behaviour(y_t) per token (Schulman et al. 2017; GRPO's "
        "default eps 0.2): a token stops being pushed once its probability moved eps away from "
        "the rollout's in the advantage's direction. Without it (None) the term is plain "
        "REINFORCE -A log pS(y_t), unbounded for negative advantages: on offline rollouts trained "
        "for many steps it can push the student's own replies down without limit. Replaces "
        "importance_ratio_clip for the reward term.",
    )
    credit: Literal["none", "cepo"] = Field(
        "none",
        description="Token-level credit inside the reward term. cepo (Heakl et al. 2026, "
        "arXiv:2605.19436): A_t = A_i [(1 - lam) + lam clip(exp(sign(A_i) c_t), 1 - cepo_clip, "
        "1 + cepo_clip)], c_t = log pT+(y_t) - log pT-(y_t) the contrast between the teacher with "
        "the ground truth and the teacher with a rejected sibling's reply (teacher.negative_view); "
        "lam falls linearly from cepo_lambda to 0 over cepo_decay_fraction of the steps.",
    )
    cepo_lambda: float = Field(0.5, ge=0.0, le=1.0, description="cepo: initial evidence weight lambda_0.")
    cepo_decay_fraction: float | None = Field(
        0.5, gt=0.0, le=1.0,
        description="cepo: share of the planned steps over which lambda falls linearly to 0 (the "
        "paper: 25 of 50 steps); None keeps lambda_0.")
    cepo_clip: float = Field(
        0.5, gt=0.0, lt=1.0, description="cepo: eps_w, the evidence weight is clipped to "
        "[1 - eps_w, 1 + eps_w].")

    def irrelevant(self) -> set[str]:
        # added after content keys existed: out of the key unless CEPO is on
        return set() if self.credit == "cepo" else {
            "credit", "cepo_lambda", "cepo_decay_fraction", "cepo_clip"}


class TraceConfig(_Strict):
    """TRACE-style span routing (Wang et al. 2026): KL only on marked spans, GRPO elsewhere.

    Spans are regexes applied to each reply's text (character matches → the tokens they
    overlap): ``key_patterns`` / ``error_patterns`` here apply to every row; a row may add its own
    under ``metadata.trace`` as ``{"key": [regex, ...], "error": [regex, ...]}``;
    ``key_from_verifier`` also marks the match of the row's regex verifier as a key span.
    """

    enabled: bool = Field(False, description="Route tokens by spans (objective is then unused).")
    key_patterns: list[str] = Field(default_factory=list, description="Regexes of key spans.")
    error_patterns: list[str] = Field(default_factory=list, description="Regexes of error spans.")
    key_from_verifier: bool = Field(
        True, description="Mark a regex verifier's match in a passing reply as a key span."
    )
    kl_weight: float = Field(1.0, ge=0.0, le=100.0, description="KL weight before annealing.")
    warmup_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of the steps at full KL weight."
    )
    decay_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of the steps over which the KL weight falls to 0."
    )


class ReviserConfig(_Strict):
    """SD-Zero's reviser training (He et al. 2026, arXiv:2604.12002), online mode: every iteration
    the current model, reading the teacher's context (which holds the ``attempt`` view: its own
    reply and the verdict), samples revisions of the iteration's attempts (the revise stage,
    stages/revise.py); the verifier checks them and each optimiser step adds
    ``weight · mean −log πθ(r_t | reviser context, r_<t)`` over the tokens of passing revisions."""

    weight: float = Field(
        0.0, ge=0.0, le=100.0,
        description="Weight of the reviser NLL on passing revisions, added to the step's loss "
        "(its own token mean, so the distillation term keeps its scale). 0: off (no revise stage).",
    )
    revise: Literal["failed", "all"] = Field(
        "failed",
        description="Which attempts are revised: failed (the paper's data collection by default) "
        "or all (also passing ones, the paper's optional r=1 'rephrase' branch).",
    )
    n: int = Field(1, ge=1, le=64, description="Revisions sampled per revised attempt (sampled "
                   "like the rollouts: rollout.temperature, top_p, max_new_tokens).")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class LoraConfig(_Strict):
    """Low-rank adapters (LoRA, Hu et al. 2021; opsd.training.lora): the targeted linear layers
    train a rank-r update ``(alpha / r) · B A`` beside their frozen weights, and the stage folds it
    back in when training ends, so the checkpoint it writes is a plain one of the base
    architecture. Offline mode on one process or DDP ranks."""

    rank: int = Field(0, ge=0, le=4096, description="Adapter rank r; 0: off (train the weights).")
    alpha: float = Field(
        32.0, gt=0.0, le=1e6,
        description="Scale numerator: the update is (alpha / rank) B A, so the learning rate "
        "that suits one rank roughly suits another at a fixed alpha.")
    targets: str = Field(
        r"(q|k|v|o|gate|up|down)_proj$",
        description="Regex (re.search) over module names of the linear layers that get adapters; "
        "the default takes every attention and MLP projection of Llama/Qwen-style models. The "
        "output embedding never does.")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @field_validator("targets")
    @classmethod
    def _targets_compile(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"train.lora.targets {v!r} is not a regular expression: {e}") from None
        return v


class TrainConfig(_Strict):
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        "forward_kl_topk",
        description="forward_kl_topk: sum pT(log pT - log pS) on the top-k support (+ tail); "
        "reverse_kl_sampled: REINFORCE form, A_t = sg(log pT - log pS); reverse_kl_topk: sum pS(log pS "
        "- log pT) on the top-k support (+ tail); jsd: full-vocabulary generalized JSD(beta) with a "
        "live teacher; nll: -log pS(y_t) (SFT on the stored replies); none: reward terms only.",
    )
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    trace: TraceConfig = Field(default_factory=TraceConfig)
    reviser: ReviserConfig = Field(default_factory=ReviserConfig)
    epochs: int = Field(2, ge=1, le=1000, description="Passes over the cached targets.")
    steps: int | None = Field(
        None, ge=1, le=10_000_000,
        description="Optimiser-step budget: exactly this many steps, cycling through the cached "
        "targets for as many (partial) epochs as that takes, so the training a recipe gives does "
        "not shrink with a smaller dataset (64 questions x 2 samples at batch 16 is 8 steps an "
        "epoch). Replaces epochs when set; None: epochs passes.",
    )
    batch_size: int = Field(16, ge=1, description="Sequences per optimiser step.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward.")
    lr: float = Field(5e-5, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="LR schedule after warm-up."
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    trainable: str | None = Field(
        None,
        description="Train only the parameters whose name this regex finds (re.search); the rest "
        "keep the base weights and get no AdamW state. E.g. 'mlp' (the MLP blocks), "
        "'layers\\.(1[6-9]|2[0-9])\\.' (the upper layers). None: all of them. A regex that "
        "finds no parameter is an error at train time.",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=10.0,
        description="Temperature of the student's (and a live teacher's) logits in the loss; must "
        "equal rollout.temperature (the one the behaviour log-probs were sampled at) unless "
        "allow_temperature_mismatch.",
    )
    allow_temperature_mismatch: bool = Field(
        False, description="Accept train.temperature != rollout.temperature (warned at train time)."
    )
    importance_ratio_clip: float | None = Field(
        None, gt=1.0, description="reverse_kl_sampled and reward terms: weight tokens by "
        "pi_S/pi_behaviour clipped to [1/c, c]; None disables.",
    )
    autocast: Literal["auto", "bfloat16", "none"] = Field(
        "auto", description="Mixed precision for forward/backward; master weights and AdamW state "
        "stay fp32. auto: bfloat16 where bf16 is the device's fast dtype (CUDA, CPUs with AMX), "
        "none (pure fp32) elsewhere; resolved before it enters content keys."
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel of the student's forward/backward. auto: eager for micro-"
        "batches padded to <= 192 tokens, PyTorch SDPA above (docs/benchmarks.md: where each "
        "kernel is faster).",
    )
    batch_order: Literal["shuffle", "grouped"] = Field(
        "shuffle",
        description="shuffle: examples in a seeded random order every epoch. grouped: the "
        "questions are shuffled and each question's samples stay together, so a batch holds "
        "whole groups (as GRPO-style trainers batch) and their prompts are encoded once "
        "(share_prompts), so the train step computes fewer positions.",
    )
    share_prompts: bool = Field(
        True,
        description="Encode a prompt once per micro-batch for all of its samples (each reply "
        "attends to the one copy through a block mask) and pack rows to cut padding; used when "
        "it computes fewer positions and the attention kernel is sdpa or eager. Same loss up to "
        "rounding.",
    )
    activation_checkpointing: bool | Literal["auto"] = RunOnly(
        "auto",
        description="Recompute every decoder layer's activations in backward instead of keeping "
        "them: less memory for more compute (docs/benchmarks.md has the measured trade-off); for "
        "long sequences or big models. auto: off on CPU; on CUDA, on for a micro-batch only when "
        "its estimated activations would not fit the device's free memory (opsd.training.memory). "
        "Same loss either way.",
    )
    compile: bool = RunOnly(
        False,
        description="torch.compile every decoder layer (dynamic shapes) before training. Off by "
        "default: not measured to pay yet (docs/benchmarks.md); the first steps pay the compilation.",
    )
    logit_chunk: int = Field(
        256, ge=1, description="Response positions per log-softmax chunk (bounds memory: one "
        "[logit_chunk, V] block of student (and live-teacher) logits at a time)."
    )
    seed: int = Field(0, description="Data order and init seed.")
    save_every: int = RunOnly(
        50, ge=0, description="Save a resume point (weights, optimizer, RNG) every N steps so a "
        "killed train stage continues where it stopped (0: never)."
    )
    world_size: int = RunOnly(
        1, ge=1, le=1024,
        description="Data-parallel processes for offline training. > 1 launches the train stage "
        "with torchrun on this machine: every optimiser batch is split across the ranks and the "
        "gradients are all-reduced (torch.distributed), so the update equals one process's.",
    )
    sharding: Literal["ddp", "fsdp"] = RunOnly(
        "ddp",
        description="How the world_size > 1 ranks hold the model. ddp: every rank keeps the full "
        "weights, gradients and AdamW state (gradients all-reduced). fsdp: PyTorch FSDP2 "
        "(torch.distributed.fsdp.fully_shard) shards weights, gradients and AdamW state across the "
        "ranks - each holds 1/world_size of them and gathers one decoder layer (plus the "
        "embeddings/LM head) at a time - for models that do not fit one device; same update. "
        "Ignored when world_size is 1.",
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = RunOnly(
        "auto", description="torch.distributed backend when world_size > 1 (auto: nccl when the "
        "run's device is CUDA, else gloo)."
    )
    nnodes: int = RunOnly(
        1, ge=1, le=4096,
        description="Machines taking part in offline training, each running world_size ranks "
        "(multi-node torchrun with c10d rendezvous at rdzv_endpoint). This machine launches its "
        "ranks; every other node runs `python -m opsd.stages.train_worker --node SPEC` on the "
        "spec the train stage writes (the OPSD home must be on a file system all nodes share).",
    )
    rdzv_endpoint: str | None = RunOnly(
        None,
        description="host:port of the c10d rendezvous for nnodes > 1 (a port open to every node "
        "on one of them, usually this machine).",
    )

    def irrelevant(self) -> set[str]:
        # a step budget makes epochs meaningless; without one the key is the one of recipes
        # older than the field
        out = {"epochs"} if self.steps is not None else {"steps"}
        if not self.reviser.enabled:
            out.add("reviser")  # off: keys of recipes older than the section stay
        if self.trainable is None:
            out.add("trainable")  # likewise: training all parameters keeps the older keys
        if not self.lora.enabled:
            out.add("lora")
        return out

    @property
    def live_teacher(self) -> bool:
        """True when the teacher's logits are computed during training (not read from the cache)."""
        return objective_registry.get(self.objective).needs_live_teacher(self)

    @field_validator("trainable")
    @classmethod
    def _trainable_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"train.trainable {v!r} is not a regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _objective_consistent(self) -> "TrainConfig":
        r = self.rewards
        objective = objective_registry.get(self.objective)
        if (objective.divergence is None and r.rl_weight == 0 and r.routing == "none"
                and not self.trace.enabled):
            raise ValueError("objective=none trains nothing: set rewards.rl_weight, rewards.routing "
                             "or trace.enabled")
        if (self.advantage.reward_scale != 1.0 or self.advantage.baseline != "none") and (
                not objective.advantage):
            raise ValueError("advantage.reward_scale / advantage.baseline apply to "
                             "objective=reverse_kl_sampled only")
        if r.routing != "none" and r.rl_weight == 0:
            raise ValueError(f"rewards.routing={r.routing} sends passing replies to the reward term: "
                             "set rewards.rl_weight > 0")
        if r.routing != "none" and self.trace.enabled:
            raise ValueError("rewards.routing and trace.enabled both route tokens; pick one")
        if (self.divergence.topk_support == "student"
                and not objective.topk_support):
            raise ValueError("divergence.topk_support=student applies to forward_kl_topk/reverse_kl_topk")
        if r.credit == "cepo" and (r.rl_weight == 0 or r.routing == "scope" or self.trace.enabled):
            raise ValueError("rewards.credit=cepo reweights the GRPO advantage per token: it needs "
                             "rewards.rl_weight > 0 and neither routing=scope (an MLE weight, not an "
                             "advantage) nor trace.enabled")
        if self.lora.enabled and self.trainable is not None:
            raise ValueError("train.lora trains only its adapters; train.trainable cannot also "
                             "choose parameters (unset one of them)")
        if self.lora.enabled and self.sharding == "fsdp" and self.world_size > 1:
            raise ValueError("train.lora is not supported with sharding=fsdp yet: use "
                             "sharding=ddp (the adapters are small; every rank holds them)")
        return self


class BenchmarkConfig(_Strict):
    """One benchmark of the evaluation panel: a dataset whose eval split is scored for the
    student before and after training, beside the run's own task. A recipe may write a bare
    source string instead of the mapping."""

    source: str = Field(
        ..., description="A built-in suite ('behaviours?eval_set=ood', 'facts', "
        "'reasoning_gym:<task>?train=0&eval=32') or a .jsonl/.json/.parquet file; its eval split "
        "is scored.",
    )
    name: str | None = Field(
        None, description="Name in metrics (eval.<policy>.<name>.greedy) and stage labels; "
        "default: derived from the source (a reasoning-gym task's name, a file's stem, else the "
        "suite name and its eval_set).",
    )
    limit: int | None = Field(None, ge=1, description="Score at most this many eval rows.")
    teacher: bool = Field(
        False, description="Also score the teacher with its privileged context on this benchmark "
        "(a ceiling; useful for another split of the run's own task).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @property
    def label(self) -> str:
        """The benchmark's name: ``name`` or one derived from ``source`` (metric-name safe)."""
        return self.name or benchmark_name(self.source)


def benchmark_name(source: str) -> str:
    """A short name for a benchmark source: ``reasoning_gym:leg_counting?eval=16`` → ``leg_counting``,
    ``facts?eval_set=ood`` → ``facts-ood``, ``data/my rows.jsonl`` → ``my_rows``."""
    import re

    head, _, query = source.partition("?")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    if any(head.endswith(ext) for ext in (".jsonl", ".json", ".parquet")):
        name = Path(head).stem
    else:
        suite, _, arg = head.partition(":")
        name = arg if suite == "reasoning_gym" and arg else suite + (f":{arg}" if arg else "")
        if params.get("eval_set") not in (None, "heldout"):
            name += f"-{params['eval_set']}"
    return re.sub(r"[^A-Za-z0-9_.:-]+", "_", name).strip("_") or "benchmark"


class EvalConfig(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=32768, description="Response length cap.")
    batch_size: int = RunOnly(64, ge=1, description="Sequences generated together.")
    samples: int = Field(
        0, ge=0, le=256, description="k sampled replies per prompt for avg@k/pass@k/maj@k "
        "(0: greedy only)."
    )
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Temperature of sampled eval.")
    teacher_ceiling: bool = RunOnly(
        True, description="Also evaluate the teacher with its privileged context."
    )
    seed: int = Field(1234, description="Seed of sampled eval.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Generation dtype (auto: as rollout.dtype).")
    # Run-only: every benchmark is an evaluate stage of its own (its key holds its source and
    # rows), so adding one to a recipe reuses the evaluations already done.
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list, json_schema_extra={"in_key": False},
        description="More datasets scored before and after training besides the run's own eval "
        "split (a split from another distribution, a general-capability panel); each is "
        "reported per benchmark as eval.<policy>.<name>.greedy. Items: a source string or "
        "{source, name, limit, teacher}.",
    )

    @field_validator("benchmarks")
    @classmethod
    def _unique_benchmarks(cls, v: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        names = [b.label for b in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"benchmark name(s) {', '.join(twice)} used twice; give each a name")
        return v


# Held-out general-capability panel of the retention check, unrelated to every built-in suite:
# 200 everyday general-knowledge questions (SmolLM2-135M-Instruct answers 56 % greedily in fp32,
# so a drop shows; one question is half a point) and two reasoning-gym tasks with a seed no suite
# uses by default (near 0 % at 135M - docs/quality.md - but the check larger models need).
DEFAULT_PANEL = (
    "general",
    "reasoning_gym:sentence_reordering?train=0&eval=16&seed=101",
    "reasoning_gym:family_relationships?train=0&eval=16&seed=101",
)


class RetentionConfig(_Strict):
    """Forgetting check on material unrelated to the taught task (stages/retention.py): a
    held-out reasoning-gym panel, reference text, and the base model's replies to rule-free
    questions, each with the taught spans left out."""

    enabled: bool = RunOnly(
        False,
        description="After evaluate/after: general capability of the trained student against the "
        "base model - panel pass rate, log-likelihood of reference text and of the base model's "
        "own greedy replies, their exact-match rate - with taught spans excluded.",
    )
    panel: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PANEL),
        description="Benchmark sources of the general-capability panel (their eval splits, "
        "greedy); [] turns the panel off.",
    )
    panel_max_new_tokens: int = Field(96, ge=1, le=32768, description="Reply cap on the panel.")
    reference_text: bool = Field(
        True, description="Score the built-in reference passages (opsd.data.reference) as plain text.")
    exclude_taught: bool = Field(
        True, description="Leave the taught spans (text a train row's regex verifier finds in the "
        "trained reply but not in the base reply) out of every comparison.")
    prompts: int = Field(32, ge=1, le=32, description="How many of the 32 built-in prompts to use.")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Length cap of the greedy replies.")
    batch_size: int = RunOnly(32, ge=1, description="Sequences generated/scored together.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="Generation/scoring dtype (auto: the device's fast dtype).")


class OnlineConfig(_Strict):
    """Online mode: every iteration samples from the current student."""

    iterations: int = RunOnly(30, ge=1, le=100000, description="Rollout → teacher → train iterations.")
    prompts_per_iteration: int = Field(
        8, ge=1, description="Train prompts sampled per iteration (× rollout.n replies)."
    )
    steps_per_iteration: int = Field(
        1, ge=1, description="Optimiser steps per iteration over that iteration's samples."
    )
    eval_every: int = RunOnly(
        0, ge=0, description="Evaluate the student every N iterations (0: only at the end)."
    )
    resume_every: int = RunOnly(
        1, ge=0, description="Save the rolling resume point every N iterations (0: never)."
    )
    resume_min_interval_s: float = RunOnly(
        300.0, ge=0.0,
        description="...and at most once per this many seconds of the run (the first one, too, "
        "only after this long): a resume point writes the weights and the optimiser "
        "state, while a rerun after a crash only replays the optimiser steps since the last point "
        "from their cached rollouts and targets (docs/benchmarks.md: the costs of both). 0: every "
        "resume_every iterations.",
    )
    stop_at: float | None = RunOnly(
        None, ge=0.0, le=1.0,
        description="Stop after the first periodic evaluation (eval_every) whose held-out greedy "
        "compliance reaches this fraction; the checkpoint and final evaluation then follow as usual.",
    )
    seed: int = Field(0, description="Seed of the prompt order across iterations.")

    @model_validator(mode="after")
    def _stop_needs_evals(self) -> "OnlineConfig":
        if self.stop_at is not None and not self.eval_every:
            raise ValueError("online.stop_at needs online.eval_every > 0 (the periodic evaluation "
                             "is what it stops on)")
        return self


class TrackingConfig(_Strict):
    log_model: bool = Field(
        True,
        description="Log each freshly trained checkpoint as an MLflow `transformers` model "
        "(weights copied into the MLflow artifact store, loadable with mlflow.transformers).",
    )


class RunnerConfig(_Strict):
    """Where the shards of the rollout and teacher stages run: one Prefect task per missing shard,
    submitted to this Prefect task runner; the stage's artifact is published when every shard is
    written. Per-shard seeds make the output identical whatever the kind and worker count."""

    kind: Literal["threads", "processes", "ray"] = Field(
        "threads",
        description="threads: Prefect's ThreadPoolTaskRunner in the flow process (models loaded "
        "once and shared); processes: ProcessPoolTaskRunner, one spawned process per worker; ray: "
        "prefect-ray's RayTaskRunner (pip install 'opsd[ray]'), a local Ray instance or the cluster "
        "at ray_address. processes/ray workers each load the model(s) the stage needs.",
    )
    workers: int = Field(
        1, ge=1, le=4096,
        description="Shards run at the same time (threads/processes: pool size; ray: the CPUs of a "
        "local Ray instance, in units of cpus_per_worker).",
    )
    cpus_per_worker: int = Field(
        1, ge=1, le=1024,
        description="processes/ray: torch threads per worker (ray: CPUs reserved per shard task). "
        "threads: unused (the flow process's torch threads are shared).",
    )
    ray_address: str | None = Field(
        None,
        description="ray: address of a running cluster ('auto', 'ray://head:10001'); None starts a "
        "local Ray instance for the run's rollout and teacher stages. Workers must see the same OPSD home (a shared "
        "file system) and a Prefect API they can reach (set PREFECT_API_URL).",
    )

    @model_validator(mode="after")
    def _address_needs_ray(self) -> "RunnerConfig":
        if self.ray_address is not None and self.kind != "ray":
            raise ValueError(f"runner.ray_address is set but runner.kind is {self.kind!r}; "
                             "set runner.kind=ray or drop ray_address")
        return self


class ConfidenceConfig(_Strict):
    """CaOPD's confidence revision (Zhang et al. 2026, arXiv:2604.16830; opsd.calibration): the
    confidence a rollout states is replaced by its prompt's empirical pass rate before the
    teacher scores it and the student trains on it. Evaluation reports ECE / Brier of the
    confidences greedy replies state (opsd.metrics). Show the teacher the same number with the
    `confidence` view of teacher.context (its note)."""

    revise: bool = Field(False, description="Revise every rollout's stated confidence (a "
                         "'confidence' stage between rollout and teacher; offline mode).")
    template: str = Field("Confidence: {confidence}",
                          description="The statement appended to a revised reply.")
    decimals: int = Field(2, ge=0, le=6, description="Digits of the stated pass rate (0.75).")

    @field_validator("template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{confidence}" not in v:
            raise ValueError("confidence.template must contain {confidence}")
        return v


class PipelineConfig(_Strict):
    name: str = Field("opsd", description="Recipe name, shown in MLflow and the catalog.")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: sample once, train many epochs; online: resample."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    summarise: SummariseConfig = Field(default_factory=SummariseConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    confidence: ConfidenceConfig = Field(default_factory=ConfidenceConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    device: str = RunOnly(
        "auto",
        description="Where every stage loads and runs its models: auto (the first CUDA device "
        "when there is one, else the CPU), cpu, cuda, or cuda:N. Not part of any content key: "
        "outputs of different devices agree up to a tolerance, not bitwise. Training ranks "
        "(train.world_size > 1) on CUDA use one device each (cuda:LOCAL_RANK).",
    )

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v.strip()):
            raise ValueError(f"device {v!r}: use auto, cpu, cuda or cuda:N")
        return v.strip()

    def resolved(self) -> tuple["PipelineConfig", list[str]]:
        """This config with its device-dependent ``auto`` values decided for this machine, and
        one line per decision saying why (:func:`resolve_for_device`)."""
        return resolve_for_device(self)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must be a non-empty string")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        if self.train.micro_batch_size > self.train.batch_size:
            raise ValueError(
                f"train.micro_batch_size ({self.train.micro_batch_size}) must be <= "
                f"train.batch_size ({self.train.batch_size})"
            )
        if self.train.batch_size % self.train.micro_batch_size:
            raise ValueError(
                "train.batch_size must be a multiple of train.micro_batch_size "
                f"(got {self.train.batch_size} and {self.train.micro_batch_size})"
            )
        if self.train.world_size > 1:
            if self.train.batch_size < self.train.world_size:
                raise ValueError(f"train.batch_size ({self.train.batch_size}) must be >= "
                                 f"train.world_size ({self.train.world_size}): every rank needs a share")
            if self.mode == "online":
                raise ValueError("train.world_size > 1 is for offline training; online mode keeps "
                                 "one resident model (set train.world_size: 1)")
            if self.train.trace.enabled:
                raise ValueError("train.trace with train.world_size > 1 is not supported yet")
        if self.train.nnodes > 1:
            if self.mode == "online":
                raise ValueError("train.nnodes > 1 is for offline training (online mode keeps one "
                                 "resident model)")
            if not self.train.rdzv_endpoint:
                raise ValueError("train.nnodes > 1 needs train.rdzv_endpoint (host:port of the c10d "
                                 "rendezvous, reachable from every node)")
        if self.rollout.guidance.enabled and self.rollout.backend != "hf":
            raise ValueError("rollout.guidance needs rollout.backend=hf (lockstep decoding)")
        if self.teacher.reference is not None and (
                not objective_registry.get(self.train.objective).advantage
                or self.train.advantage.reward_scale == 1.0):
            raise ValueError("teacher.reference is G-OPD's pRef of train.advantage.reward_scale: it "
                             "needs train.objective=reverse_kl_sampled and reward_scale != 1 (at 1, "
                             "pRef cancels out of A_t)")
        if self.train.lora.enabled and self.mode != "offline":
            raise ValueError("train.lora is for offline training for now: online mode keeps one "
                             "resident model that its rollout engine reads by parameter name")
        if self.confidence.revise and self.mode != "offline":
            raise ValueError("confidence.revise (CaOPD) runs between the rollout and teacher stages of "
                             "an offline run; online mode is not supported yet")
        if self.teacher.teachers and (self.mode != "offline" or self.train.live_teacher):
            raise ValueError("teacher.teachers (MOPD) routes rows to frozen teachers in the offline "
                             "teacher stage: it needs mode: offline and a cached-target objective "
                             "(not a live teacher such as train.objective=jsd)")
        if self.rollout.rescue_tries and self.rollout.backend != "hf":
            raise ValueError("rollout.rescue_tries needs rollout.backend=hf (the hinted sampler is "
                             "the teacher's resident model)")
        r = self.rollout
        if r.rescue_tries and r.rescue_behaviour == "student" and (r.temperature != 1.0 or r.top_p != 1.0):
            raise ValueError("rollout.rescue_behaviour: student stores the student's plain log-probs "
                             "(temperature 1, no top-p) as the rescued reply's behaviour: it needs "
                             "rollout.temperature: 1.0 and rollout.top_p: 1.0 to match the other "
                             "samples' (or rescue_behaviour: sampler)")
        if self.rollout.brts.n and self.rollout.backend != "hf":
            raise ValueError("rollout.brts needs rollout.backend=hf (the teacher's resident model "
                             "samples the candidates, the student's scores them)")
        if self.train.rewards.credit == "cepo" and self.teacher.negative_view is None:
            raise ValueError("train.rewards.credit=cepo needs the wrong-answer teacher pass: set "
                             "teacher.negative_view (the ground-truth view a rejected reply replaces)")
        nv = self.teacher.negative_view
        if nv is not None and nv not in self.teacher.context.views:
            raise ValueError(f"teacher.negative_view={nv} must be one of teacher.context.views "
                             f"{self.teacher.context.views}: the negative pass replaces its value")
        kind = teacher_kinds.get(self.teacher.kind)
        if kind.online_only and self.mode != "online":
            raise ValueError(
                f"teacher.kind={kind.name} ({kind.summary}) differs from a frozen teacher only when "
                "the student changes between teacher passes, which happens in online mode; offline, "
                "the teacher scores the rollouts once before training. Use mode: online, or "
                "teacher.kind: frozen (a live teacher inside offline training: train.objective: jsd)")
        if kind.needs_model and self.teacher.model is None:
            raise ValueError(f"teacher.kind={kind.name} needs teacher.model.name")
        t_roll, t_train = self.rollout.temperature, self.train.temperature
        if t_roll > 0 and t_roll != t_train and not self.train.allow_temperature_mismatch:
            raise ValueError(
                f"train.temperature ({t_train}) differs from rollout.temperature ({t_roll}): the loss "
                "would score the replies under another distribution than the one that sampled them; "
                "use one temperature, or set train.allow_temperature_mismatch=true"
            )
        if self.mode == "online" and (self.runner.kind != "threads" or self.runner.workers > 1):
            raise ValueError(
                f"runner.kind={self.runner.kind} / runner.workers={self.runner.workers}: sharded "
                "stages fan out in offline mode only; online mode keeps the student resident in "
                "the flow process between iterations (use runner.kind=threads, runner.workers=1)")
        if self.rollout.sample_from == "teacher":
            if self.mode != "offline":
                raise ValueError("rollout.sample_from=teacher (the sft baseline) is offline only")
            if self.rollout.guidance.enabled:
                raise ValueError("rollout.sample_from=teacher samples from the teacher already; "
                                 "disable rollout.guidance")
        if self.train.reviser.enabled:
            # the reviser is the current model sampling inside the online loop, reading the
            # teacher's context: what it is trained on is what the teacher then scores with
            if self.mode != "online":
                raise ValueError("train.reviser (SD-Zero) revises each iteration's attempts with "
                                 "the current model: mode: online")
            if "attempt" not in self.teacher.context.views:
                raise ValueError("train.reviser reads the teacher's context, which must show the "
                                 "attempt and its verdict: add 'attempt' to teacher.context.views")
            if self.teacher.context.consensus != "none":
                raise ValueError("train.reviser with teacher.context.consensus is not supported "
                                 "(one reviser context per attempt)")
        return self


# --------------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    # YAML gives the natural reading of "3", "1e-4", "true", "[1, 2]", "null".
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw mapping (returns a new mapping)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, value = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = _parse_value(value)
    return out


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _section_model(e["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
            msg = f"unknown key; allowed here: {allowed}"
        elif e["type"].startswith(("greater_than", "less_than")):
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = PipelineConfig
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def config_from_dict(raw: dict[str, Any], origin: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


# A recipe is a page of settings: a larger file, or one whose anchors and aliases expand into
# more nodes than this (a "billion laughs" document), is refused before it is built.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000


def _read_recipe(p: Path) -> Any:
    """The YAML document of a recipe, read with PyYAML's safe loader (plain data only: a
    ``!!python/...`` tag is refused, never constructed), within the size limits above."""
    if not p.is_file():
        raise ConfigError(f"{p}: not a file; give the path of a YAML recipe")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError(f"{p}: {size} bytes, over the limit of {MAX_RECIPE_BYTES} bytes for a "
                          "recipe; check it is the right file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err}); save the recipe as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot be read ({err.strerror or err})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node) > MAX_RECIPE_NODES:
            raise ConfigError(f"{p}: its anchors and aliases expand to more than "
                              f"{MAX_RECIPE_NODES} values; write the recipe out without them")
        return loader.construct_document(node) if node is not None else None
    except yaml.constructor.ConstructorError as err:
        if err.problem and "could not determine a constructor for the tag" in err.problem:
            tag = err.problem.rsplit(" ", 1)[-1].strip("'").replace("tag:yaml.org,2002:", "!!")
            mark = err.problem_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "the recipe"
            raise ConfigError(
                f"{p}: YAML tag {tag} ({where}) is not allowed: recipes are plain data "
                "(mappings, lists, strings, numbers), read with a safe loader that never builds "
                "Python objects; remove the tag") from None
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _expanded_nodes(root: yaml.Node) -> int:
    """How many values the document has with every alias expanded (shared nodes are counted
    once per use, without expanding them: memoised over node identity)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias counts once instead of looping
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        sizes[id(node)] = total
        return total

    return size(root)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    data: str | None = None,
) -> PipelineConfig:
    """Load a YAML recipe, apply ``--set`` overrides and ``--data``, validate."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        loaded = _read_recipe(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        raw, origin = loaded, str(p)
    raw = apply_overrides(raw, overrides or [])
    if data is not None:
        raw = apply_overrides(raw, [f"data.source={json.dumps(str(data))}"])
    return config_from_dict(raw, origin)


def describe_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple]:
    """(dotted key, type, default, help) for every field, for docs and ``--help``."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            rows.extend(describe_fields(sub, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, getattr(ann, "__name__", str(ann)), default, field.description or ""))
    return rows


# --------------------------------------------------------------------------- device decisions

DTYPE_FIELDS = (("rollout", "dtype"), ("teacher", "dtype"), ("eval", "dtype"), ("retention", "dtype"))


def resolve_for_device(cfg: PipelineConfig) -> tuple[PipelineConfig, list[str]]:
    """Decide ``device`` and every ``auto`` dtype for this machine (opsd.device).

    The resolved values are what the stages run with *and* what enters their content keys, so
    rollouts sampled in bf16 and in fp32 never share a key; ``device`` itself is run-only.
    ``train.activation_checkpointing: auto`` stays as is: the trainer decides it per micro-batch
    from the device's free memory. Returns (resolved copy, one line per decision)."""
    device = resolve_device(cfg.device)
    fast = auto_dtype(device)
    notes = [f"device {cfg.device} -> {device}"]
    update: dict[str, Any] = {"device": str(device)}
    for section, name in DTYPE_FIELDS:
        sec = getattr(cfg, section)
        if getattr(sec, name) == "auto":
            update[section] = sec.model_copy(update={name: fast.dtype})
            notes.append(f"{section}.{name} auto -> {fast.dtype} ({fast.reason})")
    if cfg.train.autocast == "auto":
        value = "bfloat16" if fast.dtype == "bfloat16" else "none"
        update["train"] = cfg.train.model_copy(update={"autocast": value})
        notes.append(f"train.autocast auto -> {value} ({fast.reason})")
    return cfg.model_copy(update=update), notes
