"""Typed pipeline configuration.

One YAML recipe maps onto :class:`PipelineConfig`. Every field carries help text
(shown by ``opsd config --help-fields``) and a range where one makes sense, so a
typo or an out-of-range value is refused before any compute, with the allowed
range in the message. ``--set a.b=value`` overrides are applied to the raw
mapping before validation, so they obey exactly the same rules.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what and how to fix it."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos ("learning_rate" for "lr"): refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
               "attempt")


class ExposureConfig(_Strict):
    """Partial exposure of the reference solution (ATESD-style)."""

    mode: Literal["fixed", "linear", "adaptive"] = Field(
        "fixed",
        description="fixed: always `ratio`; linear: from `start` to `end` over online iterations; "
        "adaptive: move the ratio each iteration toward the student's needs (more when its "
        "pass rate is below `target_pass`, less when above).",
    )
    ratio: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the solution revealed (fixed).")
    start: float = Field(0.0, ge=0.0, le=1.0, description="Ratio at the first iteration (linear).")
    end: float = Field(1.0, ge=0.0, le=1.0, description="Ratio at the last iteration (linear).")
    target_pass: float = Field(0.5, ge=0.0, le=1.0, description="Adaptive: pass rate to hold.")
    step: float = Field(0.1, gt=0.0, le=1.0, description="Adaptive: ratio change per iteration.")


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
    sibling_as: Literal["turn", "text"] = Field(
        "turn", description="Render a successful sibling as an earlier exchange or as text."
    )
    sibling_template: str = Field(
        "A correct reply to the next question:\n{sibling}", description="Template (sibling_as=text)."
    )
    exposure: ExposureConfig = Field(default_factory=ExposureConfig)
    consensus: Literal["none", "mean_logprob", "mean_prob"] = Field(
        "none",
        description="Multi-view (AVSD-style): score the response under each view in "
        "`consensus_views` separately and combine the teacher distributions: mean_logprob = "
        "normalised geometric mean, mean_prob = mixture.",
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
    max_new_tokens: int = Field(96, ge=8, le=4096, description="Length cap of a summary.")
    template: str = Field(
        "Below are attempts at the same kind of request, each marked as passing or failing a "
        "check.\n\n{examples}\n\nIn at most three short bullet points, state what the passing "
        "replies do that the failing ones do not (what worked, mistakes to avoid, the workflow).",
        description="Summarisation prompt; {examples} is replaced by the attempts.",
    )


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
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="Compute dtype for generation (weights copied once)."
    )
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)


class TeacherConfig(_Strict):
    model: ModelConfig | None = Field(
        None, description="External teacher (plain OPD). None: the student's own weights."
    )
    kind: Literal["frozen", "live", "ema", "external"] = Field(
        "frozen",
        description="frozen: initial weights; live: current student; ema: EMA of the student; "
        "external: teacher.model.",
    )
    ema_rate: float = Field(0.05, gt=0.0, le=1.0, description="EMA update rate per iteration.")
    backend: Literal["hf", "vllm"] = Field("hf", description="Scoring engine.")
    topk: int = Field(20, ge=1, le=1024, description="Teacher top-k stored per response token.")
    batch_size: int = Field(32, ge=1, description="Sequences scored together.")
    shard_size: int = Field(512, ge=1, description="Samples per stored shard.")
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="Scoring dtype.")
    share_prefix: bool = Field(
        True,
        description="Encode a privileged prefix shared by many rows once and reuse its "
        "KV cache (exact up to float rounding).",
    )
    context: ContextConfig = Field(default_factory=ContextConfig)


class TrainConfig(_Strict):
    objective: Literal["forward_kl_topk", "reverse_kl_sampled"] = Field(
        "forward_kl_topk",
        description="forward_kl_topk: sum_k pT(log pT - log pS) over teacher top-k plus a "
        "tail bucket; reverse_kl_sampled: REINFORCE form with A_t = sg(log pT - log pS).",
    )
    epochs: int = Field(2, ge=1, le=1000, description="Passes over the cached targets.")
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
    temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Temperature applied to student logits in the loss."
    )
    importance_ratio_clip: float | None = Field(
        None, gt=1.0, description="reverse_kl_sampled: weight tokens by pi_S/pi_behaviour "
        "clipped to [1/c, c]; None disables.",
    )
    autocast: Literal["bfloat16", "none"] = Field(
        "bfloat16", description="Mixed precision for forward/backward; master weights stay fp32."
    )
    logit_chunk: int = Field(
        256, ge=1, description="Response positions per log-softmax chunk (bounds memory)."
    )
    seed: int = Field(0, description="Data order and init seed.")
    save_every: int = Field(
        50, ge=0, description="Save a resume point (weights, optimizer, RNG) every N steps so a "
        "killed train stage continues where it stopped (0: never)."
    )


class EvalConfig(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=32768, description="Response length cap.")
    batch_size: int = Field(64, ge=1, description="Sequences generated together.")
    samples: int = Field(
        0, ge=0, le=256, description="k sampled replies per prompt for avg@k/pass@k/maj@k "
        "(0: greedy only)."
    )
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Temperature of sampled eval.")
    teacher_ceiling: bool = Field(
        True, description="Also evaluate the teacher with its privileged context."
    )
    seed: int = Field(1234, description="Seed of sampled eval.")
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="Generation dtype.")


class OnlineConfig(_Strict):
    """Online mode: every iteration samples from the current student."""

    iterations: int = Field(30, ge=1, le=100000, description="Rollout → teacher → train iterations.")
    prompts_per_iteration: int = Field(
        8, ge=1, description="Train prompts sampled per iteration (× rollout.n replies)."
    )
    steps_per_iteration: int = Field(
        1, ge=1, description="Optimiser steps per iteration over that iteration's samples."
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate the student every N iterations (0: only at the end)."
    )
    resume_every: int = Field(
        1, ge=0, description="Save the rolling resume point every N iterations (0: never)."
    )
    seed: int = Field(0, description="Seed of the prompt order across iterations.")


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
        if self.rollout.guidance.enabled and self.rollout.backend != "hf":
            raise ValueError("rollout.guidance needs rollout.backend=hf (lockstep decoding)")
        if self.teacher.kind == "external" and self.teacher.model is None:
            raise ValueError("teacher.kind=external needs teacher.model.name")
        return self

    def section(self, name: str) -> dict[str, Any]:
        """A JSON-safe dict of one section, as hashed into stage keys."""
        return json.loads(getattr(self, name).model_dump_json())


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
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
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
