"""Dataset rows: the model every stage reads, and the loaders that check it.

Column names follow TRL's conventions (``prompt``, ``answer``, ...) so existing
datasets drop in. A row may carry *privileged context* (PI) that only the teacher
sees, and a *verifier* that scores the student's replies.

Loading validates everything before returning and reports every problem at
once (see :mod:`opsd.data.problems`), so a bad dataset fails in seconds instead
of hours into a run.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

import pyarrow as pa
from pydantic import (
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from opsd.data.problems import DatasetError, Problem, single_problem
from opsd.data.specs import (
    VERIFIER_TYPES,
    ExactVerifier,
    MathVerifier,
    ReasoningGymVerifier,
    RegexVerifier,
    StrictModel,
    VerifierSpec,
)


def _non_blank(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} is empty or whitespace only; write the text or drop the row")
    return value


def _number_to_str(value: Any) -> Any:
    """Accept numeric ids and answers (GSM8K-style data stores answers as numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


class Message(StrictModel):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_not_blank(cls, value: str) -> str:
        return _non_blank(value, "message content")


class Demonstration(StrictModel):
    """An example exchange shown to the teacher as real chat turns (user prompt, assistant completion)."""

    prompt: str
    completion: str

    @field_validator("prompt", "completion")
    @classmethod
    def _not_blank(cls, value: str, info: ValidationInfo) -> str:
        return _non_blank(value, f"demonstration {info.field_name}")


class PrivilegedViews(StrictModel):
    """Named views of the privileged context; a PI builder picks which ones the teacher sees."""

    demonstrations: list[Demonstration] | None = None
    solution: str | None = None
    answer: str | None = None
    system: str | None = None
    skills: str | None = None


# --- rows -----------------------------------------------------------------------------------

# Callable discriminators pick one branch of a union by the input's JSON type, so a
# bad value gives one error for that branch instead of one per union member.
_TAGS = ("text", "messages", "views", "none")


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    return "messages" if isinstance(value, list) else None


def _context_kind(value: Any) -> str | None:
    if value is None:
        return "none"
    if isinstance(value, str):
        return "text"
    return "views" if isinstance(value, (dict, PrivilegedViews)) else None


Prompt = Annotated[
    Union[Annotated[str, Tag("text")], Annotated[list[Message], Tag("messages")]],
    Discriminator(_prompt_kind),
]
PrivilegedContext = Annotated[
    Union[
        Annotated[str, Tag("text")],
        Annotated[PrivilegedViews, Tag("views")],
        Annotated[None, Tag("none")],
    ],
    Discriminator(_context_kind),
]


class Row(StrictModel):
    """One dataset row.

    ``prompt`` is a string or chat messages whose last turn is the user's (earlier
    turns are context). A plain-string ``privileged_context`` is the solution view.
    ``task`` groups rows for per-task metrics.
    """

    id: Annotated[str, BeforeValidator(_number_to_str)]
    prompt: Prompt
    privileged_context: PrivilegedContext = None
    answer: Annotated[str | None, BeforeValidator(_number_to_str)] = None
    verifier: VerifierSpec | None = None
    split: Literal["train", "eval"] = "train"
    task: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _prompt_usable(cls, value: str | list[Message]) -> str | list[Message]:
        if isinstance(value, str):
            return _non_blank(value, "prompt")
        if not value:
            raise ValueError("prompt has no messages; give at least one user turn")
        if value[-1].role != "user":
            raise ValueError(
                f"the last message is from {value[-1].role!r}; the last turn must be the user's "
                "(earlier turns are context, the student replies to the last user turn)"
            )
        return value

    @field_validator("verifier")
    @classmethod
    def _has_expected_answer(cls, value: Any, info: ValidationInfo) -> Any:
        # ``answer`` is validated first; when it failed it is absent and already reported.
        needs_answer = isinstance(value, (ExactVerifier, MathVerifier)) and value.value is None
        if needs_answer and "answer" in info.data and info.data["answer"] is None:
            raise ValueError(
                f"the {value.type!r} verifier needs an expected answer; set the row's 'answer' "
                "or the verifier's 'value'"
            )
        return value

    def prompt_messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (a string prompt is one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [message.model_dump() for message in self.prompt]

    def views(self) -> PrivilegedViews:
        """The privileged context as named views (a string is the solution; None is no views)."""
        if isinstance(self.privileged_context, PrivilegedViews):
            return self.privileged_context
        return PrivilegedViews(solution=self.privileged_context)


def split_rows(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """Split rows into (train, eval), keeping order."""
    return [r for r in rows if r.split == "train"], [r for r in rows if r.split == "eval"]


# --- turning pydantic errors into problems ----------------------------------------------------

_VIEW_NAMES = ", ".join(PrivilegedViews.model_fields)
_PROMPT_SHAPE = "a non-empty string or a list of {role, content} messages ending with a user turn"
# The model that owns the key after a location part (union tags and list fields).
_OWNERS: dict[str, type[BaseModel]] = {
    "messages": Message,
    "views": PrivilegedViews,
    "demonstrations": Demonstration,
    "regex": RegexVerifier,
    "exact": ExactVerifier,
    "math": MathVerifier,
    "reasoning_gym": ReasoningGymVerifier,
}
_ELEMENT_SHAPES = {"messages": "a {role, content} object", "demonstrations": "a {prompt, completion} object"}
_MISSING_HINTS: dict[tuple[type[BaseModel], str], str] = {
    (Row, "prompt"): f"every row needs a 'prompt': {_PROMPT_SHAPE}",
    (Message, "role"): "every message needs a 'role': 'system', 'user' or 'assistant'",
    (Message, "content"): "every message needs a non-empty 'content' string",
    (Demonstration, "prompt"): "every demonstration needs a 'prompt' and a 'completion'",
    (Demonstration, "completion"): "every demonstration needs a 'prompt' and a 'completion'",
    (RegexVerifier, "pattern"): "a regex verifier needs a 'pattern'",
    (ReasoningGymVerifier, "task"): "a reasoning_gym verifier needs the reasoning-gym 'task' name",
    (ReasoningGymVerifier, "entry"): "a reasoning_gym verifier needs the dataset 'entry' to score with",
}


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _owner(raw_loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model whose field ``raw_loc[-1]`` is."""
    return next((_OWNERS[p] for p in reversed(raw_loc[:-1]) if isinstance(p, str) and p in _OWNERS), Row)


def _explain(error: dict[str, Any]) -> tuple[str | None, str]:
    """(field path, reason with the fix) for one pydantic error of a Row."""
    raw_loc = tuple(error["loc"])
    # Union tags sit right after the top-level field they discriminate; hide them from users.
    loc = tuple(part for i, part in enumerate(raw_loc) if not (i == 1 and part in (*_TAGS, *VERIFIER_TYPES)))
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    top, name, field = loc[0] if loc else None, loc[-1] if loc else None, _path(loc) or None
    types = ", ".join(VERIFIER_TYPES)

    if kind == "extra_forbidden":
        owner = _owner(raw_loc)
        if owner is PrivilegedViews:
            return field, f"unknown view {name!r}; known views: {_VIEW_NAMES}"
        if owner is Row:
            return field, f"unknown column {name!r}; allowed columns: {', '.join(Row.model_fields)}"
        return field, f"unknown field {name!r}; allowed fields: {', '.join(owner.model_fields)}"
    if kind == "missing":
        return field, _MISSING_HINTS.get((_owner(raw_loc), name), f"missing required field {name!r}")
    if top == "verifier" and kind == "union_tag_invalid":
        return field, f"unknown verifier type {ctx.get('tag')!r}; known types: {types}"
    if top == "verifier" and kind == "union_tag_not_found":
        return field, f"missing 'type'; use one of {types}"
    if loc == ("verifier",) and kind == "model_attributes_type":
        return field, f"expected an object with a 'type' ({types}); got {_shown(value)}"
    if top == "prompt" and kind == "union_tag_not_found":
        return field, f"expected {_PROMPT_SHAPE}; got {_shown(value)}"
    if top == "privileged_context" and kind == "union_tag_not_found":
        return field, f"expected a string or an object of named views ({_VIEW_NAMES}); got {_shown(value)}"
    if name == "demonstrations" and kind == "list_type":
        return field, f"expected a list of {{prompt, completion}} objects; got {_shown(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        parent = raw_loc[-2] if len(raw_loc) > 1 else None
        return field, f"expected {_ELEMENT_SHAPES.get(parent, 'an object')}; got {_shown(value)}"
    if kind == "string_type":
        return field, f"expected a string; got {_shown(value)}"
    if kind == "literal_error":
        return field, f"{value!r} is not allowed; use {ctx.get('expected')}"
    if kind == "value_error":
        return field, str(ctx.get("error", error["msg"]))
    return field, f"{error['msg']}; got {_shown(value)}"


# --- loading ----------------------------------------------------------------------------------

Records = list[tuple[int, Any]]  # (1-based line or row number, decoded value)


def validate_records(label: str, stem: str, unit: str, records: Records, problems: list[Problem]) -> list[Row]:
    """Validate every record, collecting all problems; rows without an id get ``{stem}-{number}``."""
    if not records and not problems:
        raise single_problem(label, "no rows: the dataset is empty; add at least one row with a 'prompt'")
    rows: list[Row] = []
    first_seen: dict[str, int] = {}
    for number, raw in records:
        if not isinstance(raw, dict):
            reason = f"a row must be a JSON object with at least a 'prompt'; got {_shown(raw)}"
            problems.append(Problem(label, number, None, reason))
            continue
        if raw.get("id") is None:
            raw = {**raw, "id": f"{stem}-{number}"}
        try:
            row = Row.model_validate(raw)
        except ValidationError as err:
            problems += [Problem(label, number, *_explain(e)) for e in err.errors(include_url=False)]
            continue
        if row.id in first_seen:
            reason = f"duplicate id {row.id!r}, also on {unit} {first_seen[row.id]}; ids must be unique"
            problems.append(Problem(label, number, "id", reason))
        else:
            first_seen[row.id] = number
        rows.append(row)
    if problems:
        raise DatasetError(sorted(problems, key=lambda problem: problem.line or 0))
    return rows


# --- normalized Parquet form ------------------------------------------------------------------

# Nested columns are stored as JSON text: one flat string schema holds every row shape
# (string or message prompts, any views, any verifier) and DuckDB can still query it.
_JSON_COLUMNS = ("prompt", "privileged_context", "verifier", "metadata")
_FORMAT_KEY, _FORMAT_VERSION = b"opsd.rows", b"1"


def rows_to_table(rows: list[Row]) -> pa.Table:
    """Rows as a flat all-string Arrow table, nested columns as JSON; :func:`rows_from_table` inverts it."""
    columns: dict[str, list[str | None]] = {name: [] for name in Row.model_fields}
    for row in rows:
        dumped = row.model_dump(mode="json")
        for name, value in dumped.items():
            if name in _JSON_COLUMNS and value is not None:
                value = json.dumps(value, ensure_ascii=False)
            columns[name].append(value)
    fields = [pa.field(name, pa.string()) for name in columns]
    schema = pa.schema(fields, metadata={_FORMAT_KEY: _FORMAT_VERSION})
    return pa.table(columns, schema=schema)


def rows_from_table(table: pa.Table, *, label: str = "<table>") -> list[Row]:
    """Validate rows from an Arrow table: the normalized form, or plain TRL-style columns."""
    records, problems = records_from_table(table, label)
    return validate_records(label, "table", "row", records, problems)


def records_from_table(table: pa.Table, label: str) -> tuple[Records, list[Problem]]:
    normalized = (table.schema.metadata or {}).get(_FORMAT_KEY) == _FORMAT_VERSION
    records, problems = [], []
    for number, record in enumerate(table.to_pylist(), start=1):
        if not normalized:
            # Struct columns give every row every key; a null key means "absent".
            records.append((number, _drop_nulls(record)))
            continue
        bad = []
        for name in _JSON_COLUMNS:
            if record.get(name) is not None:
                try:
                    record[name] = json.loads(record[name])
                except json.JSONDecodeError as err:
                    bad.append(Problem(label, number, name, f"not valid JSON ({err})"))
        problems += bad
        if not bad:
            records.append((number, record))
    return records, problems


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value
