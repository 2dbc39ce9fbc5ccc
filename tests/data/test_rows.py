"""Row model and loaders: formats, round trips, and one clear message per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opsd.data import (
    DatasetError,
    PrivilegedViews,
    Problem,
    Row,
    load_rows,
    rows_from_table,
    rows_to_table,
    split_rows,
)

GOOD_ROWS = [
    {"id": "q1", "prompt": "What is 2 + 2?", "answer": "4", "verifier": {"type": "exact"}},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a colour."},
        ],
        "privileged_context": {
            "demonstrations": [{"prompt": "Name a fruit.", "completion": "Sure thing! Apple."}],
            "system": "Start with 'Sure thing!'.",
        },
        "verifier": {"type": "regex", "pattern": r"^\s*Sure thing!", "description": "start with 'Sure thing!'"},
        "split": "eval",
        "task": "sure-thing",
        "metadata": {"source": "hand-written", "tags": ["a", "b"]},
    },
    {
        "prompt": "Integrate 2x.",
        "privileged_context": "x^2 + C",
        "answer": 7,
        "verifier": {"type": "math", "value": "x^2"},
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_jsonl_loads_with_defaults_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "mini.jsonl"
    first, second, third = (json.dumps(row) for row in GOOD_ROWS)
    path.write_text(f"{first}\n\n   \n{second}\n{third}")
    rows = load_rows(str(path))
    assert [r.id for r in rows] == ["q1", "mini-4", "mini-5"]  # ids from file stem + line number
    assert rows[0].split == "train" and rows[0].metadata == {}
    assert rows[2].answer == "7"  # numeric answers are kept as text
    assert rows[1].prompt_messages()[-1] == {"role": "user", "content": "Name a colour."}
    assert rows[0].prompt_messages() == [{"role": "user", "content": "What is 2 + 2?"}]
    assert rows[1].views().demonstrations[0].completion == "Sure thing! Apple."
    assert rows[2].views() == PrivilegedViews(solution="x^2 + C")
    assert rows[0].views() == PrivilegedViews()
    train, eval_ = split_rows(rows)
    assert [r.id for r in train] == ["q1", "mini-5"] and [r.id for r in eval_] == ["mini-4"]


def test_json_array_and_parquet_load_the_same_rows(tmp_path: Path) -> None:
    from_jsonl = load_rows(str(write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS)))
    (tmp_path / "d.json").write_text(json.dumps(GOOD_ROWS, indent=2))
    from_json = load_rows(str(tmp_path / "d.json"))
    pq.write_table(rows_to_table(from_jsonl), tmp_path / "d.parquet")
    from_parquet = load_rows(str(tmp_path / "d.parquet"))
    assert from_json == from_jsonl == from_parquet


def test_plain_parquet_with_native_columns(tmp_path: Path) -> None:
    """TRL-style Parquet: struct columns give every row every key, nulls mean absent."""
    table = pa.Table.from_pylist(
        [
            {"prompt": "Say hi.", "verifier": {"type": "regex", "pattern": "hi", "value": None}},
            {"prompt": "2+2?", "answer": "4", "verifier": {"type": "exact", "pattern": None, "value": "4"}},
        ]
    )
    path = tmp_path / "native.parquet"
    pq.write_table(table, path)
    rows = load_rows(str(path))
    assert [r.id for r in rows] == ["native-1", "native-2"]
    assert rows[0].verifier.type == "regex" and rows[1].verifier.value == "4"


def test_parquet_round_trip_is_exact(tmp_path: Path) -> None:
    rows = load_rows(str(write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS))) + load_rows("behaviours?train=2&eval=1")
    table = rows_to_table(rows)
    assert set(table.schema.names) == set(Row.model_fields)
    assert all(field.type == pa.string() for field in table.schema)
    assert rows_from_table(table) == rows
    pq.write_table(table, tmp_path / "r.parquet")
    assert rows_from_table(pq.read_table(tmp_path / "r.parquet")) == rows


def test_row_model_rejects_bad_values_directly() -> None:
    with pytest.raises(ValueError, match="last turn must be the user's"):
        Row(id="x", prompt=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="needs an expected answer"):
        Row(id="x", prompt="q", verifier={"type": "exact"})


# Each case: (file name, file content or None for no file, expected line, expected field, reason fragment).
ROW = '{"prompt": "ok"}'


def jsonl_row(**fields: object) -> str:
    return json.dumps({"prompt": "q", **fields})


BAD_INPUTS = {
    "missing file": ("nope.jsonl", None, None, None, "file not found"),
    "unsupported extension": ("rows.csv", "prompt\nhi\n", None, None, "unsupported file type '.csv'"),
    "empty jsonl": ("rows.jsonl", "\n  \n", None, None, "no rows"),
    "empty json array": ("rows.json", "[]", None, None, "no rows"),
    "json object not array": ("rows.json", '{"prompt": "x"}', None, None, "expected a JSON array"),
    "invalid json array": ("rows.json", '[\n{"prompt": "x"},\n{oops}\n]', 3, None, "not valid JSON (Expecting"),
    "invalid json line": ("rows.jsonl", ROW + "\n{not json}\n", 2, None, "not valid JSON (Expecting property"),
    "row not object": ("rows.jsonl", ROW + "\n[1, 2]\n", 2, None, "a row must be a JSON object"),
    "missing prompt": ("rows.jsonl", ROW + '\n{"answer": "4"}\n', 2, "prompt", "every row needs a 'prompt'"),
    "blank prompt": ("rows.jsonl", jsonl_row(prompt="  \n "), 1, "prompt", "empty or whitespace only"),
    "prompt is a number": ("rows.jsonl", jsonl_row(prompt=42), 1, "prompt", "got int 42"),
    "bad role": (
        "rows.jsonl",
        jsonl_row(prompt=[{"role": "bot", "content": "hi"}]),
        1,
        "prompt[0].role",
        "'bot' is not allowed; use 'system', 'user' or 'assistant'",
    ),
    "content not string": (
        "rows.jsonl",
        jsonl_row(prompt=[{"role": "user", "content": 3}]),
        1,
        "prompt[0].content",
        "expected a string; got int 3",
    ),
    "empty content": (
        "rows.jsonl",
        jsonl_row(prompt=[{"role": "user", "content": ""}]),
        1,
        "prompt[0].content",
        "empty or whitespace only",
    ),
    "message not object": ("rows.jsonl", jsonl_row(prompt=["hi"]), 1, "prompt[0]", "expected a {role, content} object"),
    "last turn not user": (
        "rows.jsonl",
        jsonl_row(prompt=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        1,
        "prompt",
        "the last turn must be the user's",
    ),
    "no messages": ("rows.jsonl", jsonl_row(prompt=[]), 1, "prompt", "no messages"),
    "privileged_context wrong type": (
        "rows.jsonl",
        jsonl_row(privileged_context=7),
        1,
        "privileged_context",
        "expected a string or an object of named views",
    ),
    "demonstrations not a list": (
        "rows.jsonl",
        jsonl_row(privileged_context={"demonstrations": "Q: a A: b"}),
        1,
        "privileged_context.demonstrations",
        "expected a list of {prompt, completion} objects",
    ),
    "demonstration not object": (
        "rows.jsonl",
        jsonl_row(privileged_context={"demonstrations": ["x"]}),
        1,
        "privileged_context.demonstrations[0]",
        "expected a {prompt, completion} object",
    ),
    "demonstration without prompt": (
        "rows.jsonl",
        jsonl_row(privileged_context={"demonstrations": [{"completion": "a"}]}),
        1,
        "privileged_context.demonstrations[0].prompt",
        "every demonstration needs a 'prompt' and a 'completion'",
    ),
    "unknown view": (
        "rows.jsonl",
        jsonl_row(privileged_context={"hints": "x"}),
        1,
        "privileged_context.hints",
        "unknown view 'hints'; known views: demonstrations, solution, answer, system, skills",
    ),
    "unknown verifier type": (
        "rows.jsonl",
        jsonl_row(verifier={"type": "fuzzy"}),
        1,
        "verifier",
        "unknown verifier type 'fuzzy'; known types: regex, exact, math, reasoning_gym",
    ),
    "verifier without type": ("rows.jsonl", jsonl_row(verifier={"pattern": "x"}), 1, "verifier", "missing 'type'"),
    "verifier not object": ("rows.jsonl", jsonl_row(verifier="regex"), 1, "verifier", "expected an object with a 'type'"),
    "bad regex": (
        "rows.jsonl",
        jsonl_row(verifier={"type": "regex", "pattern": "(["}),
        1,
        "verifier.pattern",
        "regex does not compile: unterminated character set",
    ),
    "bad regex flag": (
        "rows.jsonl",
        jsonl_row(verifier={"type": "regex", "pattern": "a", "flags": "q"}),
        1,
        "verifier.flags",
        "unknown regex flag(s) 'q'",
    ),
    "unknown verifier field": (
        "rows.jsonl",
        jsonl_row(verifier={"type": "regex", "pattern": "a", "patern": "b"}),
        1,
        "verifier.patern",
        "unknown field 'patern'; allowed fields: type, flags, pattern, description",
    ),
    "exact without answer": (
        "rows.jsonl",
        jsonl_row(verifier={"type": "exact"}),
        1,
        "verifier",
        "needs an expected answer; set the row's 'answer' or the verifier's 'value'",
    ),
    "math without answer": ("rows.jsonl", jsonl_row(verifier={"type": "math"}), 1, "verifier", "expected answer"),
    "unknown reasoning-gym task": (
        "rows.jsonl",
        jsonl_row(verifier={"type": "reasoning_gym", "task": "leg_countin", "entry": {}}),
        1,
        "verifier.task",
        "unknown reasoning-gym task 'leg_countin'; close names: leg_counting",
    ),
    "bad split": ("rows.jsonl", jsonl_row(split="test"), 1, "split", "'test' is not allowed; use 'train' or 'eval'"),
    "duplicate id": (
        "rows.jsonl",
        "\n".join([jsonl_row(id="a"), jsonl_row(id="b"), jsonl_row(id="a")]),
        3,
        "id",
        "duplicate id 'a', also on line 1",
    ),
    "unknown column": (
        "rows.jsonl",
        jsonl_row(privileged_contex="x"),
        1,
        "privileged_contex",
        "unknown column 'privileged_contex'; allowed columns: id, prompt, privileged_context, answer",
    ),
    "not utf-8": ("rows.jsonl", b'{"prompt": "caf\xe9"}\n', None, None, "not UTF-8 text"),
    "not parquet": ("rows.parquet", "this is not parquet", None, None, "cannot read Parquet"),
    "bad row in json array": ("rows.json", '[{"prompt": "ok"}, {"prompt": ""}]', 2, "prompt", "empty or whitespace"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_a_clear_problem(tmp_path: Path, name: str) -> None:
    file_name, content, line, field, reason = BAD_INPUTS[name]
    path = tmp_path / file_name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError) as caught:
        load_rows(str(path))
    problems = caught.value.problems
    assert len(problems) == 1, problems
    problem = problems[0]
    assert (problem.file, problem.line, problem.field) == (str(path), line, field)
    assert reason in problem.reason
    where = str(path) if line is None else f"{path}:{line}"
    assert f"{where}: {field + ': ' if field else ''}" in str(caught.value)


def test_bad_parquet_row_names_its_row_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "fine"}, {"prompt": "   "}]), path)
    with pytest.raises(DatasetError) as caught:
        load_rows(str(path))
    assert caught.value.problems == [Problem(str(path), 2, "prompt", caught.value.problems[0].reason)]
    assert f"{path}:2: prompt: prompt is empty" in str(caught.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    lines = [
        '{"prompt": "fine"}',
        '{"prompt": 5, "split": "test"}',
        "not json",
        '{"prompt": "q", "verifier": {"type": "regex", "pattern": "("}, "extra": 1}',
    ]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError) as caught:
        load_rows(str(path))
    found = [(p.line, p.field) for p in caught.value.problems]
    assert found == [(2, "prompt"), (2, "split"), (3, None), (4, "verifier.pattern"), (4, "extra")]
    assert str(caught.value).startswith("5 problems in dataset:")


def test_long_problem_lists_are_truncated(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": " "}] * 25)
    with pytest.raises(DatasetError) as caught:
        load_rows(str(path))
    message = str(caught.value)
    assert len(caught.value.problems) == 25
    assert f"{path}:20: prompt" in message and f"{path}:21: prompt" not in message
    assert message.endswith("... and 5 more")
